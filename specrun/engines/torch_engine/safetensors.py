"""Hugging Face safetensors directories for the torch engine: config.json -> `ModelArgs`,
shards -> `ModelWeights`, optionally quantized by bitsandbytes as they load.

Tensors are read one at a time straight into memory of their own (a `readinto`
of each tensor's byte range; `specrun.model_dir` has already checked that every
range lies inside its file), converted to the compute dtype on the device, and,
with `quant`, quantized there before the next is read: peak memory is the
quantized model plus one dense matrix.

HF checkpoints keep Q/K rows in their original order, so `rope_neox` is True for
every one of them (dim i rotates with dim i + d/2); llama.cpp's converter
permutes `llama` Q/K rows instead, which is why GGUF llama files pair adjacent dims.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, BinaryIO

import torch

from specrun.engines.torch_engine.arch import ModelArgs
from specrun.engines.torch_engine.bnb import BLOCKSIZE, Bnb4bitLinear, Bnb8bitLinear, check_int8, import_bitsandbytes
from specrun.engines.torch_engine.weights import DenseEmbedding, DenseLinear, LayerWeights, Linear, ModelWeights
from specrun.errors import ModelFileError
from specrun.model_dir import TensorInfo, open_model_dir

# HF model_type -> the GGUF architecture name ModelArgs uses (Mistral GGUFs are "llama" too).
MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
EMBED, NORM, LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


# --- config.json -> ModelArgs ------------------------------------------------------

def args_from_config(config: dict[str, Any]) -> ModelArgs:
    """ModelArgs for a llama, mistral, qwen2 or qwen3 config.json; one-line ModelFileError for
    anything else (other model types, pre-quantized checkpoints, unsupported RoPE scaling)."""
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ModelFileError(f"the torch engine does not run model_type '{model_type}'",
                             hint=f"supported: {', '.join(MODEL_TYPES)}")
    quantized = config.get("quantization_config")
    if quantized:
        method = quantized.get("quant_method", "?") if isinstance(quantized, dict) else "?"
        raise ModelFileError(f"this checkpoint is already quantized ({method}); the torch engine loads "
                             "bf16, f16 and f32 weights", hint="use the unquantized model, with --quant if you "
                                                               "want it quantized as it loads")

    def need(key: str) -> Any:
        if config.get(key) is None:
            raise ModelFileError(f"config.json lacks {key}")
        return config[key]

    n_embd, n_head = int(need("hidden_size")), int(need("num_attention_heads"))
    head_dim = int(config.get("head_dim") or n_embd // n_head)
    rope_dim = int(head_dim * float(config.get("partial_rotary_factor", 1.0)))
    kind, rope = _rope_scaling(config)
    return ModelArgs(
        arch=MODEL_TYPES[model_type],
        n_layer=int(need("num_hidden_layers")),
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=int(config.get("num_key_value_heads") or n_head),
        head_dim=head_dim,
        n_ff=int(need("intermediate_size")),
        n_vocab=int(need("vocab_size")),
        n_ctx_train=int(config.get("max_position_embeddings") or 0),
        norm_eps=float(need("rms_norm_eps")),
        rope_base=_rope_theta(config),
        rope_dim=rope_dim,
        rope_neox=True,  # HF keeps Q/K unpermuted: rotate_half pairing
        rope_scale=1.0 / float(rope["factor"]) if kind == "linear" else 1.0,
        qkv_bias=model_type == "qwen2" or bool(config.get("attention_bias")),
        qk_norm=model_type == "qwen3",
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def _rope_theta(config: dict[str, Any]) -> float:
    params = config.get("rope_parameters")  # transformers 5 moved rope_theta here
    theta = config.get("rope_theta") or (params.get("rope_theta") if isinstance(params, dict) else None)
    return float(theta or 10000.0)


def _rope_scaling(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """("default" | "linear" | "llama3", its parameters); ModelFileError for other kinds."""
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ModelFileError("config.json: rope_scaling is not an object")
    kind = str(rope.get("rope_type") or rope.get("type") or "default")
    if kind not in ("default", "linear", "llama3"):
        raise ModelFileError(f"the torch engine does not implement {kind} RoPE scaling",
                             hint="use a GGUF of this model on --engine llama.cpp")
    if kind != "default" and not float(rope.get("factor") or 0) > 0:
        raise ModelFileError(f"config.json: {kind} RoPE scaling without a positive factor")
    return kind, rope


def llama3_rope_factors(config: dict[str, Any], rope_dim: int) -> torch.Tensor | None:
    """Llama 3.1's per-frequency divisors [rope_dim / 2] float32, as llama.cpp's converter writes
    rope_freqs.weight: 1 for short wavelengths, `factor` for long ones, smoothly between."""
    kind, rope = _rope_scaling(config)
    if kind != "llama3":
        return None
    factor = float(rope["factor"])
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (_rope_theta(config) ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim))
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


# --- reading tensors -------------------------------------------------------------------

class _Shards:
    """Tensors read out of their shard files, each into a buffer of its own (CPU, stored dtype)."""

    def __init__(self, directory: Path, tensors: dict[str, TensorInfo]) -> None:
        self.directory, self.tensors = directory, tensors
        self._files: dict[Path, BinaryIO] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def read(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        info = self.tensors.get(name)
        if info is None:
            raise ModelFileError(f"{self.directory.name}: tensor {name} is missing", hint="the checkpoint does not "
                                 "match its config.json, or a shard is incomplete")
        if info.shape != shape:
            raise ModelFileError(f"{self.directory.name}: tensor {name} has shape {list(info.shape)}, "
                                 f"config.json implies {list(shape)}")
        dtype = TORCH_DTYPES.get(info.dtype)
        if dtype is None:
            raise ModelFileError(f"{self.directory.name}: tensor {name} is stored as {info.dtype}; the torch "
                                 "engine loads BF16, F16 and F32 checkpoints")
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        f = self._files.get(info.file)
        if f is None:
            f = self._files[info.file] = open(info.file, "rb")
        f.seek(info.offset)
        if f.readinto(buf.numpy()) != info.nbytes:
            raise ModelFileError(f"{info.file}: ends inside tensor {name} (truncated?)")
        return buf.view(dtype).reshape(shape)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


# --- bitsandbytes ----------------------------------------------------------------------




# --- ModelWeights ----------------------------------------------------------------------

def load_safetensors(directory: Path, args: ModelArgs, device: torch.device, dtype: torch.dtype,
                     quant: str | None) -> ModelWeights:
    """The weights of a HF directory on `device`: matrices dense in `dtype`, or quantized with
    bitsandbytes (`quant` nf4 | fp4 | int8; lm_head too, embeddings stay dense); norms float32."""
    if quant not in (None, "nf4", "fp4", "int8"):
        raise ModelFileError(f"unknown quantization '{quant}'", hint="use nf4, fp4 or int8")
    if quant is not None:
        import_bitsandbytes()
        if quant == "int8":
            check_int8(device)
    md = open_model_dir(directory, need_tokenizer=False)
    shards = _Shards(directory, md.tensors)
    try:
        return _load(shards, md.config, args, device, dtype, quant)
    finally:
        shards.close()


def _load(shards: _Shards, config: dict[str, Any], args: ModelArgs, device: torch.device, dtype: torch.dtype,
          quant: str | None) -> ModelWeights:
    a = args
    q_out, kv_out = a.n_head * a.head_dim, a.n_head_kv * a.head_dim

    def vector(name: str, n: int) -> torch.Tensor:
        return shards.read(name, (n,)).to(device=device, dtype=torch.float32)

    def matrix(name: str, shape: tuple[int, int]) -> torch.Tensor:
        return shards.read(name, shape).to(device=device, dtype=dtype)

    def linear(weight: torch.Tensor, bias: torch.Tensor | None) -> Linear:
        if quant is None:
            return DenseLinear(weight, bias)
        if quant == "int8":
            return Bnb8bitLinear.quantize(weight, bias)
        return Bnb4bitLinear.quantize(weight, bias, quant)

    def proj(name: str, shape: tuple[int, int]) -> Linear:
        bias_name = name.removesuffix(".weight") + ".bias"
        bias = shards.read(bias_name, shape[:1]).to(device=device, dtype=dtype) if bias_name in shards else None
        return linear(matrix(name, shape), bias)

    layers = []
    for i in range(a.n_layer):
        p = f"model.layers.{i}."
        for bias_of in ("q", "k", "v"):
            if a.qkv_bias and f"{p}self_attn.{bias_of}_proj.bias" not in shards:
                raise ModelFileError(f"tensor {p}self_attn.{bias_of}_proj.bias is missing "
                                     f"(config.json implies attention biases)")
        layers.append(LayerWeights(
            attn_norm=vector(p + "input_layernorm.weight", a.n_embd),
            q=proj(p + "self_attn.q_proj.weight", (q_out, a.n_embd)),
            k=proj(p + "self_attn.k_proj.weight", (kv_out, a.n_embd)),
            v=proj(p + "self_attn.v_proj.weight", (kv_out, a.n_embd)),
            o=proj(p + "self_attn.o_proj.weight", (a.n_embd, q_out)),
            ffn_norm=vector(p + "post_attention_layernorm.weight", a.n_embd),
            gate=proj(p + "mlp.gate_proj.weight", (a.n_ff, a.n_embd)),
            up=proj(p + "mlp.up_proj.weight", (a.n_ff, a.n_embd)),
            down=proj(p + "mlp.down_proj.weight", (a.n_embd, a.n_ff)),
            q_norm=vector(p + "self_attn.q_norm.weight", a.head_dim) if a.qk_norm else None,
            k_norm=vector(p + "self_attn.k_norm.weight", a.head_dim) if a.qk_norm else None,
        ))
    table = matrix(EMBED, (a.n_vocab, a.n_embd))
    if a.tied_embeddings:  # one dense table serves both, unless the output is quantized
        output = linear(table, None)
    else:
        output = linear(matrix(LM_HEAD, (a.n_vocab, a.n_embd)), None)
    factors = llama3_rope_factors(config, a.rope_dim)
    return ModelWeights(
        embed=DenseEmbedding(table), layers=layers, norm=vector(NORM, a.n_embd), output=output,
        rope_factors=None if factors is None else factors.to(device),
        shared_output=a.tied_embeddings and quant is None,
    )


def planned_bytes(directory: Path, elem_size: int, quant: str | None) -> int:
    """Memory `load_safetensors` would give the weights, from the headers alone: matrices at
    `elem_size` bytes per weight (or quantized), embeddings dense, norms float32."""
    md = open_model_dir(directory, need_tokenizer=False)
    tied = bool(md.config.get("tie_word_embeddings", False))

    def matrix(rows: int, numel: int) -> int:
        if quant in ("nf4", "fp4"):
            return numel // 2 + numel // BLOCKSIZE * 4
        if quant == "int8":
            return numel + rows * 4
        return numel * elem_size

    total = 0
    for name, t in md.tensors.items():
        if not (name.startswith("model.layers.") or name in (EMBED, NORM, LM_HEAD)) or "rotary_emb" in name:
            continue
        if len(t.shape) == 1:
            total += t.numel * (4 if name.endswith("norm.weight") else elem_size)
        elif name == EMBED:
            total += t.numel * elem_size + (matrix(t.shape[0], t.numel) if tied and quant else 0)
        elif not (name == LM_HEAD and tied):
            total += matrix(t.shape[0], t.numel)
    return total
