"""Dequantize GGUF tensors on whatever device their bytes are on: the entry point for the engines.

CUDA bytes go through the Triton kernels (the torch reference where Triton is missing),
CPU bytes through llama.cpp's own row routines (the reference where the library is
missing), any other device through the reference. Every path gives the reference's
float32 values, bit for bit, before the final cast to dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .dequant_cpu import dequantize_cpu
from .gguf_reference import SUPPORTED, UnsupportedType, check_layout, dequantize_reference, row_bytes

__all__ = ["SUPPORTED", "UnsupportedType", "dequantize", "dequantize_rows", "row_bytes"]


def _triton_ready() -> bool:
    from . import dequant_triton  # imports triton, if any: only once CUDA bytes show up

    return dequant_triton.available()


def dequantize(
    raw: torch.Tensor,
    qtype: int,
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """uint8 bytes (1-D or [rows, row_bytes]) -> dtype [*shape] on raw's device.

    shape is numpy order (rows, cols): the last dim is contiguous and a multiple of the
    type's block size. out (contiguous, dtype, shape, raw's device), when given, is
    written and returned: engines that stream layers reuse one buffer instead of paying
    for a fresh allocation each time. Raises UnsupportedType for types outside SUPPORTED.
    """
    shape = tuple(int(s) for s in shape)
    check_layout(raw, qtype, shape)
    if out is not None and (out.shape != shape or out.dtype != dtype or out.device != raw.device
                            or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {shape} on {raw.device}")
    if raw.is_cuda and dtype in (torch.float32, torch.float16, torch.bfloat16) and _triton_ready():
        from .dequant_triton import dequantize_triton

        return dequantize_triton(raw, qtype, shape, dtype, out=out)
    if raw.device.type == "cpu":
        if dtype == torch.float32:
            return dequantize_cpu(raw, qtype, shape, out=out)
        values = dequantize_cpu(raw, qtype, shape)
    else:
        values = dequantize_reference(raw, qtype, shape)
    return values.to(dtype) if out is None else out.copy_(values)


def dequantize_rows(
    raw2d: torch.Tensor,
    qtype: int,
    row_ids: torch.Tensor | Sequence[int],
    n_cols: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Only the rows row_ids of a quantized matrix -> dtype [*row_ids.shape, n_cols].

    For embedding lookups: a 150k-row token table is dequantized a few rows at a time
    instead of whole. raw2d is [rows, row_bytes] uint8 (a 1-D buffer is split into rows).
    """
    width = row_bytes(qtype, n_cols)
    if raw2d.dim() == 1:
        raw2d = raw2d.reshape(-1, width)  # [rows, row_bytes]
    if raw2d.dim() != 2 or raw2d.shape[1] != width:
        raise ValueError(f"raw2d must be [rows, {width}] for {n_cols} values a row, got {tuple(raw2d.shape)}")
    ids = torch.as_tensor(row_ids, dtype=torch.long, device=raw2d.device)
    picked = raw2d.index_select(0, ids.reshape(-1))  # [n, row_bytes]
    values = dequantize(picked, qtype, (picked.shape[0], n_cols), dtype)
    return values.reshape(*ids.shape, n_cols)
