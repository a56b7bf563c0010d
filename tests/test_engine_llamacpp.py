"""What is particular to the llama.cpp engine (the shared contract is in test_engine_contract.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from specrun.engines.llamacpp import MAX_SEQ, LlamaCppConfig, LlamaCppEngine, tree_seq_ids
from specrun.errors import EngineError, UsageError
from specrun.engines.memory_plan import default_ctx
from specrun.engines.base import ancestor_mask


def test_unloadable_file_is_an_engine_error(tmp_path: Path, tiny_model: Path) -> None:
    bad = tmp_path / "bad.gguf"
    data = tiny_model.read_bytes()
    arch = b"\x05\x00\x00\x00\x00\x00\x00\x00llama"  # general.architecture's value
    bad.write_bytes(data.replace(arch, arch[:8] + b"zzzzz", 1))  # a well-formed file llama.cpp cannot run
    with pytest.raises(EngineError, match="could not load"):
        LlamaCppEngine(bad)


def test_trees_beyond_llama_cpp_sequence_ids_are_refused_in_one_line(tiny_model: Path) -> None:
    with pytest.raises(UsageError, match=f"at most {MAX_SEQ - 1} nodes"):
        LlamaCppEngine(tiny_model, LlamaCppConfig(max_tree_nodes=MAX_SEQ))


def test_a_small_context_still_verifies_whole_trees(tiny_model: Path) -> None:
    """A 16-token context made llama.cpp abort (GGML_ASSERT on its output buffer) when the
    batch, sized to the context, was smaller than the tree's sequences."""
    with LlamaCppEngine(tiny_model, LlamaCppConfig(n_threads=1, max_tree_nodes=32)) as e:
        c = e.new_cache(16)
        assert c.n_ctx >= 16 and e.max_tree_nodes == 32
        e.eval(c, [1, 5, 6])
        assert len(e.eval_tree(c, list(range(20, 52)), [-1] + list(range(31)), list(range(32)))) == 32
        e.commit_path(c, [])
        e.eval(c, [7] * (c.n_ctx - 3 - 4))  # 4 cells left
        with pytest.raises(UsageError, match="context full"):  # every node takes a cell
            e.eval_tree(c, list(range(20, 28)), [-1] + list(range(7)), list(range(8)))
        assert len(e.eval_tree(c, list(range(20, 24)), [-1, 0, 0, 1], [0, 1, 1, 2])) == 4


@pytest.mark.parametrize("seed", range(20))
def test_seq_ids_follow_the_ancestor_mask(seed: int) -> None:
    """llama.cpp's rule: query i sees cell j iff cell j carries i's first sequence id (i + 1)."""
    rng = np.random.default_rng(seed)
    parents = [-1] + [int(rng.integers(i)) for i in range(1, 1 + seed * 7)]
    mask = ancestor_mask(parents)
    seq = tree_seq_ids(parents)
    for j in range(len(parents)):
        assert seq[j][0] == j + 1
        for i in range(len(parents)):
            assert ((i + 1) in seq[j]) == mask[i, j]


def test_default_ctx() -> None:
    assert default_ctx(32768, 100) == 4096
    assert default_ctx(32768, 9000) == 9000
    assert default_ctx(2048, 100) == 2048
