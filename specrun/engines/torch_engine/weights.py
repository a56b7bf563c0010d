"""A model's weights as the forward pass uses them, whatever file they came from.

`ModelWeights` holds one `Linear` per matrix and plain tensors for norms. A
Linear hides how its matrix is stored: dense (a safetensors checkpoint, or a
GGUF matrix converted once at load on a CPU), GGUF blocks dequantized where
they are used (on a GPU, and for streaming), or bitsandbytes 4/8-bit. The
GGUF loader lives here; the safetensors one in `safetensors.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from specrun.engines.torch_engine.arch import ModelArgs
from specrun.errors import ModelFileError
from specrun.gguf_file import GGUFInfo
from specrun.kernels import dequant


class Linear(Protocol):
    """y = x W^T (+ b): x [..., n_in] -> float32 [..., n_out]. The product runs in the matrix's
    own dtype; what goes in and out is float32, so the residual stream and the logits keep
    full precision (bf16 logits are rounded to 1/128 of their size: ties that are not there)."""

    nbytes: int  # memory the stored matrix (and bias) takes

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class Embedding(Protocol):
    """Token ids [n] -> rows [n, n_embd] float32."""

    nbytes: int

    def __call__(self, ids: torch.Tensor) -> torch.Tensor: ...


@dataclass
class DenseLinear:
    weight: torch.Tensor  # [n_out, n_in]
    bias: torch.Tensor | None = None  # [n_out]

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.weight, self.bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).float()


@dataclass
class DenseEmbedding:
    table: torch.Tensor  # [n_vocab, n_embd]

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.table)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids].float()


@dataclass
class GgufLinear:
    """A matrix kept in its GGUF blocks, dequantized into the compute dtype at each use."""

    raw: torch.Tensor  # uint8 [n_out, row_bytes]
    qtype: int
    shape: tuple[int, int]  # (n_out, n_in)
    dtype: torch.dtype
    bias: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.raw, self.bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weight = dequant.dequantize(self.raw, self.qtype, self.shape, self.dtype)
        return F.linear(x.to(self.dtype), weight, self.bias).float()


@dataclass
class GgmlLinear:
    """A CPU matrix kept in its GGUF blocks and multiplied by llama.cpp's own kernels, which
    quantize the activations as llama.cpp does: no float32 copy of the weights is ever made,
    which is what lets a streamed layer cost about what its bytes cost to read."""

    raw: torch.Tensor  # uint8 [n_out, row_bytes], 32-byte aligned
    qtype: int
    shape: tuple[int, int]  # (n_out, n_in)
    bias: torch.Tensor | None = None  # float32 [n_out]

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.raw, self.bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from specrun.kernels import ggml_matmul

        lead = x.shape[:-1]
        y = ggml_matmul.matmul(self.raw, self.qtype, self.shape, x.reshape(-1, x.shape[-1]).float())
        if self.bias is not None:
            y += self.bias
        return y.view(*lead, self.shape[0])


@dataclass
class GgufEmbedding:
    """Embedding rows dequantized on lookup: only the rows of the tokens asked for."""

    raw: torch.Tensor  # uint8 [n_vocab, row_bytes]
    qtype: int
    n_embd: int
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.raw)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return dequant.dequantize_rows(self.raw, self.qtype, ids, self.n_embd, torch.float32)


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [n_embd]
    q: Linear  # n_embd -> n_head * head_dim
    k: Linear  # n_embd -> n_head_kv * head_dim
    v: Linear
    o: Linear  # n_head * head_dim -> n_embd
    ffn_norm: torch.Tensor
    gate: Linear  # n_embd -> n_ff
    up: Linear
    down: Linear  # n_ff -> n_embd
    q_norm: torch.Tensor | None = None  # [head_dim] (Qwen3)
    k_norm: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        mats = (self.q, self.k, self.v, self.o, self.gate, self.up, self.down)
        return sum(m.nbytes for m in mats) + tensor_bytes(self.attn_norm, self.ffn_norm, self.q_norm, self.k_norm)


@dataclass
class ModelWeights:
    embed: Embedding
    layers: list[LayerWeights]
    norm: torch.Tensor  # [n_embd]
    output: Linear | None  # n_embd -> n_vocab; None: streamed with the layers (the pass's source has it)
    rope_factors: torch.Tensor | None = None  # [rope_dim / 2] frequency divisors (Llama 3.1 scaling)
    shared_output: bool = field(default=False)  # output reads the embedding's storage (tied)

    @property
    def nbytes(self) -> int:
        out = 0 if self.shared_output or self.output is None else self.output.nbytes
        return self.embed.nbytes + out + sum(l.nbytes for l in self.layers) + tensor_bytes(self.norm, self.rope_factors)


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    """Bytes the given tensors hold (None: none)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


# --- GGUF ----------------------------------------------------------------------

DENSE_TYPES = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}  # F32, F16, BF16


class GgufTensors:
    """A GGUF file's tensors as raw bytes, by name (the header parsed by specrun.gguf_file, the
    data memory-mapped)."""

    def __init__(self, path: Path, info: GGUFInfo) -> None:
        self.info = {t.name: t for t in info.tensors}
        for t in info.tensors:
            if t.type not in dequant.SUPPORTED:
                raise ModelFileError(
                    f"tensor {t.name} has type {_type_name(t.type)}, which the torch engine does not read",
                    hint=f"supported types: {', '.join(dequant.SUPPORTED.values())}; or use --engine llama.cpp")
        self._map = np.memmap(path, dtype=np.uint8, mode="r")

    def __contains__(self, name: str) -> bool:
        return name in self.info

    def names(self) -> set[str]:
        return set(self.info)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info[name].shape  # numpy order: rows first

    def qtype(self, name: str) -> int:
        return self.info[name].type

    def raw(self, name: str) -> torch.Tensor:
        """uint8 [rows, row_bytes] (a copy, off the memory map)."""
        t = self.info[name]
        rows = int(np.prod(t.shape[:-1])) if len(t.shape) > 1 else 1
        return torch.from_numpy(np.array(self._map[t.offset:t.offset + t.n_bytes]).reshape(rows, -1))

    def dense(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """The tensor dequantized (on the CPU's fastest path), in `dtype`, numpy-ordered shape."""
        shape, qtype = self.shape(name), self.qtype(name)
        raw = self.raw(name)
        if qtype in DENSE_TYPES:
            return raw.view(DENSE_TYPES[qtype]).reshape(shape).to(dtype)
        return dequant.dequantize(raw, qtype, shape, torch.float32).to(dtype)


def load_gguf(tensors: GgufTensors, args: ModelArgs, device: torch.device, dtype: torch.dtype,
              convert: bool) -> ModelWeights:
    """The model's weights on `device`. `convert`: dequantize every matrix once now (resident
    weights on a CPU, where dequantizing per pass would cost more than the pass); else keep
    quantized matrices in their blocks and dequantize at each use (GPUs, streaming)."""

    def vector(name: str) -> torch.Tensor:
        return tensors.dense(name, torch.float32).to(device)

    def bias(name: str) -> torch.Tensor | None:
        return tensors.dense(name, dtype).to(device) if name in tensors else None

    def linear(name: str, bias_name: str | None = None, dtype: torch.dtype = dtype) -> Linear:
        b = bias(bias_name) if bias_name else None
        qtype = tensors.qtype(name)
        if convert or qtype in DENSE_TYPES:
            return DenseLinear(tensors.dense(name, dtype).to(device), b)
        rows, cols = tensors.shape(name)
        return GgufLinear(tensors.raw(name).to(device), qtype, (rows, cols), dtype, b)

    layers = []
    for i in range(args.n_layer):
        p = f"blk.{i}."
        layers.append(LayerWeights(
            attn_norm=vector(p + "attn_norm.weight"),
            q=linear(p + "attn_q.weight", p + "attn_q.bias"),
            k=linear(p + "attn_k.weight", p + "attn_k.bias"),
            v=linear(p + "attn_v.weight", p + "attn_v.bias"),
            o=linear(p + "attn_output.weight"),
            ffn_norm=vector(p + "ffn_norm.weight"),
            gate=linear(p + "ffn_gate.weight"),
            up=linear(p + "ffn_up.weight"),
            down=linear(p + "ffn_down.weight"),
            q_norm=vector(p + "attn_q_norm.weight") if args.qk_norm else None,
            k_norm=vector(p + "attn_k_norm.weight") if args.qk_norm else None,
        ))
    output_name = "token_embd.weight" if args.tied_embeddings else "output.weight"
    output = linear(output_name, dtype=torch.float32)  # logits in full precision
    embed: Embedding
    if args.tied_embeddings and isinstance(output, DenseLinear):
        embed = DenseEmbedding(output.weight)  # one dense table serves both
    elif args.tied_embeddings and isinstance(output, GgufLinear):
        embed = GgufEmbedding(output.raw, output.qtype, args.n_embd, dtype)  # one copy of the blocks
    elif tensors.qtype("token_embd.weight") in DENSE_TYPES:
        embed = DenseEmbedding(tensors.dense("token_embd.weight", dtype).to(device))
    else:  # rows dequantized on lookup
        embed = GgufEmbedding(tensors.raw("token_embd.weight").to(device), tensors.qtype("token_embd.weight"),
                              args.n_embd, dtype)
    return ModelWeights(
        embed=embed, layers=layers, norm=vector("output_norm.weight"), output=output,
        rope_factors=vector("rope_freqs.weight") if "rope_freqs.weight" in tensors else None,
        shared_output=args.tied_embeddings,
    )


def _type_name(qtype: int) -> str:
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(qtype).name
    except ValueError:
        return str(qtype)
