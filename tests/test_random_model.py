"""scripts/random_model.py: random-weight GGUFs of real shapes, which both engines load and run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from specrun.gguf_file import read_gguf

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("random_model", ROOT / "scripts" / "random_model.py")
random_model = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
sys.modules["random_model"] = random_model
spec.loader.exec_module(random_model)  # type: ignore[union-attr]

SMALL = random_model.Shape("qwen2", 2, 256, 512, 4, 2, 512)


def test_real_shapes_have_their_real_sizes() -> None:
    """Q4_K_M files of the real models (as published): Qwen2.5-7B 4.68 GB, 32B 19.9 GB,
    Llama-3.1-8B 4.92 GB, Llama-3.3-70B 42.5 GB."""
    size = {n: sum(random_model.nbytes(s, q) for _, s, q in random_model.tensors(sh)) / 1e9
            for n, sh in random_model.SHAPES.items()}
    for name, published in (("qwen2.5-7b", 4.68), ("qwen2.5-32b", 19.85), ("llama-3.1-8b", 4.92),
                            ("llama-3.3-70b", 42.5), ("qwen2.5-1.5b", 0.99)):
        assert size[name] == pytest.approx(published, rel=0.08), name


def test_a_written_file_is_valid_and_both_engines_run_it(tmp_path: Path) -> None:
    path = random_model.write(SMALL, "small", tmp_path / "small.gguf", progress=False)
    info = read_gguf(path)
    assert info.arch == "qwen2" and info.vocab_size == 512 and info.n_layers == 2
    assert {t.name: t.n_bytes for t in info.tensors} == {n: random_model.nbytes(s, q)
                                                          for n, s, q in random_model.tensors(SMALL)}
    from specrun.engines.llamacpp import LlamaCppConfig, LlamaCppEngine

    with LlamaCppEngine(path, LlamaCppConfig(n_threads=1)) as e:
        assert np.isfinite(e.eval(e.new_cache(64), [5, 6, 7]).row(0)).all()
    pytest.importorskip("torch")
    from specrun.engines.torch_engine import OffloadConfig, TorchConfig, TorchEngine

    with TorchEngine(path, TorchConfig(threads=1, offload=OffloadConfig(mode="disk"))) as t:
        assert np.isfinite(t.eval(t.new_cache(64), [5, 6, 7]).row(0)).all()
