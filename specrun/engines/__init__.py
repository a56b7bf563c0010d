"""Inference engines: what runs a model's forward pass.

`base` is the contract everything above talks to (`Engine`, `Vocab`, `Logits`);
`llamacpp` implements it on llama.cpp. `open_engine` picks the backend for a
model file and a placement, so no caller names one. The torch engine (weights
streamed from RAM or disk) joins here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from specrun.engines.base import Engine, Logits, Pending, Vocab


@dataclass(frozen=True)
class Placement:
    """Where a model runs. `None` means: decide from the model and the machine."""

    threads: int | None = None  # CPU threads; None: every core
    gpu_layers: int | None = None  # layers on the GPU; None: all when the build has a GPU; -1: all


def open_engine(model: Path, placement: Placement = Placement(), max_tree_nodes: int = 0) -> Engine:
    """A loaded engine for `model` (no cache yet: `open` it) that verifies trees of up to
    `max_tree_nodes` nodes in one pass."""
    from specrun.engines.llamacpp import LlamaCppConfig, LlamaCppEngine

    config = LlamaCppConfig(n_threads=placement.threads, n_gpu_layers=placement.gpu_layers,
                            max_tree_nodes=max_tree_nodes)
    return LlamaCppEngine(model, config)


__all__ = ["Engine", "Logits", "Pending", "Placement", "Vocab", "open_engine"]
