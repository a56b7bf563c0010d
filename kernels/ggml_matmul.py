"""Quantized matrix products on the CPU through llama.cpp's own ggml CPU backend, via ctypes.

The torch engine streams GGUF weights from disk each pass; dequantizing a matrix to
float32 before multiplying costs 10-20x the product itself. ggml multiplies the quantized
bytes as they are, exactly as llama.cpp does: it first quantizes the activations to the
weight type's dot-product partner (q8_K for the K types, q8_0 for Q4_0/Q8_0, f16 or bf16
for those), so results carry llama.cpp's rounding, not float32's (bounds in README.md).

ggml aborts the whole process on a failed assert instead of raising, so everything it
would assert (type, shapes, byte counts, contiguity, 32-byte alignment) is checked here
first and raised as an exception. Where the library or a symbol is missing, `matmul`
dequantizes and calls torch's linear instead: same contract, float32 numerics, slower.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from types import SimpleNamespace

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from .dequant import dequantize
from .dequant_cpu import library_paths
from .gguf_reference import SUPPORTED, check_layout

__all__ = ["aligned_empty", "available", "blocked_rows", "matmul"]

PROBE_ROWS = 48  # blocked_rows looks for ggml's switch of kernels below this many rows

# ggml_backend_cpu_buffer_from_ptr asserts this alignment (TENSOR_ALIGNMENT in ggml-impl.h).
GGML_ALIGNMENT = 32

_P, _I64, _SIZE, _INT, _BOOL = ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t, ctypes.c_int, ctypes.c_bool


class _InitParams(ctypes.Structure):
    """struct ggml_init_params, passed by value to ggml_init."""

    _fields_ = [("mem_size", _SIZE), ("mem_buffer", _P), ("no_alloc", _BOOL)]


# name -> (argtypes, restype), in libggml-base and libggml-cpu.
_BASE = {
    "ggml_init": ([_InitParams], _P),
    "ggml_free": ([_P], None),
    "ggml_new_tensor_2d": ([_P, _INT, _I64, _I64], _P),
    "ggml_mul_mat": ([_P, _P, _P], _P),
    "ggml_new_graph_custom": ([_P, _SIZE, _BOOL], _P),
    "ggml_build_forward_expand": ([_P, _P], None),
    "ggml_tensor_overhead": ([], _SIZE),
    "ggml_graph_overhead_custom": ([_SIZE, _BOOL], _SIZE),
    "ggml_blck_size": ([_INT], _I64),
    "ggml_type_size": ([_INT], _SIZE),
    "ggml_backend_cpu_buffer_from_ptr": ([_P, _SIZE], _P),
    "ggml_backend_tensor_alloc": ([_P, _P, _P], _INT),  # enum ggml_status: 0 is success
    "ggml_backend_buffer_free": ([_P], None),
    "ggml_backend_graph_compute": ([_P, _P], _INT),
    "ggml_quantize_chunk": ([_INT, _P, _P, _I64, _I64, _I64, _P], _SIZE),
}
_CPU = {
    "ggml_backend_cpu_init": ([], _P),
    "ggml_backend_cpu_set_n_threads": ([_P, _INT], None),
}

# ggml's context objects live in one reused buffer; the lock guards it and the backend.
_LOCK = threading.Lock()


def aligned_empty(nbytes: int, alignment: int = 4096) -> torch.Tensor:
    """Uninitialized uint8 CPU tensor [nbytes] whose data pointer is a multiple of alignment.

    ggml needs 32-byte aligned buffers and O_DIRECT reads page-aligned ones; torch's
    allocator promises neither. Over-allocates and slices: the view keeps the base alive.
    """
    if nbytes < 0 or alignment < 1:
        raise ValueError(f"need nbytes >= 0 and alignment >= 1, got {nbytes}, {alignment}")
    base = torch.empty(nbytes + alignment - 1, dtype=torch.uint8)  # [nbytes + alignment - 1]
    skip = -base.data_ptr() % alignment
    return base[skip : skip + nbytes]


def _bind(lib: ctypes.CDLL, signatures: dict) -> dict[str, ctypes._CFuncPtr]:
    """Named functions of lib with their C signatures; AttributeError when one is missing."""
    fns = {}
    for name, (argtypes, restype) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
        fns[name.removeprefix("ggml_")] = fn
    return fns


@functools.cache
def _ggml() -> SimpleNamespace | None:
    """The bound functions, one CPU backend and the context buffer; None without the library.

    Plain CDLL (not PyDLL), so every call, the compute included, runs without the GIL.
    """
    for base_path in library_paths():
        cpu_path = base_path.with_name(base_path.name.replace("ggml-base", "ggml-cpu"))
        try:  # libggml-cpu resolves its libggml-base symbols against the copy loaded first
            fns = _bind(ctypes.CDLL(os.fspath(base_path), mode=ctypes.RTLD_GLOBAL), _BASE)
            fns |= _bind(ctypes.CDLL(os.fspath(cpu_path), mode=ctypes.RTLD_GLOBAL), _CPU)
        except (OSError, AttributeError):
            continue
        g = SimpleNamespace(**fns)
        # Type ids are shared with gguf; a build whose block layouts differ is not used for that type.
        g.types = {q for q in SUPPORTED
                   if (g.blck_size(q), g.type_size(q)) == tuple(GGML_QUANT_SIZES[T(q)])}
        g.backend = g.backend_cpu_init()
        if not g.backend or not g.types:
            continue
        # Three tensors and a 4-node graph, no tensor data (no_alloc): a few KB, padded as ggml pads.
        g.ctx_bytes = -(-(3 * g.tensor_overhead() + g.graph_overhead_custom(4, False) + 1024) // 64) * 64
        g.ctx_mem = aligned_empty(g.ctx_bytes, 64)
        return g
    return None


def available(qtype: int | None = None) -> bool:
    """Whether ggml's CPU product runs (for qtype, when given), rather than the dequantize fallback."""
    g = _ggml()
    return g is not None and (qtype is None or int(qtype) in g.types)


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % GGML_ALIGNMENT == 0


def _check(raw: torch.Tensor, qtype: int, shape: tuple[int, int], x: torch.Tensor,
           out: torch.Tensor | None) -> tuple[int, int, int]:
    """Everything ggml would assert on, as exceptions; returns (n, n_out, n_in)."""
    if len(shape) != 2:
        raise ValueError(f"shape must be (n_out, n_in), got {tuple(shape)}")
    n_out, n_in = int(shape[0]), int(shape[1])
    check_layout(raw, qtype, (n_out, n_in))  # uint8, supported type, block multiple, byte count
    if raw.device.type != "cpu" or not raw.is_contiguous() or raw.dim() > 2 or (
            raw.dim() == 2 and raw.shape[0] != n_out):
        raise ValueError(f"raw must be contiguous CPU bytes, 1-D or [{n_out}, row_bytes], "
                         f"got {tuple(raw.shape)} on {raw.device}")
    if raw.numel() and not _aligned(raw):
        raise ValueError(f"raw must start at a {GGML_ALIGNMENT}-byte aligned address (it is "
                         f"{raw.data_ptr() % GGML_ALIGNMENT} past one): read weights into aligned_empty()")
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != n_in or x.device.type != "cpu":
        raise ValueError(f"x must be a float32 CPU tensor [n, {n_in}], got {x.dtype} "
                         f"{tuple(x.shape)} on {x.device}")
    n = x.shape[0]
    if out is not None and (out.dtype != torch.float32 or out.shape != (n, n_out) or out.device.type != "cpu"
                            or not out.is_contiguous() or (out.numel() and not _aligned(out))):
        raise ValueError(f"out must be a contiguous, {GGML_ALIGNMENT}-byte aligned float32 CPU tensor "
                         f"[{n}, {n_out}], got {out.dtype} {tuple(out.shape)}")
    return n, n_out, n_in


def matmul(raw: torch.Tensor, qtype: int, shape: tuple[int, int], x: torch.Tensor,
           out: torch.Tensor | None = None, threads: int | None = None) -> torch.Tensor:
    """x @ W^T as llama.cpp computes it: float32 x [n, n_in] -> float32 [n, n_out].

    raw: the GGUF bytes of W, uint8 on the CPU, 1-D or [n_out, row_bytes], 32-byte
    aligned (ValueError otherwise: copying a large weight silently would hide a bug
    upstream). shape: numpy order (n_out, n_in). x is copied when not contiguous or
    not aligned. out (contiguous, aligned, float32 [n, n_out]) is written and returned.
    threads defaults to torch.get_num_threads(). Without ggml: dequantize + linear.
    """
    n, n_out, n_in = _check(raw, qtype, shape, x, out)
    threads = torch.get_num_threads() if threads is None else int(threads)
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    g, qtype = _ggml(), int(qtype)
    if g is None or qtype not in g.types:
        w = dequantize(raw, qtype, (n_out, n_in))  # [n_out, n_in] float32
        return torch.nn.functional.linear(x, w) if out is None else torch.matmul(x, w.t(), out=out)
    if out is None:
        out = aligned_empty(n * n_out * 4, 64).view(torch.float32).view(n, n_out)  # [n, n_out]
    if n == 0 or n_out == 0 or n_in == 0:  # ggml has no use for empty tensors
        return out.zero_()
    if not x.is_contiguous() or not _aligned(x):
        x = aligned_empty(n * n_in * 4, 64).view(torch.float32).view(n, n_in).copy_(x)  # [n, n_in]
    with _LOCK:
        g.backend_cpu_set_n_threads(g.backend, threads)
        ctx = g.init(_InitParams(g.ctx_bytes, g.ctx_mem.data_ptr(), True))
        if not ctx:
            raise RuntimeError("ggml_init failed")
        buffers = []
        try:
            w_t = g.new_tensor_2d(ctx, qtype, n_in, n_out)  # ne0 = n_in: one row of W per output
            x_t = g.new_tensor_2d(ctx, int(T.F32), n_in, n)  # ne0 = n_in, ne1 = n
            y_t = g.mul_mat(ctx, w_t, x_t)  # ne0 = n_out, ne1 = n: row-major [n, n_out]
            graph = g.new_graph_custom(ctx, 4, False)
            g.build_forward_expand(graph, y_t)
            for tensor, memory in ((w_t, raw), (x_t, x), (y_t, out)):
                ptr, nbytes = memory.data_ptr(), memory.numel() * memory.element_size()
                buffers.append(g.backend_cpu_buffer_from_ptr(ptr, nbytes))
                if not buffers[-1] or g.backend_tensor_alloc(buffers[-1], tensor, ptr) != 0:
                    raise RuntimeError("ggml could not place a tensor in caller memory")
            status = g.backend_graph_compute(g.backend, graph)  # the GIL is released here
        finally:
            for buffer in buffers:
                if buffer:
                    g.backend_buffer_free(buffer)
            g.free(ctx)
    if status != 0:
        raise RuntimeError(f"ggml graph compute failed (status {status})")
    return out


@functools.cache
def blocked_rows() -> int:
    """The fewest activation rows from which every row of a quantized product comes out as it
    does among any other rows: padded to this many, a token's row is the same in a pass of one
    token as in a pass of hundreds (the torch engine's --exact). ggml multiplies a few rows one
    dot product at a time and more in blocked kernels that round otherwise, switching at a size
    that depends on the type and the CPU (8 for the K types on the 2-core EPYC, where Q8_0
    and Q4_0 never switch; 17 on an earlier machine), so it is measured, once a process:
    per type, products of 1 to PROBE_ROWS - 1 rows against the first rows of PROBE_ROWS'.
    1 without ggml (the fallback's float32 products are torch's)."""
    g = _ggml()
    if g is None:
        return 1
    gen = torch.Generator().manual_seed(0)
    n_out, n_in = 64, 512
    w = torch.randn(n_out, n_in, generator=gen)  # [n_out, n_in]
    x = torch.randn(PROBE_ROWS, n_in, generator=gen)  # [PROBE_ROWS, n_in]
    most = 1
    for qtype in sorted(t for t in g.types if t not in (int(T.F32), int(T.F16), int(T.BF16))):
        block, size = GGML_QUANT_SIZES[T(qtype)]
        raw = aligned_empty(n_out * n_in // block * size, 64)
        if g.quantize_chunk(qtype, w.data_ptr(), raw.data_ptr(), 0, n_out, n_in, None) != raw.numel():
            continue
        full = matmul(raw, qtype, (n_out, n_in), x, threads=1)
        rows = PROBE_ROWS
        while rows > 1 and torch.equal(matmul(raw, qtype, (n_out, n_in), x[:rows - 1], threads=1), full[:rows - 1]):
            rows -= 1
        most = max(most, rows if rows < PROBE_ROWS else 1)  # no switch below PROBE_ROWS: none to pin
    return most
