"""specrun's own engine on torch: GGUF files and safetensors directories, on a CPU or a GPU.

Modules: `arch` (what a model is), `weights` (how its matrices are stored and
the GGUF loader), `safetensors` and `hf_vocab` (Hugging Face directories),
`model` (the forward pass), `cache` (the KV cache), `engine` (the contract).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from specrun.engines.torch_engine.config import OffloadConfig, TorchConfig, cpu_dtype_for
from specrun.engines.torch_engine.engine import TorchEngine


def planned_weight_bytes(path: Path, config: TorchConfig) -> int:
    """Memory the weights would take loaded resident with `config`, read from the file's header
    (nothing is loaded): on a CPU a GGUF's matrices are dequantized to the compute dtype, on
    a GPU they keep their blocks. (Streamed placements' buffers are the memory plan's.)"""
    import torch

    from specrun.engines.torch_engine.config import resolve_dtype

    device = torch.device(config.device)
    bytes_at = _weight_bytes(path, device, config.quant)
    return bytes_at(torch.finfo(resolve_dtype(config.dtype, device)).bits // 8)


def _weight_bytes(path: Path, device: "torch.device", quant: str | None) -> Callable[[int], int]:  # type: ignore[name-defined]  # noqa: F821
    """Weight bytes as a function of the dense matrices' element size (the header is read once)."""
    if path.is_dir():
        from specrun.engines.torch_engine.safetensors import planned_bytes

        return lambda size: planned_bytes(path, size, quant)
    from specrun.gguf_file import read_gguf

    kept, dense = 0, 0  # bytes kept as stored; elements dequantized at load
    for t in read_gguf(path).tensors:
        if device.type == "cpu" and len(t.shape) == 2 and t.name != "token_embd.weight":
            dense += t.shape[0] * t.shape[1]
        else:
            kept += t.n_bytes
    return lambda size: kept + dense * size


__all__ = ["OffloadConfig", "TorchConfig", "TorchEngine", "cpu_dtype_for", "planned_weight_bytes"]
