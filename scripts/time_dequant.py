"""Times GGUF dequantization on each path this machine has, in G weights/s (10^9 values out per second).

Paths: the torch reference on the CPU, ggml's C routines on the CPU with 1 and N threads
(into a fresh output, and into a reused one: "reuse" leaves out the page faults of a
fresh large allocation, which dominate on some machines), and where CUDA is present the Triton kernels (bf16 and f32 output) and the torch
reference on the GPU. Each figure is the median of several runs after a warm-up;
CUDA runs are bracketed by torch.cuda.synchronize(), so they include the host's cost of
one call; a second table gives the GPU time alone.

    .venv/bin/python scripts/time_dequant.py [--rows 4096 --cols 4096 --runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from specrun.kernels import dequant_cpu, dequant_triton
from specrun.kernels.dequant_cpu import dequantize_cpu
from specrun.kernels.dequant_triton import dequantize_triton
from specrun.kernels.gguf_reference import SUPPORTED, dequantize_reference

# Byte offsets of f16 scales in a block: set to sane values so no path sees NaN or inf.
F16_FIELDS = {T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,), T.Q8_0: (0,), T.Q4_0: (0,)}


def make_bytes(qtype: T, rows: int, cols: int) -> torch.Tensor:
    """[rows, row_bytes] uint8 of random but finite blocks."""
    rng = np.random.default_rng(0)
    if qtype in F16_FIELDS:
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        blocks = rng.integers(0, 256, size=(rows, cols // block_size, type_size), dtype=np.uint8)
        for offset in F16_FIELDS[qtype]:
            scale = rng.uniform(-0.01, 0.01, size=blocks.shape[:2]).astype(np.float16)
            blocks[:, :, offset : offset + 2] = scale[..., None].view(np.uint8)
        return torch.from_numpy(blocks.reshape(rows, -1))
    x = torch.from_numpy(rng.standard_normal((rows, cols), dtype=np.float32))
    values = {T.F32: x, T.F16: x.half(), T.BF16: x.bfloat16()}[qtype]
    return values.contiguous().view(torch.uint8)


def median_seconds(fn: Callable[[], object], runs: int, cuda: bool) -> float:
    fn()  # warm-up: compiles kernels, allocates pools
    times = []
    for _ in range(runs):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gpu_seconds(fn: Callable[[], object], runs: int) -> float:
    """Median GPU time of fn from CUDA events, without the host's launch cost: a 256 MB memset
    before each run evicts L2 and keeps the GPU busy while the host prepares the launch."""
    for _ in range(10):  # warm-up, and time for the GPU's clocks to rise after the CPU rows
        fn()
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    events = []
    for _ in range(runs):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events) / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per CPU figure (CUDA: 4x as many)")
    args = parser.parse_args()
    rows, cols, n = args.rows, args.cols, args.rows * args.cols
    threads = torch.get_num_threads()
    cuda = torch.cuda.is_available()

    buffer = torch.empty(rows, cols)
    paths: list[tuple[str, bool, Callable[[torch.Tensor, int], object]]] = [
        ("ref cpu", False, lambda raw, q: dequantize_reference(raw, q, (rows, cols))),
        ("ggml x1", False, lambda raw, q: dequantize_cpu(raw, q, (rows, cols), threads=1)),
        (f"ggml x{threads}", False, lambda raw, q: dequantize_cpu(raw, q, (rows, cols), threads=threads)),
        ("ggml x1 reuse", False, lambda raw, q: dequantize_cpu(raw, q, (rows, cols), threads=1, out=buffer)),
        (f"ggml x{threads} reuse", False,
         lambda raw, q: dequantize_cpu(raw, q, (rows, cols), threads=threads, out=buffer)),
    ]
    if dequant_triton.available():
        paths += [
            ("triton bf16", True, lambda raw, q: dequantize_triton(raw, q, (rows, cols), torch.bfloat16)),
            ("triton f32", True, lambda raw, q: dequantize_triton(raw, q, (rows, cols), torch.float32)),
        ]
    if cuda:
        paths.append(("ref cuda", True, lambda raw, q: dequantize_reference(raw, q, (rows, cols))))

    device = torch.cuda.get_device_name() if cuda else "no CUDA device"
    print(f"{rows}x{cols} weights; {threads} torch threads; {device}; "
          f"ggml routines {'found' if dequant_cpu.ggml_available() else 'MISSING (reference fallback)'}")
    print("G weights/s, median of runs after a warm-up")
    print(f"{'type':<6}" + "".join(f"{name:>16}" for name, _, _ in paths))
    for qtype, name in SUPPORTED.items():
        raw_cpu = make_bytes(T(qtype), rows, cols)
        raw_gpu = raw_cpu.cuda() if cuda else None
        cells = []
        for _, on_gpu, fn in paths:
            raw = raw_gpu if on_gpu else raw_cpu
            seconds = median_seconds(lambda: fn(raw, qtype), args.runs * (4 if on_gpu else 1), on_gpu)
            cells.append(f"{n / seconds / 1e9:16.2f}")
        print(f"{name:<6}" + "".join(cells), flush=True)

    gpu_paths = [(name, fn) for name, on_gpu, fn in paths if on_gpu]
    if not gpu_paths:
        return
    print("\nCUDA kernel time alone (CUDA events, L2 flushed, no host launch cost): G weights/s")
    print(f"{'type':<6}" + "".join(f"{name:>16}" for name, _ in gpu_paths))
    for qtype, name in SUPPORTED.items():
        raw = make_bytes(T(qtype), rows, cols).cuda()
        cells = [f"{n / gpu_seconds(lambda: fn(raw, qtype), args.runs * 4) / 1e9:16.2f}" for _, fn in gpu_paths]
        print(f"{name:<6}" + "".join(cells), flush=True)


if __name__ == "__main__":
    main()
