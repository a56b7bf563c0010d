"""Inference engines: what runs a model's forward pass.

`base.Engine` is the contract the generation loop talks to; `llamacpp` is the
llama.cpp implementation. A torch engine with offloaded weights comes later.
"""

from specrun.engines.base import Engine, EngineConfig

__all__ = ["Engine", "EngineConfig"]
