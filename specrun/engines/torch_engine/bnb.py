"""Matrices quantized by bitsandbytes as safetensors weights load (--quant nf4, fp4, int8).

bitsandbytes is imported here only, quietly and without specrun's own kernels/
folder in its way (`import_bitsandbytes`). Each quantized matrix dequantizes or
multiplies through bitsandbytes' own routines; on a CPU without its fused
kernels, 4-bit matrices are dequantized, cast to the compute dtype and multiplied.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from specrun.engines.torch_engine.weights import tensor_bytes
from specrun.errors import EngineError

INT8_THRESHOLD = 6.0  # LLM.int8(): activation columns beyond this stay in float (bitsandbytes' default)

BLOCKSIZE = 64  # bitsandbytes 4-bit block: one absmax per 64 weights


def _own_kernels() -> Path | None:
    """Where specrun.kernels lives: the checkout's kernels/ folder, or specrun/kernels in a wheel."""
    try:
        spec = importlib.util.find_spec("specrun.kernels")
    except (ImportError, ValueError):
        return None
    return Path(spec.origin).resolve().parent if spec is not None and spec.origin else None


def import_bitsandbytes() -> Any:
    """bitsandbytes, imported quietly and without our `kernels/` folder in its way.

    On CPUs with AVX-512 BF16, importing bitsandbytes runs `from kernels import get_kernel`
    to fetch an optional faster 4-bit kernel through Hugging Face's `kernels` package, and
    logs a warning when that fails. In a source checkout the repository root is on sys.path
    (pytest, `python -m specrun`), so that import finds our top-level kernels/ folder (which
    wheels ship as specrun.kernels) instead. Where `kernels` resolves to our folder, and only
    then, the import runs with `sys.modules["kernels"] = None`, which makes `import kernels`
    raise ImportError: bitsandbytes sees exactly what an installed specrun shows it when the
    optional package is absent, and uses its own CPU kernels. An installed `kernels` package
    that our folder does not shadow is left alone. The warning about the missing optional
    package is silenced for the import only: specrun chooses its kernels itself.
    """
    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]
    saved = sys.modules.get("kernels")
    try:
        spec = importlib.util.find_spec("kernels")
    except (ImportError, ValueError):
        spec = None
    shadowed = spec is not None and spec.origin is not None and Path(spec.origin).resolve().parent == _own_kernels()
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = logger.level
    logger.setLevel(logging.ERROR)
    if shadowed:
        sys.modules["kernels"] = None  # type: ignore[assignment]
    try:
        import bitsandbytes
    except ImportError as e:
        from specrun.engines.placement import INSTALL_TORCH

        raise EngineError(f"--quant needs bitsandbytes ({e})", hint=INSTALL_TORCH) from None
    finally:
        logger.setLevel(level)
        if shadowed:
            if saved is None:
                sys.modules.pop("kernels", None)
            else:
                sys.modules["kernels"] = saved
    return bitsandbytes


@dataclass
class Bnb4bitLinear:
    """A matrix quantized to 4 bits (nf4 or fp4, blocks of 64) by bitsandbytes at load.

    On a CPU with AVX-512 BF16 the codes are repacked into bitsandbytes' CPU layout, whose fused kernel
    reads 4-bit weights directly; elsewhere on a CPU dequantize, then a dense matmul; on CUDA matmul_4bit.
    Measured (bf16, medians): on the 2-core EPYC here the fused kernel took 0.06 ms against 0.44-0.54
    for dequantize + F.linear at 2048x2048 and 1 row, and 0.8 against 1.0 ms at 64 rows (8192x2048: 0.2
    against 9.6 ms, 3.2 against 11.6); on an H100, matmul_4bit took 0.054 ms against 0.077-0.120 for
    dequantize + F.linear at 1 row (4096x4096, 14336x4096) and the same at 64 rows."""

    codes: torch.Tensor  # uint8 packed 4-bit codes
    state: Any  # bitsandbytes QuantState (absmax [n_out * n_in / 64], shape, dtype)
    bias: torch.Tensor | None = None  # [n_out] in the compute dtype
    _matmul: Any = None  # bitsandbytes.matmul_4bit, looked up once

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None, quant_type: str) -> "Bnb4bitLinear":
        """From a dense [n_out, n_in] matrix on its device, in the compute dtype."""
        bnbf = import_bitsandbytes().functional
        codes, state = bnbf.quantize_4bit(weight.contiguous(), blocksize=BLOCKSIZE, quant_type=quant_type)
        n_out, n_in = weight.shape
        pack = getattr(bnbf, "_convert_weight_packed_for_cpu", None)  # what bnb's Linear4bit does in eval
        if (weight.device.type == "cpu" and pack is not None and bnbf.has_avx512bf16()
                and n_out % 32 == 0 and n_in % BLOCKSIZE == 0):
            codes, state = pack(codes, state)
        return cls(codes, state, bias, import_bitsandbytes().matmul_4bit)

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.codes, self.state.absmax, self.bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # [n, n_in]
        if x2.device.type == "cpu" and not getattr(self.state, "packing_format_for_cpu", False):
            # bitsandbytes' own path trusts its dequantization's dtype: float32 whatever was asked on an AVX2 EPYC
            w = import_bitsandbytes().functional.dequantize_4bit(self.codes, self.state)  # [n_out, n_in]
            y = torch.nn.functional.linear(x2, w.to(x2.dtype), None if self.bias is None else self.bias.to(x2.dtype))
        else:
            y = self._matmul(x2, self.codes.t(), self.state, bias=self.bias)  # [n, n_out]
        return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


@dataclass
class Bnb8bitLinear:
    """A matrix quantized to int8 per row (LLM.int8(), bitsandbytes' vectorwise quantization):
    each call quantizes the activations per row too, multiplies in int8 (torch._int_mm on
    AVX-512 CPUs), and keeps activation columns beyond INT8_THRESHOLD in float."""

    cb: torch.Tensor  # int8 [n_out, n_in]
    scb: torch.Tensor  # float32 [n_out]: each row's absmax
    bias: torch.Tensor | None = None

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> "Bnb8bitLinear":
        bnbf = import_bitsandbytes().functional
        w = weight.to(torch.float16) if weight.device.type == "cuda" else weight.float()  # CUDA's kernel takes f16
        cb, scb, _ = bnbf.int8_vectorwise_quant(w.contiguous())
        return cls(cb, scb, bias)

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.cb, self.scb, self.bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        bnbf = import_bitsandbytes().functional
        a = x.reshape(-1, x.shape[-1])  # [n, n_in]
        # The quantizer zeroes outliers in place for a moment: it gets a copy (or CUDA's f16 one).
        a = a.to(torch.float16) if a.device.type == "cuda" else a.clone()
        ca, sca, outliers = bnbf.int8_vectorwise_quant(a, threshold=INT8_THRESHOLD)
        bias = None if self.bias is None else self.bias.to(a.dtype)
        y, _ = torch.ops.bitsandbytes.int8_mixed_scaled_mm(a, ca, self.cb, sca, self.scb, outliers, bias)
        return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


_INT8_CHECKED: set[str] = set()


def check_int8(device: torch.device) -> None:
    """Once per device: bitsandbytes' int8 path runs here and agrees with a float matmul, or a
    one-line EngineError (some builds lack an int8 kernel for some devices)."""
    if device.type in _INT8_CHECKED:
        return
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(64, 128, generator=gen), torch.randn(3, 128, generator=gen)
    try:
        got = Bnb8bitLinear.quantize(w.to(device), None)(x.to(device)).float().cpu()
        err = ((got - x @ w.T).abs().max() / (x @ w.T).abs().max()).item()
    except Exception as e:  # any failure of the library means: this device has no int8 path
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise EngineError(f"bitsandbytes int8 does not run on this {device.type}: {why}",
                          hint="use --quant nf4 or --quant fp4") from None
    if not err < 0.05:
        raise EngineError(f"bitsandbytes int8 gives wrong results on this {device.type} (relative error {err:.2g})",
                          hint="use --quant nf4 or --quant fp4")
    _INT8_CHECKED.add(device.type)
