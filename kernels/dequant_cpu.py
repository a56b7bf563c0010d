"""Fast CPU dequantization through llama.cpp's own row routines, split over threads.

llama-cpp-python bundles libggml-base, which exports `dequantize_row_<type>(const void *x,
float *y, int64_t k)` and `ggml_bf16_to_fp32_row`: the very code llama.cpp runs, in C,
with the same float operation order as gguf's numpy code, and compiled without fused
multiply-adds (llama-cpp-python builds libggml-base for baseline x86-64), so the
results are bit-exact with the reference; tests/test_kernels_dequant.py checks it.
ctypes drops the GIL for the call, so a thread pool over block ranges scales with cores.

F16 and F32 go through torch's own cast instead: exact as well, and for F16 about 8x
faster than `ggml_fp16_to_fp32_row`, which that baseline build runs as a scalar bit
trick (no F16C instructions).

When the library or a symbol is missing (another llama-cpp-python build, a platform
without the bundled lib), `dequantize_cpu` quietly falls back to the torch reference:
same results, slower. `ggml_available()` says which one runs.
"""

from __future__ import annotations

import ctypes
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from gguf import GGMLQuantizationType as T

from .gguf_reference import aligned, check_layout, dequantize_reference

_SYMBOLS: dict[int, str] = {
    int(T.Q4_K): "dequantize_row_q4_K",
    int(T.Q5_K): "dequantize_row_q5_K",
    int(T.Q6_K): "dequantize_row_q6_K",
    int(T.Q8_0): "dequantize_row_q8_0",
    int(T.Q4_0): "dequantize_row_q4_0",
    int(T.BF16): "ggml_bf16_to_fp32_row",
}

# Types torch casts exactly and fast: no ggml call needed.
_TORCH_CASTS = {int(T.F16): torch.float16, int(T.F32): torch.float32}

# Below this many values per thread, starting threads costs more than it saves.
_MIN_VALUES_PER_THREAD = 1 << 16


def library_paths() -> list[Path]:
    """Candidate libggml-base files in llama_cpp's lib folder (no import of llama_cpp itself:
    that loads libllama and initializes the backends, which we do not need)."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return []
    found: list[Path] = []
    for folder in spec.submodule_search_locations:
        lib = Path(folder) / "lib"
        for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
            if (lib / name).exists():
                found.append(lib / name)
    return found


@functools.cache
def _functions() -> dict[int, ctypes._CFuncPtr]:
    """type id -> ctypes function, for the symbols the bundled library has ({} when none)."""
    for path in library_paths():
        try:
            lib = ctypes.CDLL(os.fspath(path))
        except OSError:
            continue
        fns = {}
        for qtype, symbol in _SYMBOLS.items():
            fn = getattr(lib, symbol, None)
            if fn is None:
                continue
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
            fn.restype = None
            fns[qtype] = fn
        return fns
    return {}


def ggml_available(qtype: int | None = None) -> bool:
    """Whether the fast path (ggml's routine, or torch's cast for F16/F32) runs for qtype,
    rather than the reference; without qtype, whether ggml's library was found at all."""
    fns = _functions()
    return bool(fns) if qtype is None else (int(qtype) in _TORCH_CASTS or int(qtype) in fns)


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    """One pool per thread count, kept: starting threads on every call would dominate small tensors."""
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="specrun-dequant")


def dequantize_cpu(
    raw: torch.Tensor,
    qtype: int,
    shape: tuple[int, ...],
    threads: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """uint8 bytes on the CPU (1-D or [rows, row_bytes]) -> float32 [*shape], via ggml's routines.

    threads defaults to torch.get_num_threads(); the blocks are split into that many
    contiguous ranges (F16/F32 use torch's intra-op threads instead). out, a contiguous float32 CPU tensor of shape, is written and
    returned: reusing one saves the page faults of a fresh large allocation, which here
    cost several times the dequantization itself (see kernels/README.md). Falls back to
    dequantize_reference when ggml's library or this type's symbol is missing (same
    values, slower).
    """
    block_size, type_size = check_layout(raw, qtype, shape)
    if raw.device.type != "cpu":
        raise ValueError(f"dequantize_cpu needs a CPU tensor, got one on {raw.device}")
    qtype = int(qtype)
    raw = aligned(raw)
    if out is not None and (out.shape != shape or out.dtype != torch.float32 or out.device.type != "cpu"
                            or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous float32 CPU tensor of shape {shape}")
    if qtype in _TORCH_CASTS:
        out = torch.empty(shape, dtype=torch.float32) if out is None else out
        return out.copy_(raw.view(_TORCH_CASTS[qtype]).reshape(shape))
    fn = _functions().get(qtype)
    if fn is None:
        values = dequantize_reference(raw, qtype, shape)
        return values if out is None else out.copy_(values)

    out = torch.empty(shape, dtype=torch.float32) if out is None else out
    n_blocks = raw.numel() // type_size
    threads = max(1, threads or torch.get_num_threads())
    threads = max(1, min(threads, n_blocks * block_size // _MIN_VALUES_PER_THREAD, n_blocks))
    src, dst = raw.data_ptr(), out.data_ptr()

    def run(first: int, last: int) -> None:  # block range [first, last)
        fn(src + first * type_size, dst + first * block_size * 4, (last - first) * block_size)

    if threads == 1:
        run(0, n_blocks)
        return out
    step = -(-n_blocks // threads)
    ranges = [(b, min(b + step, n_blocks)) for b in range(0, n_blocks, step)]
    # raw and out stay referenced in this frame until every range has finished.
    for f in [_pool(threads).submit(run, a, b) for a, b in ranges]:
        f.result()
    return out
