"""Slow, obviously right torch dequantization of GGUF tensors: the yardstick for the fast paths.

Each function follows one block layout of ggml (as written out in the `gguf` package's
quants.py) step by step, in the same float32 operation order as gguf's numpy code, so
the result is bit-exact equal to `gguf.quants.dequantize` on any device: f16 scales
are widened to float32 first, then multiplied (d * sc), and `a * q - m` is two
rounded operations, never a fused multiply-add.
"""

from __future__ import annotations

from typing import Callable

import torch
from gguf import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType as T

SUPPORTED: dict[int, str] = {
    int(t): t.name for t in (T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0, T.Q4_0, T.F16, T.BF16, T.F32)
}


class UnsupportedType(ValueError):
    """A GGML type this package has no dequantization for."""


def type_name(qtype: int) -> str:
    """The ggml name of a type id, or a readable stand-in for an unknown id."""
    try:
        return T(int(qtype)).name
    except ValueError:
        return f"unknown type {int(qtype)}"


def check_type(qtype: int) -> int:
    """The type id as a plain int; raises UnsupportedType naming it and the supported ones."""
    if int(qtype) not in SUPPORTED:
        raise UnsupportedType(
            f"cannot dequantize GGML type {type_name(qtype)} (id {int(qtype)}); "
            f"supported: {', '.join(SUPPORTED.values())}"
        )
    return int(qtype)


def row_bytes(qtype: int, n_cols: int) -> int:
    """Bytes of one row of n_cols values (n_cols a multiple of the block size)."""
    block_size, type_size = GGML_QUANT_SIZES[T(check_type(qtype))]
    if n_cols % block_size:
        raise ValueError(f"{type_name(qtype)} rows hold multiples of {block_size} values, not {n_cols}")
    return n_cols // block_size * type_size


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[n, 2] little-endian f16 bytes -> [n, 1] float32 (exact widening)."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 bytes -> (low 4 bits, high 4 bits), each the input's shape."""
    return b & 0x0F, b >> 4


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """[n, 34]: f16 d, 32 int8 q; y = q * d."""
    d = _f16(blocks[:, 0:2])  # [n, 1]
    q = blocks[:, 2:34].contiguous().view(torch.int8).float()  # [n, 32]
    return q * d


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    """[n, 18]: f16 d, 16 bytes; y[j] = d * (low nibble of byte j - 8), y[16+j] from the high nibble."""
    d = _f16(blocks[:, 0:2])  # [n, 1]
    lo, hi = _nibbles(blocks[:, 2:18])  # [n, 16] each
    q = torch.cat([lo, hi], dim=1).to(torch.int8) - 8  # [n, 32]
    return d * q.float()


def _k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, 12] packed 6-bit scales and mins of Q4_K/Q5_K -> ([n, 8], [n, 8]) as float32.

    Bytes 0-3 hold scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7; bytes 4-7
    the same for mins; bytes 8-11 the low 4 bits of scales 4-7 (low nibble) and of mins
    4-7 (high nibble).
    """
    a, b, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]  # [n, 4] each
    sc = torch.cat([a & 63, (c & 0x0F) | ((a >> 6) << 4)], dim=1)
    mn = torch.cat([b & 63, (c >> 4) | ((b >> 6) << 4)], dim=1)
    return sc.float(), mn.float()


def _k_low_bits(qs: torch.Tensor) -> torch.Tensor:
    """[n, 128] Q4_K/Q5_K nibbles -> [n, 8, 32]: 32-byte chunk j holds sub-block 2j (low) and 2j+1 (high)."""
    lo, hi = _nibbles(qs.reshape(-1, 4, 1, 32))
    return torch.cat([lo, hi], dim=2).reshape(-1, 8, 32)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    """[n, 144]: f16 d, f16 dmin, 12 scale bytes, 128 bytes of nibbles; 8 sub-blocks of 32.

    y = (d * sc[j]) * q - (dmin * m[j]).
    """
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])  # [n, 1]
    sc, mn = _k_scale_min(blocks[:, 4:16])  # [n, 8]
    q = _k_low_bits(blocks[:, 16:144]).float()  # [n, 8, 32]
    y = (d * sc).unsqueeze(2) * q - (dmin * mn).unsqueeze(2)
    return y.reshape(-1, QK_K)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    """[n, 176]: as Q4_K plus 32 bytes qh before the nibbles; bit j of qh[l] is bit 4 of sub-block j's value l."""
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])  # [n, 1]
    sc, mn = _k_scale_min(blocks[:, 4:16])  # [n, 8]
    qh = blocks[:, 16:48]  # [n, 32]
    shifts = torch.arange(8, dtype=torch.uint8, device=blocks.device).reshape(1, 8, 1)
    high = (qh.unsqueeze(1) >> shifts) & 1  # [n, 8, 32]
    q = (_k_low_bits(blocks[:, 48:176]) | (high << 4)).float()  # [n, 8, 32]
    y = (d * sc).unsqueeze(2) * q - (dmin * mn).unsqueeze(2)
    return y.reshape(-1, QK_K)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    """[n, 210]: 128 bytes ql, 64 bytes qh, 16 int8 scales, f16 d; 16 sub-blocks of 16.

    Each half of 128 values uses 64 ql bytes (low nibbles: values 0-63, high: 64-127)
    and 32 qh bytes (2 bits per value, group k of 32 values at shift 2k);
    y = (d * scale[i // 16]) * (q - 32).
    """
    ql, qh = blocks[:, 0:128], blocks[:, 128:192]
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float()  # [n, 16]
    d = _f16(blocks[:, 208:210])  # [n, 1]
    lo, hi = _nibbles(ql.reshape(-1, 2, 1, 64))
    low4 = torch.cat([lo, hi], dim=2).reshape(-1, 8, 32)  # [n, 8 groups of 32, 32]
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=blocks.device).reshape(1, 1, 4, 1)
    high2 = ((qh.reshape(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, 8, 32)
    q = (low4 | (high2 << 4)).to(torch.int8) - 32  # [n, 8, 32]
    y = (d * scales).unsqueeze(2) * q.reshape(-1, 16, 16).float()  # [n, 16, 16]
    return y.reshape(-1, QK_K)


def _f16_values(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.float16).float()


def _bf16_values(blocks: torch.Tensor) -> torch.Tensor:
    """bf16 is the top half of a float32: shift the 16 bits up (no rounding, NaNs kept)."""
    return (blocks.contiguous().view(torch.int16).to(torch.int32) << 16).view(torch.float32)


def _f32_values(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.float32).clone()


_BLOCKS: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    int(T.Q8_0): _q8_0,
    int(T.Q4_0): _q4_0,
    int(T.Q4_K): _q4_k,
    int(T.Q5_K): _q5_k,
    int(T.Q6_K): _q6_k,
    int(T.F16): _f16_values,
    int(T.BF16): _bf16_values,
    int(T.F32): _f32_values,
}


def check_layout(raw: torch.Tensor, qtype: int, shape: tuple[int, ...]) -> tuple[int, int]:
    """Validates raw against shape; returns (block_size, type_size)."""
    qtype = check_type(qtype)
    if raw.dtype != torch.uint8:
        raise TypeError(f"raw must be uint8 bytes, not {raw.dtype}")
    if not shape:
        raise ValueError("shape must have at least one dimension")
    block_size, type_size = GGML_QUANT_SIZES[T(qtype)]
    n = 1
    for s in shape:
        n *= s
    want = row_bytes(qtype, shape[-1]) * (n // shape[-1] if shape[-1] else 0)
    if raw.numel() != want:
        raise ValueError(f"{type_name(qtype)} {tuple(shape)} needs {want} bytes, got {raw.numel()}")
    return block_size, type_size


def aligned(raw: torch.Tensor) -> torch.Tensor:
    """raw, contiguous and at a 4-byte-aligned storage offset: viewing bytes as f16/f32
    needs it, and a slice of a buffer (a tensor inside a GGUF file) may lack it."""
    raw = raw.contiguous()
    return raw.clone() if raw.storage_offset() % 4 else raw


def dequantize_reference(raw: torch.Tensor, qtype: int, shape: tuple[int, ...]) -> torch.Tensor:
    """uint8 bytes (1-D or [rows, row_bytes]) -> float32 [*shape] on raw's device.

    shape is numpy order: the last dim is the contiguous one. Bit-exact equal to
    gguf.quants.dequantize of the same bytes.
    """
    _, type_size = check_layout(raw, qtype, shape)
    blocks = aligned(raw).reshape(-1, type_size)  # [n_blocks, type_size]
    return _BLOCKS[int(qtype)](blocks).reshape(shape)
