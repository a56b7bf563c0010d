"""How a GGUF file's weights are cut into the units a streamed placement moves each pass.

A unit is one contiguous byte range of the file: a decoder layer (its tensors sit
together in GGUF files), or a slice of rows of the output matrix (150k-row
vocabularies make that matrix several layers' worth of bytes, so it is cut into
layer-sized chunks that stream like layers). Ranges are widened to ALIGN-byte
boundaries so direct I/O can read them into aligned buffers; a tensor then sits
at the same 32-byte alignment in the buffer as in the file, which is what
ggml's kernels need. Token embeddings never stream: a pass needs only its
tokens' rows, read one by one.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from specrun.engines.torch_engine.arch import ModelArgs
from specrun.engines.torch_engine.weights import (DENSE_TYPES, DenseLinear, GgmlLinear, GgufLinear, LayerWeights,
                                                  Linear)
from specrun.errors import ModelFileError
from specrun.gguf_file import GGUFInfo, TensorInfo

ALIGN = 4096  # direct I/O: file offsets, lengths and buffer addresses are multiples of this
TENSOR_ALIGN = 32  # GGUF aligns tensor data to 32 bytes; ggml's kernels need as much


@dataclass(frozen=True)
class Span:
    """One tensor (or a slice of its rows) inside a unit's buffer."""

    name: str
    qtype: int
    shape: tuple[int, ...]  # numpy order; for an output slice, its rows
    offset: int  # bytes from the unit's start
    n_bytes: int


@dataclass(frozen=True)
class Unit:
    index: int  # position in a pass: layers first, then output slices
    kind: str  # "layer" | "output"
    number: int  # layer number, or output slice number
    start: int  # file offset (ALIGN-aligned)
    n_bytes: int  # bytes read for it (ALIGN multiple), covering every span
    spans: tuple[Span, ...]
    rows: tuple[int, int] = (0, 0)  # an output slice's rows [first, last)

    def span(self, suffix: str) -> Span | None:
        for s in self.spans:
            if s.name.endswith(suffix):
                return s
        return None


def _down(x: int) -> int:
    return x // ALIGN * ALIGN


def _up(x: int) -> int:
    return -(-x // ALIGN) * ALIGN


def plan_units(info: GGUFInfo, args: ModelArgs) -> list[Unit]:
    """Every decoder layer, then the output matrix in slices of about one layer's bytes."""
    by_name = {t.name: t for t in info.tensors}
    units: list[Unit] = []
    for i in range(args.n_layer):
        tensors = [t for t in info.tensors if t.name.startswith(f"blk.{i}.")]
        if not tensors:
            raise ModelFileError(f"the model file has no tensors for layer {i} of {args.n_layer}")
        start, end = _down(min(t.offset for t in tensors)), _up(max(t.offset + t.n_bytes for t in tensors))
        if end - start > sum(t.n_bytes for t in tensors) + TENSOR_ALIGN * len(tensors) + 2 * ALIGN:
            raise ModelFileError(f"layer {i}'s tensors are scattered through the file: it cannot stream "
                                 "layer by layer", hint="use --offload none, or a GGUF written layer by layer")
        spans = tuple(Span(t.name, t.type, t.shape, t.offset - start, t.n_bytes) for t in tensors)
        units.append(Unit(i, "layer", i, start, end - start, spans))
    out = by_name["token_embd.weight" if args.tied_embeddings else "output.weight"]
    layer_bytes = max(u.n_bytes for u in units) if units else out.n_bytes
    units += _output_slices(out, layer_bytes, len(units))
    return units


def _output_slices(t: TensorInfo, target_bytes: int, first_index: int) -> list[Unit]:
    rows, row_bytes = t.shape[0], t.n_bytes // t.shape[0]
    step = TENSOR_ALIGN // math.gcd(row_bytes, TENSOR_ALIGN)  # slices start 32-byte aligned
    per = max(step, target_bytes // row_bytes // step * step)
    units = []
    for k, r0 in enumerate(range(0, rows, per)):
        r1 = min(rows, r0 + per)
        lo, hi = t.offset + r0 * row_bytes, t.offset + r1 * row_bytes
        start = _down(lo)
        span = Span(t.name, t.type, (r1 - r0, *t.shape[1:]), lo - start, hi - lo)
        units.append(Unit(first_index + k, "output", k, start, _up(hi) - start, (span,), (r0, r1)))
    return units


def tensor_bytes(buf: torch.Tensor, span: Span) -> torch.Tensor:
    """uint8 [rows, row_bytes] view of a span in a unit's buffer (no copy)."""
    rows = span.shape[0] if len(span.shape) > 1 else 1
    return buf[span.offset:span.offset + span.n_bytes].view(rows, -1)


def vector(buf: torch.Tensor, span: Span) -> torch.Tensor:
    """A norm or bias vector as float32 (a view for F32 data, the usual case)."""
    return tensor_bytes(buf, span).view(DENSE_TYPES[span.qtype]).reshape(-1).float()


def linear(buf: torch.Tensor, span: Span, bias: Span | None, dtype: torch.dtype) -> Linear:
    """A matrix of the buffer, multiplied where it lies: dense types as they are, quantized
    ones by ggml's kernels on a CPU and dequantized into `dtype` on a GPU."""
    raw = tensor_bytes(buf, span)
    b = vector(buf, bias) if bias is not None else None
    if span.qtype in DENSE_TYPES:
        w = raw.view(DENSE_TYPES[span.qtype]).reshape(span.shape)
        return DenseLinear(w.to(dtype), None if b is None else b.to(dtype))
    if buf.device.type == "cpu":
        return GgmlLinear(raw, span.qtype, (span.shape[0], span.shape[1]), b)
    return GgufLinear(raw, span.qtype, (span.shape[0], span.shape[1]), dtype, None if b is None else b.to(dtype))


def layer_weights(unit: Unit, buf: torch.Tensor, args: ModelArgs, dtype: torch.dtype) -> LayerWeights:
    """The decoder layer whose bytes are in `buf` (uint8 [unit.n_bytes]), as views into it."""

    def span(suffix: str) -> Span:
        found = unit.span(suffix)
        if found is None:
            raise KeyError(f"blk.{unit.number}.{suffix}")
        return found

    def lin(name: str) -> Linear:
        return linear(buf, span(name + ".weight"), unit.span(name + ".bias"), dtype)

    return LayerWeights(
        attn_norm=vector(buf, span("attn_norm.weight")),
        q=lin("attn_q"), k=lin("attn_k"), v=lin("attn_v"), o=lin("attn_output"),
        ffn_norm=vector(buf, span("ffn_norm.weight")),
        gate=lin("ffn_gate"), up=lin("ffn_up"), down=lin("ffn_down"),
        q_norm=vector(buf, span("attn_q_norm.weight")) if args.qk_norm else None,
        k_norm=vector(buf, span("attn_k_norm.weight")) if args.qk_norm else None,
    )


def read_at(fd: int, view: np.ndarray, offset: int, direct: bool = False) -> int:
    """Fill `view` (uint8) from the file at `offset`; the bytes read, fewer at the end of the file.
    OSError for a failed read: `read_error` makes it one line. A direct read stops at its first
    short read (continuing from there would be unaligned)."""
    done = 0
    while done < len(view):  # one read() returns at most about 2 GB
        n = os.preadv(fd, [view[done:]], offset + done)
        done += n
        if n == 0 or (direct and done < len(view)):
            break
    return done


def read_error(path: Path, e: OSError | ValueError) -> ModelFileError:
    """A failed read of a model file, as one line (the disk or the file is at fault, not specrun)."""
    return ModelFileError(f"reading {path.name} failed: {getattr(e, 'strerror', None) or e}",
                          hint="check the disk (dmesg) and the file (specrun pull again)")


def ended_early(path: Path, what: str) -> ModelFileError:
    """A model file shorter than its header says (`what` was being read): it changed on disk."""
    return ModelFileError(f"{path.name} ended early while reading {what}: it changed on disk while specrun ran",
                          hint="specrun pull it again")
