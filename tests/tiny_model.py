"""Tiny llama-architecture GGUF models written at test time (random weights, 272-token vocabulary).

f32 models make the engine tests fast and exact; a Q4_0 variant exercises
llama.cpp's quantized matmul paths, which is what crashes a mis-built
llama-cpp-python (a native build on a CPU advertising AMX died with SIGSEGV in
llama.cpp's AMX matmul on its first decode; that path runs only for quantized
matrices, so f32 models decoded fine on the same build), so
`python tests/tiny_model.py --smoke` doubles as the install script's post-build check.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, TokenType
from gguf.quants import quantize

WORDS = ("▁the", "▁a", "▁def", "▁return", "▁fib", "(n", "):", "▁if", "▁print", "▁hello", "▁world", "ing", "▁")
BOS, EOS = 1, 2
# A minimal chat template in the Jinja2 dialect GGUF files carry (as Hugging Face's tokenizer_config does).
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


@dataclass(frozen=True)
class TinySpec:
    n_embd: int = 64
    n_layers: int = 2
    n_head: int = 4
    n_ff: int = 128
    n_ctx: int = 2048
    seed: int = 0
    q4_0: bool = False  # quantize the matrices (dims must then be multiples of 256)
    scale: float = 0.5  # weight scale: larger makes sharper (less uniform) next-token distributions
    chat_template: str | None = CHAT_TEMPLATE
    words: tuple[str, ...] = WORDS  # the word pieces after the byte tokens (272 tokens in all)
    arch: str = "llama"  # or "qwen2" (q/k/v biases, NEOX RoPE) or "qwen3" (q/k norms)
    n_head_kv: int | None = None  # grouped-query attention when fewer than n_head
    tied: bool = False  # no output matrix: the embeddings serve as one

    @property
    def vocab(self) -> list[str]:
        return ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + list(self.words)


def build_tiny_model(path: Path, spec: TinySpec = TinySpec()) -> Path:
    rng = np.random.default_rng(spec.seed)
    w = GGUFWriter(str(path), spec.arch)
    w.add_name("tiny-test")
    w.add_context_length(spec.n_ctx)
    w.add_embedding_length(spec.n_embd)
    w.add_block_count(spec.n_layers)
    w.add_feed_forward_length(spec.n_ff)
    w.add_head_count(spec.n_head)
    w.add_head_count_kv(spec.n_head_kv or spec.n_head)
    if spec.arch != "llama":
        w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(spec.n_embd // spec.n_head)
    vocab, words = spec.vocab, spec.words
    w.add_vocab_size(len(vocab))
    w.add_file_type(2 if spec.q4_0 else 0)
    w.add_tokenizer_model("llama")
    w.add_token_list(vocab)
    w.add_token_scores([0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(words))])
    w.add_token_types([TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
                      + [TokenType.BYTE] * 256 + [TokenType.NORMAL] * len(words))
    w.add_bos_token_id(BOS)
    w.add_eos_token_id(EOS)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    if spec.chat_template is not None:
        w.add_chat_template(spec.chat_template)

    def matrix(name: str, rows: int, cols: int) -> None:
        a = (rng.standard_normal((rows, cols)) * spec.scale / np.sqrt(cols)).astype(np.float32)
        if spec.q4_0:
            w.add_tensor(name, quantize(a, GGMLQuantizationType.Q4_0), raw_dtype=GGMLQuantizationType.Q4_0)
        else:
            w.add_tensor(name, a)

    def norm(name: str, size: int = spec.n_embd) -> None:
        if spec.arch == "llama":  # ones, as the llama tests were written against
            w.add_tensor(name, np.ones(size, dtype=np.float32))
        else:
            w.add_tensor(name, (1 + 0.1 * rng.standard_normal(size)).astype(np.float32))

    n, v = spec.n_embd, len(vocab)
    head_dim = n // spec.n_head
    n_kv = (spec.n_head_kv or spec.n_head) * head_dim
    emb = (rng.standard_normal((v, n))).astype(np.float32)
    w.add_tensor("token_embd.weight", emb)  # embeddings stay f32 (row lookups)
    norm("output_norm.weight")
    if not spec.tied:
        matrix("output.weight", v, n)
    for i in range(spec.n_layers):
        norm(f"blk.{i}.attn_norm.weight")
        norm(f"blk.{i}.ffn_norm.weight")
        for t, rows in (("q", n), ("k", n_kv), ("v", n_kv), ("output", n)):
            matrix(f"blk.{i}.attn_{t}.weight", rows, n)
        if spec.arch == "qwen2":
            for t, rows in (("q", n), ("k", n_kv), ("v", n_kv)):
                w.add_tensor(f"blk.{i}.attn_{t}.bias", (0.1 * rng.standard_normal(rows)).astype(np.float32))
        if spec.arch == "qwen3":
            norm(f"blk.{i}.attn_q_norm.weight", head_dim)
            norm(f"blk.{i}.attn_k_norm.weight", head_dim)
        matrix(f"blk.{i}.ffn_gate.weight", spec.n_ff, n)
        matrix(f"blk.{i}.ffn_up.weight", spec.n_ff, n)
        matrix(f"blk.{i}.ffn_down.weight", n, spec.n_ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def quantize_model(src: Path, dst: Path, ftype: int) -> Path:
    """`src` requantized by llama.cpp itself (ftype: llama_cpp.LLAMA_FTYPE_MOSTLY_*), as its
    own quantize tool would (dimensions must be multiples of 256 for K-quants)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 0  # all cores
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {src}")
    return dst


def dequantized_twin(src: Path, dst: Path) -> Path:
    """`src` with every tensor dequantized to f32 by the gguf package (same header): what a
    quantized file computes, free of llama.cpp's 8-bit rounding of activations in its
    quantized dot products."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    r = GGUFReader(str(src))
    w = GGUFWriter(str(dst), str(r.fields["general.architecture"].contents()))
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        kind = f.types[0]
        if kind.name == "ARRAY":
            w.add_key_value(key, f.contents(), kind, sub_type=f.types[-1])
        else:
            w.add_key_value(key, f.contents(), kind)
    for t in r.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        w.add_tensor(t.name, dequantize(np.asarray(t.data), t.tensor_type).reshape(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


_SMOKE = """
import sys
from pathlib import Path
from specrun.engines.llamacpp import LlamaCppConfig, LlamaCppEngine
e = LlamaCppEngine(Path(sys.argv[1]), LlamaCppConfig(n_threads=2))
c = e.new_cache(256)
logits = e.eval(c, e.vocab.tokenize("hello world"))
for _ in range(4):
    logits = e.eval(c, [logits.argmax(0)])
print("decode ok")
"""


def smoke_test() -> int:
    """Decode a few tokens with quantized weights in a child process; its exit code says
    whether llama-cpp-python's build works on this CPU (a bad build dies with SIGSEGV/SIGILL)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_model(Path(tmp) / "tiny-q4_0.gguf", TinySpec(n_embd=256, n_ff=512, q4_0=True))
        done = subprocess.run([sys.executable, "-c", _SMOKE, str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        print(f"llama.cpp smoke test failed (exit {done.returncode}): {done.stderr.strip()[-500:]}", file=sys.stderr)
    return done.returncode


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="check that llama-cpp-python decodes quantized weights")
    parser.add_argument("--out", type=Path, help="write a tiny f32 model here")
    args = parser.parse_args()
    if args.smoke:
        sys.exit(smoke_test())
    if args.out:
        build_tiny_model(args.out)
