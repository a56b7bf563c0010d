"""specrun's own engine on torch: GGUF files and safetensors directories, on a CPU or a GPU.

Modules: `arch` (what a model is), `weights` (how its matrices are stored and
the GGUF loader), `safetensors` and `hf_vocab` (Hugging Face directories),
`model` (the forward pass), `cache` (the KV cache), `engine` (the contract).
"""

from __future__ import annotations

from pathlib import Path

from specrun.engines.torch_engine.config import QUANTS, TorchConfig
from specrun.engines.torch_engine.engine import TorchEngine


def planned_weight_bytes(path: Path, config: TorchConfig) -> int:
    """Memory the weights would take once loaded with `config`, read from the file's header
    (nothing is loaded): on a CPU a GGUF's matrices are dequantized to the compute dtype, on
    a GPU they keep their blocks."""
    import torch

    from specrun.engines.torch_engine.config import resolve_dtype

    device = torch.device(config.device)
    dtype = resolve_dtype(config.dtype, device, _bytes_at(path, device, 4, config.quant))
    return _bytes_at(path, device, torch.finfo(dtype).bits // 8, config.quant)


def _bytes_at(path: Path, device: "torch.device", size: int, quant: str | None) -> int:  # type: ignore[name-defined]  # noqa: F821
    """Weight bytes with dense matrices of `size`-byte elements."""
    import numpy as np

    if path.is_dir():
        from specrun.engines.torch_engine.safetensors import planned_bytes

        return planned_bytes(path, size, quant)
    from specrun.gguf_file import read_gguf

    total = 0
    for t in read_gguf(path).tensors:
        stored = t.n_bytes
        if device.type == "cpu" and len(t.shape) == 2 and t.name != "token_embd.weight":
            stored = int(np.prod(t.shape)) * size
        total += stored
    return total


__all__ = ["QUANTS", "TorchConfig", "TorchEngine", "planned_weight_bytes"]
