"""Tiny Hugging Face model directories written at test time, and their GGUF twins.

`build_tiny_hf` writes what a Hub repo holds: config.json (llama, mistral, qwen2
or qwen3 shapes), safetensors shards in bf16/f16/f32 (our own writer, one or
two shards with their index), tokenizer.json trained with the `tokenizers`
package on a few lines of text, tokenizer_config.json with a chat template, and
generation_config.json. Two tokenizer styles: SentencePiece-style BPE with byte
fallback (`spm`, as Llama 2 and Mistral ship it) and byte-level BPE (`bytelevel`,
as Qwen and Llama 3 do).

`build_gguf_twin` converts such a directory the way llama.cpp's
convert_hf_to_gguf.py does: the same weights (as f32, which holds bf16 and f16
exactly), `llama` Q/K rows permuted for llama.cpp's adjacent-pair RoPE, the
vocabulary padded with "[PADn]" tokens to the embedding's rows, so the torch
engine can be compared against llama.cpp on identical weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CORPUS = [
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "hello world, the world says hello to the people of the world",
    "print('hello world')  # prints the greeting\n",
    "The quick brown fox jumps over the lazy dog. 12345 and 67890.",
]
LLAMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}assistant:{% endif %}")
CHATML_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Qwen2's pre-tokenizer split (llama.cpp's "qwen2" pre-tokenizer uses the same expression).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
ARCH = {"llama": ("llama", "LlamaForCausalLM"), "mistral": ("llama", "MistralForCausalLM"),
        "qwen2": ("qwen2", "Qwen2ForCausalLM"), "qwen3": ("qwen3", "Qwen3ForCausalLM")}


@dataclass(frozen=True)
class TinyHfSpec:
    model_type: str = "llama"  # llama | mistral | qwen2 | qwen3
    n_embd: int = 64
    n_layers: int = 2
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int | None = None  # None: n_embd // n_head (and not written to config.json)
    n_ff: int = 128
    n_ctx: int = 2048
    dtype: str = "BF16"  # safetensors dtype of every tensor: BF16 | F16 | F32
    shards: int = 1
    tied: bool = False
    pad_vocab_to: int = 64  # config vocab_size: the tokenizer's size rounded up to a multiple of this
    rope_scaling: dict[str, Any] | None = None
    tokenizer: str | None = None  # "spm" | "bytelevel"; None: spm for llama/mistral, bytelevel for qwen
    seed: int = 0
    scale: float = 1.0  # weight scale: larger makes sharper next-token distributions
    extra_config: dict[str, Any] = field(default_factory=dict)

    @property
    def tokenizer_kind(self) -> str:
        return self.tokenizer or ("bytelevel" if self.model_type.startswith("qwen") else "spm")


# --- safetensors --------------------------------------------------------------------------

def encode(a: np.ndarray, dtype: str) -> bytes:
    """Little-endian bytes of `a` in a safetensors dtype (bf16 rounded to nearest even)."""
    if dtype == "F32":
        return a.astype("<f4").tobytes()
    if dtype == "F16":
        return a.astype("<f2").tobytes()
    if dtype == "BF16":
        u = a.astype(np.float32).view(np.uint32).astype(np.uint64)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2").tobytes()
    raise ValueError(dtype)


def decode(raw: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """float32 values of raw safetensors bytes."""
    if dtype == "BF16":
        return (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
    return np.frombuffer(raw, {"F32": "<f4", "F16": "<f2"}[dtype]).astype(np.float32).reshape(shape)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str = "BF16") -> Path:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    blobs, offset = [], 0
    for name, a in tensors.items():
        raw = encode(a, dtype)
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # data 8-byte aligned, as the safetensors library writes it
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))
    return path


def read_weights(directory: Path) -> dict[str, np.ndarray]:
    """Every tensor of a model directory as float32 (through specrun's own header checks)."""
    from specrun.model_dir import open_model_dir

    out = {}
    for name, t in open_model_dir(directory, need_tokenizer=False).tensors.items():
        with open(t.file, "rb") as f:
            f.seek(t.offset)
            out[name] = decode(f.read(t.nbytes), t.dtype, t.shape)
    return out


# --- tokenizers -----------------------------------------------------------------------------

def build_tokenizer(kind: str, n_merges: int = 120) -> Any:
    """A trained tokenizers.Tokenizer: `spm` (specials, 256 byte tokens, then pieces) or `bytelevel`."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if kind == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=len(alphabet) + n_merges, show_progress=False,
                                                            initial_alphabet=alphabet))
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
        return tok
    meta = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = meta
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=60 + n_merges, show_progress=False))
    model = json.loads(trained.to_str())["model"]
    pieces = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    vocab = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(vocab)}, merges, unk_token="<unk>",
                               byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = meta
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return tok


def _tokenizer_files(kind: str, tok: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(tokenizer_config.json, the config.json ids, generation_config.json) for a tokenizer kind."""
    if kind == "bytelevel":
        end, im_end = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")
        return ({"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                 "chat_template": CHATML_TEMPLATE},
                {"bos_token_id": end, "eos_token_id": im_end},
                {"bos_token_id": end, "eos_token_id": [im_end, end]})
    return ({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
             "add_eos_token": False, "chat_template": LLAMA_TEMPLATE},
            {"bos_token_id": 1, "eos_token_id": 2}, {"bos_token_id": 1, "eos_token_id": 2})


# --- the directory ----------------------------------------------------------------------

def tiny_weights(spec: TinyHfSpec, n_vocab: int) -> dict[str, np.ndarray]:
    """Random float32 weights under their HF names."""
    rng = np.random.default_rng(spec.seed)
    n, hd = spec.n_embd, spec.head_dim or spec.n_embd // spec.n_head
    q_out, kv_out = spec.n_head * hd, spec.n_head_kv * hd

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * spec.scale / np.sqrt(cols)).astype(np.float32)

    def norm(size: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(size)).astype(np.float32)

    w = {"model.embed_tokens.weight": rng.standard_normal((n_vocab, n)).astype(np.float32)}
    for i in range(spec.n_layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(n)
        w[p + "post_attention_layernorm.weight"] = norm(n)
        for name, rows, cols in (("q", q_out, n), ("k", kv_out, n), ("v", kv_out, n), ("o", n, q_out)):
            w[f"{p}self_attn.{name}_proj.weight"] = mat(rows, cols)
            if spec.model_type == "qwen2" and name != "o":
                w[f"{p}self_attn.{name}_proj.bias"] = (0.1 * rng.standard_normal(rows)).astype(np.float32)
        if spec.model_type == "qwen3":
            w[p + "self_attn.q_norm.weight"], w[p + "self_attn.k_norm.weight"] = norm(hd), norm(hd)
        w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"] = mat(spec.n_ff, n), mat(spec.n_ff, n)
        w[p + "mlp.down_proj.weight"] = mat(n, spec.n_ff)
    w["model.norm.weight"] = norm(n)
    if not spec.tied:
        w["lm_head.weight"] = mat(n_vocab, n)
    return w


def build_tiny_hf(directory: Path, spec: TinyHfSpec = TinyHfSpec()) -> Path:
    """Write a tiny model directory at `directory` (created); returns it."""
    directory.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(spec.tokenizer_kind)
    size = tok.get_vocab_size(with_added_tokens=True)
    n_vocab = -(-size // spec.pad_vocab_to) * spec.pad_vocab_to
    tok.save(str(directory / "tokenizer.json"))
    tokenizer_config, ids, generation = _tokenizer_files(spec.tokenizer_kind, tok)
    config: dict[str, Any] = {
        "architectures": [ARCH[spec.model_type][1]], "model_type": spec.model_type, "hidden_size": spec.n_embd,
        "intermediate_size": spec.n_ff, "num_attention_heads": spec.n_head, "num_key_value_heads": spec.n_head_kv,
        "num_hidden_layers": spec.n_layers, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "max_position_embeddings": spec.n_ctx, "vocab_size": n_vocab, "tie_word_embeddings": spec.tied,
        "torch_dtype": {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[spec.dtype],
        "rope_scaling": spec.rope_scaling, **ids, **spec.extra_config,
    }
    if spec.head_dim is not None:
        config["head_dim"] = spec.head_dim
    for name, value in (("config.json", config), ("tokenizer_config.json", tokenizer_config),
                        ("generation_config.json", generation)):
        (directory / name).write_text(json.dumps(value, indent=2))
    weights = tiny_weights(spec, n_vocab)
    if spec.shards == 1:
        write_safetensors(directory / "model.safetensors", weights, spec.dtype)
        return directory
    names = list(weights)
    per = -(-len(names) // spec.shards)
    weight_map = {}
    for k in range(spec.shards):
        shard = f"model-{k + 1:05d}-of-{spec.shards:05d}.safetensors"
        part = {name: weights[name] for name in names[k * per:(k + 1) * per]}
        write_safetensors(directory / shard, part, spec.dtype)
        weight_map |= {name: shard for name in part}
    total = sum(len(encode(a, spec.dtype)) for a in weights.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return directory


# --- the GGUF twin ------------------------------------------------------------------------

def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF's rotate-half Q/K rows -> llama.cpp's
    adjacent pairs (within each head, row 2i takes HF row i and row 2i+1 HF row i + d/2)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def build_gguf_twin(directory: Path, path: Path) -> Path:
    """The GGUF llama.cpp's converter would make of a tiny directory: f32 weights, same vocabulary."""
    from gguf import GGUFWriter, RopeScalingType, TokenType

    from specrun.engines.torch_engine.safetensors import args_from_config, llama3_rope_factors

    config = json.loads((directory / "config.json").read_text())
    a = args_from_config(config)
    weights = read_weights(directory)
    w = GGUFWriter(str(path), a.arch)
    w.add_name(directory.name)
    w.add_context_length(a.n_ctx_train)
    w.add_embedding_length(a.n_embd)
    w.add_block_count(a.n_layer)
    w.add_feed_forward_length(a.n_ff)
    w.add_head_count(a.n_head)
    w.add_head_count_kv(a.n_head_kv)
    w.add_key_length(a.head_dim)
    w.add_value_length(a.head_dim)
    w.add_layer_norm_rms_eps(a.norm_eps)
    w.add_rope_freq_base(a.rope_base)
    w.add_rope_dimension_count(a.rope_dim)
    w.add_file_type(0)
    if a.rope_scale != 1.0:
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(1.0 / a.rope_scale)
    _add_vocab(w, directory, a.n_vocab, TokenType)
    factors = llama3_rope_factors(config, a.rope_dim)
    if factors is not None:
        w.add_tensor("rope_freqs.weight", factors.numpy())
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    w.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", weights["model.norm.weight"])
    if "lm_head.weight" in weights and not a.tied_embeddings:
        w.add_tensor("output.weight", weights["lm_head.weight"])
    for i in range(a.n_layer):
        for hf, gg in names.items():
            for kind in ("weight", "bias"):
                t = weights.get(f"model.layers.{i}.{hf}.{kind}")
                if t is None:
                    continue
                if a.arch == "llama" and hf in ("self_attn.q_proj", "self_attn.k_proj"):
                    t = permute(t, a.n_head if hf == "self_attn.q_proj" else a.n_head_kv)
                w.add_tensor(f"blk.{i}.{gg}.{kind}", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _add_vocab(w: Any, directory: Path, n_vocab: int, TokenType: Any) -> None:
    """tokenizer.json as llama.cpp's converter writes it: `llama` (SentencePiece scores) or
    `gpt2` (merges), token types, special ids, and "[PADn]" tokens up to the embedding's rows."""
    spec = json.loads((directory / "tokenizer.json").read_text())
    tc = json.loads((directory / "tokenizer_config.json").read_text())
    config = json.loads((directory / "config.json").read_text())
    vocab: dict[str, int] = dict(spec["model"]["vocab"])
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    vocab |= {t["content"]: i for i, t in added.items()}
    by_id = {i: t for t, i in vocab.items()}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    spm = spec["model"].get("byte_fallback", False)
    rank = {m.replace(" ", ""): r for r, m in enumerate(merges)}
    tokens, scores, types = [], [], []
    for i in range(n_vocab):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            scores.append(-1000.0)
            types.append(TokenType.UNUSED)
            continue
        tokens.append(text)
        scores.append(-float(rank[text]) if text in rank else 0.0)
        if i in added and added[i].get("special"):
            types.append(TokenType.UNKNOWN if text == "<unk>" else TokenType.CONTROL)
        elif spm and text.startswith("<0x") and len(text) == 6:
            types.append(TokenType.BYTE)
        else:
            types.append(TokenType.NORMAL)
    w.add_tokenizer_model("llama" if spm else "gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    if spm:
        w.add_token_scores(scores)
        w.add_unk_token_id(vocab["<unk>"])
    else:
        w.add_tokenizer_pre("qwen2")
        w.add_token_merges(merges)
    bos = vocab.get(tc.get("bos_token") or "", config.get("bos_token_id"))
    if bos is not None:
        w.add_bos_token_id(bos)
    w.add_eos_token_id(vocab[tc["eos_token"]])
    w.add_add_bos_token(bool(tc.get("add_bos_token", False)))
    w.add_add_eos_token(bool(tc.get("add_eos_token", False)))
    if tc.get("chat_template"):
        w.add_chat_template(tc["chat_template"])


# --- a reference forward pass --------------------------------------------------------------

def reference_logits(directory: Path, ids: list[int]) -> np.ndarray:
    """Logits [n, n_vocab] (float64) of a tiny directory, computed the way transformers computes
    them (rotate-half RoPE on unpermuted Q/K, GQA, causal attention): the judge for the GGUF
    twin and for the torch engine. Checked against transformers 5.17 itself (on a machine that
    has it): within 6e-7 relative for llama, mistral, qwen2, qwen3 and llama3/linear RoPE."""
    from specrun.engines.torch_engine.safetensors import args_from_config, llama3_rope_factors

    config = json.loads((directory / "config.json").read_text())
    a, w = args_from_config(config), read_weights(directory)
    n, d, group = len(ids), a.head_dim, a.n_head // a.n_head_kv

    def rms(x: np.ndarray, g: np.ndarray) -> np.ndarray:
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + a.norm_eps) * g

    def lin(x: np.ndarray, name: str) -> np.ndarray:
        return x @ w[name + ".weight"].T + w.get(name + ".bias", 0.0)

    inv = a.rope_base ** (-np.arange(0, a.rope_dim, 2) / a.rope_dim)
    factors = llama3_rope_factors(config, a.rope_dim)
    inv = inv if factors is None else inv / factors.numpy()
    angles = np.arange(n)[:, None] * a.rope_scale * inv[None, :]  # [n, d/2]
    cos, sin = (np.concatenate([f(angles)] * 2, -1)[:, None] for f in (np.cos, np.sin))  # [n, 1, d]

    def rope(t: np.ndarray) -> np.ndarray:  # [n, heads, d]
        return t * cos + np.concatenate([-t[..., d // 2:], t[..., :d // 2]], -1) * sin

    x = w["model.embed_tokens.weight"][ids].astype(np.float64)
    causal = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(a.n_layer):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q, k, v = (lin(h, f"{p}self_attn.{t}_proj").reshape(n, -1, d) for t in "qkv")
        if a.qk_norm:
            q, k = rms(q, w[p + "self_attn.q_norm.weight"]), rms(k, w[p + "self_attn.k_norm.weight"])
        q, k = rope(q), rope(k)
        out = np.empty((n, a.n_head, d))
        for head in range(a.n_head):
            s = q[:, head] @ k[:, head // group].T / np.sqrt(d) + causal
            e = np.exp(s - s.max(-1, keepdims=True))
            out[:, head] = e / e.sum(-1, keepdims=True) @ v[:, head // group]
        x = x + lin(out.reshape(n, -1), p + "self_attn.o_proj")
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        gate = lin(h, p + "mlp.gate_proj")
        x = x + lin(gate / (1 + np.exp(-gate)) * lin(h, p + "mlp.up_proj"), p + "mlp.down_proj")
    return rms(x, w["model.norm.weight"]) @ w.get("lm_head.weight", w["model.embed_tokens.weight"]).T
