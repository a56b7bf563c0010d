"""How the torch engine runs a model, and the choices it makes when not told."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specrun.engines.host_cpu import cpu_flags
from specrun.errors import UsageError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class OffloadConfig:
    """Where the weights live between passes. `none`: on the device. `ram` (GPU): pinned host
    memory, streamed to a few device slots each pass. `disk`: the model file, read each pass."""

    mode: str = "none"
    ram: int | None = None  # bytes of RAM for weight buffers; None: see streamed.plan_residency
    gpu_memory: int | None = None  # bytes of GPU memory for weights (ram mode); None: what is free
    slots: int | None = None  # buffers streamed units are read or copied into ahead of the compute; None:
    # disk: enough for READ_AHEAD bytes (the next pass's first layers load while the draft model
    # works); ram: 3 (copies are fast, and GPU memory is better spent on resident layers)
    readers: int = 4  # threads reading the disk (disk mode)


@dataclass(frozen=True)
class TorchConfig:
    device: str = "cpu"  # "cpu", "cuda", "cuda:N"
    dtype: str | None = None  # compute dtype (a DTYPES key); None: chosen for the device
    threads: int | None = None  # CPU threads; None: every core
    quant: str | None = None  # safetensors directories: quantize at load to nf4, fp4 or int8
    max_tree_nodes: int = 0  # the largest tree the caller will verify in one pass
    offload: OffloadConfig = OffloadConfig()
    exact: bool = False  # --exact: rows as a pass of their token alone would give them (model.Transformer)


def resolve_device(name: str) -> torch.device:
    """The torch device, checked: a one-line error where CUDA is asked for and missing."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device '{name}'", hint="use --device cpu or --device cuda") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("no CUDA device: this torch build or machine has no GPU it can use",
                             hint="use --device cpu, or install a CUDA build of torch")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"no CUDA device {device.index} (this machine has {torch.cuda.device_count()})")
    elif device.type != "cpu":
        raise UsageError(f"the torch engine runs on cpu or cuda, not '{name}'")
    return device


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX): there bf16 matrices
    run at about twice the speed of float32 (one pass reads half the bytes); elsewhere bf16
    is emulated and slower than float32."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """The compute dtype: as asked (the memory plan asks for bfloat16 on a CPU where float32
    weights would take more than half the memory it may use: see `cpu_dtype_for`), else
    bfloat16 on a GPU and float32 on a CPU. Measured on the 1.5B default target: bf16
    weights moved its top-2 logit margins 3-6x more than llama.cpp's own rounding does
    (p95 0.5-1.4 against 0.2), so float32 is what keeps the output llama.cpp's, and bf16
    (about 1.7x faster where the CPU has AVX-512 BF16) is for models float32 would not fit."""
    if name is not None:
        if name not in DTYPES:
            raise UsageError(f"unknown dtype '{name}'", hint=f"use one of: {', '.join(DTYPES)}")
        return DTYPES[name]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def cpu_dtype_for(float32_bytes: int, budget: int) -> str:
    """The CPU compute dtype for weights of `float32_bytes` in float32 under a memory budget:
    float32 while they take at most half of it, else bfloat16 where the CPU multiplies it."""
    if float32_bytes <= budget // 2 or not cpu_has_bf16():
        return "float32"
    return "bfloat16"
