"""Inference engines: what runs a model's forward pass.

`base` is the contract everything above talks to (`Engine`, `Vocab`, `Logits`);
`llamacpp` implements it on llama.cpp, `torch_engine` on PyTorch (GGUF files and
safetensors directories, optionally quantized by bitsandbytes as they load).
`open_engine` picks the backend for a model and a placement, so no caller names
one. torch is imported only when the torch engine is picked: importing it costs
a second or more, which a llama.cpp run must not pay.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from specrun.engines.base import Cache, Engine, Logits, Pending, TreeRequest, Vocab
from specrun.engines.placement import (DEVICES, ENGINES, OFFLOADS, QUANTS, Placement, engine_for, llama_gpu,
                                       llama_gpu_layers, torch_device, torch_needed, tree_limit)
from specrun.errors import UsageError

if TYPE_CHECKING:  # torch is imported only when the torch engine is picked
    from specrun.engines.torch_engine import TorchConfig


def open_engine(model: Path, placement: Placement = Placement(), max_tree_nodes: int = 0,
                sequences: int = 1) -> Engine:
    """A loaded engine for `model` (no cache yet: `new_cache` makes them) that verifies trees of up to
    `max_tree_nodes` nodes in one pass, placed as the memory plan resolved `placement`; up to
    `sequences` caches share its passes (llama.cpp puts them in one context)."""
    if engine_for(model, placement) == "torch":
        config = torch_config(model, placement, max_tree_nodes)
        with torch_needed():
            from specrun.engines.torch_engine import TorchEngine

            return TorchEngine(model, config)
    from specrun.engines.llamacpp import LlamaCppConfig, LlamaCppEngine

    config = LlamaCppConfig(n_threads=placement.threads, n_gpu_layers=llama_gpu_layers(placement),
                            max_tree_nodes=max_tree_nodes, load=placement.load, repack=placement.repack,
                            sequences=sequences, rpc=placement.rpc)
    return LlamaCppEngine(model, config)


def torch_config(model: Path, placement: Placement, max_tree_nodes: int = 0) -> TorchConfig:
    """The torch engine's configuration for a resolved placement (the memory plan chose its
    offload mode, budgets and dtype): its device and where its weights stream from. The one
    place that builds it, so `open_engine` and `specrun info` agree (a disk placement computes
    on the CPU even where a GPU is there)."""
    device = torch_device(placement)  # its errors first: they need no model loaded
    mode = "none" if placement.offload == "auto" else placement.offload
    if mode == "ram" and not device.startswith("cuda"):
        raise UsageError("--offload ram streams weights from RAM to a GPU, and torch sees none here",
                         hint="use --offload disk to read them from the file each pass")
    if mode == "disk" and placement.device == "cuda":
        raise UsageError("--offload disk computes on the CPU for now; on a GPU, stream from RAM",
                         hint="use --offload ram with --device cuda, or --device cpu")
    if mode == "disk":
        device = "cpu"
    with torch_needed():
        from specrun.engines.torch_engine import OffloadConfig, TorchConfig

        return TorchConfig(device=device, dtype=placement.dtype, threads=placement.threads, quant=placement.quant,
                           max_tree_nodes=max_tree_nodes, exact=placement.exact,
                           offload=OffloadConfig(mode=mode, ram=placement.ram, gpu_memory=placement.gpu_memory,
                                                 slots=placement.slots))


def device_of(model: Path, placement: Placement = Placement()) -> str:
    """Where the model's weights would live: "cpu", "cuda", or "gpu" (llama.cpp's GPU backend)."""
    if engine_for(model, placement) == "torch":
        return torch_config(model, placement).device
    layers = llama_gpu_layers(placement)
    return "cpu" if layers == 0 or not llama_gpu() else "gpu"


__all__ = ["DEVICES", "ENGINES", "OFFLOADS", "QUANTS", "Cache", "Engine", "Logits", "Pending", "Placement", "TreeRequest", "Vocab", "device_of",
           "engine_for", "open_engine", "torch_config", "tree_limit"]
