"""Logits computed only for the rows read (the torch engine on a CPU) against every row computed
in the pass: the same numbers (up to the float rounding of a product of one row against one of
several), and a streamed output matrix held intact until it is let go.

A tiny f32 model with a vocabulary large enough that its output matrix streams in several
slices, so that holding them needs as many slots and fewer slots fall back to computing every
row in the pass.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from specrun.engines.base import Logits
from specrun.engines.torch_engine import TorchConfig, TorchEngine
from specrun.engines.torch_engine.config import OffloadConfig
from specrun.engines.torch_engine.disk_stream import DiskStream
from specrun.engines.torch_engine.layout import Unit
from specrun.engines.torch_engine.streamed import file_units
from tests.tiny_model import TinySpec, build_tiny_model

SPEC = TinySpec(n_embd=64, n_ff=128, n_layers=3, words=tuple(f"w{i}" for i in range(3000)))
PROMPT = [1, 80, 81, 82, 200, 201, 90, 91, 92]
TREE = ([5, 40, 41, 42, 43, 44, 45], [-1, 0, 0, 1, 1, 2, 5], [0, 1, 1, 2, 2, 2, 3])


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("lazy") / "f32.gguf", SPEC)


def n_output_slices(path: Path) -> int:
    return sum(u.kind == "output" for u in file_units(path))


def engine(path: Path, slots: int | None = None, mode: str = "disk") -> TorchEngine:
    return TorchEngine(path, TorchConfig(dtype="float32", threads=1, max_tree_nodes=16,
                                         offload=OffloadConfig(mode=mode, slots=slots)))


def every_row(logits: Logits) -> np.ndarray:
    return np.stack([logits.row(i) for i in range(len(logits))])


def steps(e: TorchEngine) -> list[np.ndarray]:
    """Every row of a prompt's pass, a step's, and a tree's, read in a scattered order."""
    c = e.new_cache(64)
    out = []
    for tokens in (PROMPT, [7]):
        logits = e.eval(c, tokens)
        out.append(every_row(logits))
        logits.close()
    tree = e.eval_tree(c, *TREE)
    order = [3, 0, 6, 3, 1, 5, 2, 4]
    rows = {i: tree.row(i) for i in order}
    assert tree.argmax(3) == int(np.argmax(rows[3])) and len(tree) == len(TREE[0])
    out.append(np.stack([rows[i] for i in range(len(TREE[0]))]))
    return out


def test_the_model_streams_its_output_in_several_slices(model: Path) -> None:
    assert n_output_slices(model) >= 3


@pytest.mark.parametrize("mode", ["disk", "none"])
def test_rows_computed_when_read_equal_rows_computed_in_the_pass(model: Path, mode: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    with engine(model, slots=n_output_slices(model), mode=mode) as e:
        lazy = steps(e)
        assert e.eval(e.new_cache(8), [5])._rows is None  # nothing computed before it is read
    with monkeypatch.context() as m:
        with engine(model, slots=n_output_slices(model), mode=mode) as e:
            m.setattr(e.model.source, "hold", lambda: False)  # every row computed in the pass
            eager = steps(e)
    for a, b in zip(lazy, eager, strict=True):  # a row's product alone rounds as a plain step's does
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_too_few_slots_to_hold_the_output_compute_every_row_in_the_pass(model: Path) -> None:
    with engine(model, slots=n_output_slices(model) - 1) as few, engine(model, slots=n_output_slices(model)) as enough:
        logits = few.eval(few.new_cache(8), [5])
        assert logits._rows is not None  # computed in the pass
        np.testing.assert_array_equal(logits.row(0), enough.eval(enough.new_cache(8), [5]).row(0))


def test_rows_read_after_close_or_after_the_next_pass_are_an_error(model: Path) -> None:
    with engine(model, slots=n_output_slices(model)) as e:
        c = e.new_cache(16)
        first = e.eval(c, PROMPT[:3])
        first.argmax(0)
        first.close()
        first.close()  # twice is harmless
        with pytest.raises(RuntimeError, match="close"):
            first.row(0)
        second = e.eval(c, [7])
        e.eval(c, [8])
        with pytest.raises(RuntimeError, match="next pass"):
            second.row(0)


def tensors_of(unit: Unit, buf: torch.Tensor | None, path: Path) -> list[bytes]:
    """The bytes of the unit's tensors: in `buf`, or (None) in the file."""
    if buf is not None:
        return [bytes(buf[s.offset:s.offset + s.n_bytes].numpy()) for s in unit.spans]
    with open(path, "rb") as f:
        out = []
        for s in unit.spans:
            f.seek(unit.start + s.offset)
            out.append(f.read(s.n_bytes))
        return out


def test_held_slices_stay_intact_while_the_readers_run_ahead_and_the_next_pass_reads_right(model: Path) -> None:
    """The output's slots are not refilled while held; the readers fill the others; released,
    the ring goes on in order, and every unit of the next passes holds its own bytes."""
    units = file_units(model)
    outputs = [u for u in units if u.kind == "output"]
    stream = DiskStream(model, units, set(), len(outputs) + 1, readers=2)
    try:
        assert stream.can_hold(outputs) and not stream.can_hold(outputs + units[:2])
        it = stream.pass_units()
        for _ in range(len(units) - len(outputs)):
            next(it)
        stream.hold_rest()
        held = list(it)
        assert [u for u, _ in held] == outputs
        want = [tensors_of(u, None, model) for u in outputs]
        for _ in range(3):  # the readers get on with the next pass meanwhile
            time.sleep(0.01)
            assert [tensors_of(u, buf, model) for u, buf in held] == want
        stream.release_held()
        for _ in range(2):
            for unit, buf in stream.pass_units():
                assert tensors_of(unit, buf, model) == tensors_of(unit, None, model)
    finally:
        stream.close()
