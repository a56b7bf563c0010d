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


def test_a_batchs_caches_share_one_context_and_one_decode_per_pass(tiny_model: Path) -> None:
    """Up to `sequences` caches take slots of one context, and eval_trees verifies their trees
    in one llama_decode; a cache beyond them gets a context of its own (one decode more)."""
    from specrun.engines.base import TreeRequest

    with LlamaCppEngine(tiny_model, LlamaCppConfig(n_threads=1, max_tree_nodes=64, sequences=8)) as e:
        assert e.max_tree_nodes == MAX_SEQ // 8 - 1  # the ids are shared out among the slots
        caches = [e.new_cache(64) for _ in range(9)]
        assert len({id(c.context) for c in caches[:8]}) == 1 and caches[8].context is not caches[0].context
        for k, c in enumerate(caches):
            e.eval(c, [1, 5 + k, 6])
        requests = [TreeRequest(c, [7, 8, 9], [-1, 0, 0], [0, 1, 1]) for c in caches]
        before = e._epoch
        rows = e.eval_trees(requests)
        assert e._epoch - before == 2  # the shared context's decode, and the lone cache's
        alone = LlamaCppEngine(tiny_model, LlamaCppConfig(n_threads=1, max_tree_nodes=8))
        try:
            for k, got in enumerate(rows):
                ref = alone.new_cache(64)
                alone.eval(ref, [1, 5 + k, 6])
                want = alone.eval_tree(ref, [7, 8, 9], [-1, 0, 0], [0, 1, 1])
                for i in range(3):
                    assert np.allclose(got.row(i), want.row(i), rtol=1e-3, atol=2e-3), (k, i)
        finally:
            alone.close()


def test_a_closed_caches_slot_serves_the_next_cache_empty(tiny_model: Path) -> None:
    with LlamaCppEngine(tiny_model, LlamaCppConfig(n_threads=1, max_tree_nodes=4, sequences=2)) as e:
        a, b = e.new_cache(32), e.new_cache(32)
        e.eval(a, [1, 2, 3, 4])
        e.eval_tree(a, [5, 6], [-1, 0], [0, 1])  # a tree left open when the cache closes
        want = e.eval(b, [1, 9]).row(0)
        a.close()
        c = e.new_cache(32)
        assert c.context is b.context and c.seq0 == a.seq0 and c.tokens == ()
        assert np.allclose(e.eval(c, [1, 9]).row(0), want, rtol=1e-3, atol=2e-3)  # none of a's cells seen


def test_the_shared_context_is_remade_larger_while_it_holds_no_cache(tiny_model: Path) -> None:
    """A small first cache (a calibration's) must not fix the size of the batch's context."""
    with LlamaCppEngine(tiny_model, LlamaCppConfig(n_threads=1, max_tree_nodes=4, sequences=2)) as e:
        small = e.new_cache(16)
        first = small.context
        small.close()
        big = [e.new_cache(256), e.new_cache(256)]
        assert big[0].context is big[1].context is not first and big[0].context.cells >= 512
        e.eval(big[1], list(range(1, 200)))
