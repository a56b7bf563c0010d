"""Triton dequantization of GGUF blocks on CUDA, writing bf16/f16/f32 straight from the bytes.

One program handles a group of whole blocks: it loads each block's f16 scales once,
decodes the packed scale bytes into a [blocks, sub-blocks] tile, and loads the quant
bytes as [blocks, sub-blocks, 32] tiles whose last dim is contiguous in memory (so
loads and stores vectorize). Values are computed in float32 in gguf's order
((d * sc) * q - dmin * m), compiled without fused multiply-adds
(enable_fp_fusion=False), so float32 output is bit-exact with the reference and
bf16/f16 output is the reference rounded to nearest even. F16/BF16/F32 tensors go
through one elementwise cast kernel.

Triton is imported under a guard: on a machine without it (CPU-only) this module still
imports and `available()` is False.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from gguf import GGMLQuantizationType as T

from .gguf_reference import aligned, check_layout, type_name

try:  # Triton ships with CUDA builds of torch only.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None

_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def available() -> bool:
    """Whether the Triton kernels can run here (Triton importable and a CUDA device present)."""
    return triton is not None and torch.cuda.is_available()


if triton is not None:

    @triton.jit
    def _k_scale_min(raw, base, sb, ok):
        """Packed 6-bit scale and min of sub-block sb (tile of ids 0..7) from the 12 bytes at base."""
        lo = sb < 4
        a = tl.load(raw + base + sb, mask=ok, other=0).to(tl.int32)  # s[sb]
        b = tl.load(raw + base + sb + 4, mask=ok, other=0).to(tl.int32)  # s[sb + 4]
        c = tl.load(raw + base + tl.where(lo, sb, sb - 4), mask=ok, other=0).to(tl.int32)  # s[sb - 4]
        sc = tl.where(lo, a & 63, (b & 15) | ((c >> 6) << 4))
        m = tl.where(lo, b & 63, (b >> 4) | ((a >> 6) << 4))
        return sc, m

    @triton.jit
    def _q4_k_kernel(raw, half, out, n_blocks, BLOCKS: tl.constexpr):
        # block: f16 d, f16 dmin, 12 scale bytes, 128 nibble bytes (144 bytes = 72 halves)
        blk = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)  # [B]
        ok2 = (blk < n_blocks)[:, None]  # [B, 1]
        b2 = blk[:, None]
        d = tl.load(half + b2 * 72, mask=ok2, other=0.0).to(tl.float32)  # [B, 1]
        dmin = tl.load(half + b2 * 72 + 1, mask=ok2, other=0.0).to(tl.float32)
        sc, m = _k_scale_min(raw, b2 * 144 + 4, tl.arange(0, 8)[None, :], ok2)  # [B, 8]
        scale = (d * sc.to(tl.float32))[:, :, None]  # [B, 8, 1]
        mins = (dmin * m.to(tl.float32))[:, :, None]
        b3 = blk[:, None, None]
        ok3 = ok2[:, :, None]
        sb = tl.arange(0, 8)[None, :, None]
        lane = tl.arange(0, 32)[None, None, :]
        # sub-block sb: low (even sb) or high (odd sb) nibbles of bytes 32*(sb//2) .. +32
        q = tl.load(raw + b3 * 144 + 16 + (sb // 2) * 32 + lane, mask=ok3, other=0).to(tl.int32)
        q = (q >> ((sb % 2) * 4)) & 15  # [B, 8, 32]
        y = scale * q.to(tl.float32) - mins
        tl.store(out + b3 * 256 + sb * 32 + lane, y.to(out.dtype.element_ty), mask=ok3)

    @triton.jit
    def _q5_k_kernel(raw, half, out, n_blocks, BLOCKS: tl.constexpr):
        # block: f16 d, f16 dmin, 12 scale bytes, 32 qh bytes, 128 nibble bytes (176 bytes = 88 halves)
        blk = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
        ok2 = (blk < n_blocks)[:, None]
        b2 = blk[:, None]
        d = tl.load(half + b2 * 88, mask=ok2, other=0.0).to(tl.float32)
        dmin = tl.load(half + b2 * 88 + 1, mask=ok2, other=0.0).to(tl.float32)
        sc, m = _k_scale_min(raw, b2 * 176 + 4, tl.arange(0, 8)[None, :], ok2)
        scale = (d * sc.to(tl.float32))[:, :, None]
        mins = (dmin * m.to(tl.float32))[:, :, None]
        b3 = blk[:, None, None]
        ok3 = ok2[:, :, None]
        sb = tl.arange(0, 8)[None, :, None]
        lane = tl.arange(0, 32)[None, None, :]
        q = tl.load(raw + b3 * 176 + 48 + (sb // 2) * 32 + lane, mask=ok3, other=0).to(tl.int32)
        q = (q >> ((sb % 2) * 4)) & 15
        qh = tl.load(raw + b3 * 176 + 16 + lane, mask=ok3, other=0).to(tl.int32)  # [B, 1, 32]
        q = q | (((qh >> sb) & 1) << 4)  # bit sb of qh[lane] is bit 4
        y = scale * q.to(tl.float32) - mins
        tl.store(out + b3 * 256 + sb * 32 + lane, y.to(out.dtype.element_ty), mask=ok3)

    @triton.jit
    def _q6_k_kernel(raw, half, out, n_blocks, BLOCKS: tl.constexpr):
        # block: 128 ql bytes, 64 qh bytes, 16 int8 scales, f16 d (210 bytes = 105 halves)
        blk = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
        ok2 = (blk < n_blocks)[:, None]
        d = tl.load(half + blk[:, None] * 105 + 104, mask=ok2, other=0.0).to(tl.float32)[:, :, None]
        b3 = blk[:, None, None]
        ok3 = ok2[:, :, None]
        g = tl.arange(0, 8)[None, :, None]  # group of 32 values: half h = g // 4, k = g % 4
        lane = tl.arange(0, 32)[None, None, :]
        h = g // 4
        k = g % 4
        ql = tl.load(raw + b3 * 210 + h * 64 + (k % 2) * 32 + lane, mask=ok3, other=0).to(tl.int32)
        ql = (ql >> ((k // 2) * 4)) & 15
        qh = tl.load(raw + b3 * 210 + 128 + h * 32 + lane, mask=ok3, other=0).to(tl.int32)
        qh = (qh >> (k * 2)) & 3
        q = (ql | (qh << 4)) - 32  # [B, 8, 32]
        sc = tl.load(raw + b3 * 210 + 192 + g * 2 + lane // 16, mask=ok3, other=0)
        sc = sc.to(tl.int8, bitcast=True).to(tl.float32)  # scale of each 16 values
        y = (d * sc) * q.to(tl.float32)
        tl.store(out + b3 * 256 + g * 32 + lane, y.to(out.dtype.element_ty), mask=ok3)

    @triton.jit
    def _q8_0_kernel(raw, half, out, n_blocks, BLOCKS: tl.constexpr):
        # block: f16 d, 32 int8 (34 bytes = 17 halves)
        blk = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
        ok2 = (blk < n_blocks)[:, None]
        b2 = blk[:, None]
        lane = tl.arange(0, 32)[None, :]
        d = tl.load(half + b2 * 17, mask=ok2, other=0.0).to(tl.float32)  # [B, 1]
        q = tl.load(raw + b2 * 34 + 2 + lane, mask=ok2, other=0).to(tl.int8, bitcast=True)
        y = q.to(tl.float32) * d
        tl.store(out + b2 * 32 + lane, y.to(out.dtype.element_ty), mask=ok2)

    @triton.jit
    def _q4_0_kernel(raw, half, out, n_blocks, BLOCKS: tl.constexpr):
        # block: f16 d, 16 bytes: value j is the low nibble of byte j, value 16+j the high one (18 bytes = 9 halves)
        blk = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
        ok3 = (blk < n_blocks)[:, None, None]
        b3 = blk[:, None, None]
        hi = tl.arange(0, 2)[None, :, None]
        lane = tl.arange(0, 16)[None, None, :]
        d = tl.load(half + b3 * 9, mask=ok3, other=0.0).to(tl.float32)  # [B, 1, 1]
        q = tl.load(raw + b3 * 18 + 2 + lane, mask=ok3, other=0).to(tl.int32)  # [B, 1, 16]
        q = ((q >> (hi * 4)) & 15) - 8  # [B, 2, 16]
        y = d * q.to(tl.float32)
        tl.store(out + b3 * 32 + hi * 16 + lane, y.to(out.dtype.element_ty), mask=ok3)

    @triton.jit
    def _cast_kernel(src, out, n, BLOCK: tl.constexpr):
        # F16/BF16/F32 values -> out's dtype through float32 (exact widening, then one rounding)
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = i < n
        tl.store(out + i, tl.load(src + i, mask=ok).to(tl.float32).to(out.dtype.element_ty), mask=ok)

    # type id -> (kernel, blocks per program, warps): 2048-4096 values per program. Picked
    # on an H100 over 2-128 blocks x 2-8 warps; these run at 2.3-2.9 TB/s (bytes read +
    # written) on a 16384x8192 matrix, where the others were at most a few % faster.
    _KERNELS = {
        int(T.Q4_K): (_q4_k_kernel, 8, 4),
        int(T.Q5_K): (_q5_k_kernel, 16, 2),
        int(T.Q6_K): (_q6_k_kernel, 16, 2),
        int(T.Q8_0): (_q8_0_kernel, 64, 4),
        int(T.Q4_0): (_q4_0_kernel, 64, 4),
    }


def _float_values(raw: torch.Tensor, qtype: int, out: torch.Tensor) -> torch.Tensor:
    """F16/BF16/F32: a reinterpretation and one cast into out (exact widening, or one
    rounding of the exact value: the same as reference.to(dtype)); never aliases raw.

    A Triton cast where Triton is there: torch's f16 -> bf16 copy ran at 1.4 TB/s on an
    H100, this at about 2.8."""
    src = raw.view({int(T.F16): torch.float16, int(T.BF16): torch.bfloat16, int(T.F32): torch.float32}[qtype])
    if triton is None:
        return out.copy_(src.reshape(out.shape))
    block = 4096
    _cast_kernel[(triton.cdiv(src.numel(), block),)](src, out, src.numel(), BLOCK=block, num_warps=8)
    return out


def dequantize_triton(
    raw: torch.Tensor,
    qtype: int,
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.bfloat16,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """uint8 bytes on CUDA (1-D or [rows, row_bytes]) -> dtype [*shape] on the same device.

    out, a contiguous dtype tensor of shape on raw's device, is written and returned when given.
    """
    _, type_size = check_layout(raw, qtype, shape)
    qtype = int(qtype)
    if not raw.is_cuda:
        raise ValueError(f"dequantize_triton needs a CUDA tensor, got one on {raw.device}")
    if dtype not in _OUT_DTYPES:
        raise ValueError(f"output dtype must be one of {_OUT_DTYPES}, not {dtype}")
    raw = aligned(raw).reshape(-1)  # the f16/f32 views below need it
    if out is not None and (out.shape != shape or out.dtype != dtype or out.device != raw.device
                            or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {shape} on {raw.device}")
    out = torch.empty(shape, dtype=dtype, device=raw.device) if out is None else out
    if raw.numel() == 0:
        return out
    # Triton launches on the current device: switch only when raw lives elsewhere (the switch costs µs).
    switch = torch.cuda.device(raw.device) if raw.device.index != torch.cuda.current_device() else nullcontext()
    with switch:
        if qtype in (int(T.F16), int(T.BF16), int(T.F32)):
            return _float_values(raw, qtype, out)
        if triton is None:
            raise RuntimeError(f"Triton is not installed: cannot dequantize {type_name(qtype)} on CUDA with it")
        kernel, blocks, warps = _KERNELS[qtype]
        n_blocks = raw.numel() // type_size
        grid = (triton.cdiv(n_blocks, blocks),)
        kernel[grid](raw, raw.view(torch.float16), out, n_blocks, BLOCKS=blocks, num_warps=warps,
                     enable_fp_fusion=False)
    return out

