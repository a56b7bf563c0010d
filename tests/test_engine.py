"""The llama.cpp engine on a tiny f32 model: KV cache reuse must not change logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from specrun.engines import EngineConfig
from specrun.engines.llamacpp import LlamaCppEngine, default_ctx
from specrun.errors import EngineError, UsageError


@pytest.fixture()
def engine(tiny_model: Path):
    with LlamaCppEngine(tiny_model, EngineConfig(n_threads=1, n_batch=8)) as e:
        e.open(256)
        yield e


def test_vocabulary(engine: LlamaCppEngine) -> None:
    assert engine.n_vocab == 272 and engine.n_ctx_train == 2048
    tokens = engine.tokenize("hello wörld", add_special=False)
    assert b"".join(engine.piece(t) for t in tokens).decode().strip() == "hello wörld"
    assert engine.tokenize("hi")[0] == 1  # BOS added for this model
    assert engine.is_eog(2) and not engine.is_eog(100)
    assert engine.piece(1) == b""  # control tokens print nothing


def test_incremental_eval_equals_one_batch(engine: LlamaCppEngine, tiny_model: Path) -> None:
    """Prompt in several n_batch chunks, then token by token, against one fresh batch."""
    tokens = engine.tokenize("def fib(n): return the world " * 2)
    first = engine.eval(tokens[:-3])
    assert first.shape == (272,) and first.dtype == np.float32
    for t in tokens[-3:]:
        last = engine.eval([t])
    assert engine.kv_len == len(tokens)
    with LlamaCppEngine(tiny_model, EngineConfig(n_threads=1, n_batch=512)) as fresh:
        fresh.open(256)
        ref = fresh.eval(tokens)
    np.testing.assert_allclose(last, ref, rtol=1e-3, atol=2e-3)  # batch shapes change f32 rounding only


def test_rewind_reuses_the_prefix(engine: LlamaCppEngine) -> None:
    tokens = engine.tokenize("hello world, hello world")
    full = engine.eval(tokens)
    engine.eval([10, 11, 12])
    engine.rewind(len(tokens) - 1)
    assert engine.kv_len == len(tokens) - 1
    again = engine.eval(tokens[-1:])
    np.testing.assert_allclose(again, full, rtol=1e-3, atol=2e-3)


def test_context_overflow_is_a_usage_error(engine: LlamaCppEngine) -> None:
    with pytest.raises(UsageError, match="context full"):
        engine.eval([5] * 300)


def test_unloadable_file_is_an_engine_error(tmp_path: Path, tiny_model: Path) -> None:
    bad = tmp_path / "bad.gguf"
    data = tiny_model.read_bytes()
    arch = b"\x05\x00\x00\x00\x00\x00\x00\x00llama"  # general.architecture's value
    bad.write_bytes(data.replace(arch, arch[:8] + b"zzzzz", 1))  # a well-formed file llama.cpp cannot run
    with pytest.raises(EngineError, match="could not load"):
        LlamaCppEngine(bad)


def test_default_ctx() -> None:
    assert default_ctx(32768, 100) == 4096
    assert default_ctx(32768, 9000) == 9000
    assert default_ctx(2048, 100) == 2048


# --- trees ------------------------------------------------------------------------

TREE_TOKENS = [40, 41, 42, 43, 44, 45, 46, 47, 48]
TREE_PARENTS = [-1, 0, 0, 1, 1, 2, 3, 5, 7]  # node 0 is the root (the pending token)


def _depths(parents: list[int]) -> list[int]:
    d: list[int] = []
    for p in parents:
        d.append(0 if p < 0 else d[p] + 1)
    return d


def _path(parents: list[int], node: int) -> list[int]:
    path = []
    while node != -1:
        path.append(node)
        node = parents[node]
    return path[::-1]


@pytest.fixture()
def tree_engine(tiny_model: Path):
    with LlamaCppEngine(tiny_model, EngineConfig(n_threads=1, n_seq_max=16)) as e:
        e.open(256)
        yield e


def test_tree_logits_equal_sequential_logits_for_every_node(tree_engine: LlamaCppEngine, tiny_model: Path) -> None:
    """Reference: evaluate prefix + the path to each node as one plain sequence."""
    prefix = tree_engine.tokenize("def fib(n): return")
    tree_engine.eval(prefix)
    logits = tree_engine.eval_tree(TREE_TOKENS, TREE_PARENTS, _depths(TREE_PARENTS))
    assert logits.shape == (len(TREE_TOKENS), 272)
    assert tree_engine.kv_len == len(prefix)  # nothing committed yet
    with LlamaCppEngine(tiny_model, EngineConfig(n_threads=1)) as ref:
        ref.open(256)
        for node in range(len(TREE_TOKENS)):
            ref.rewind(0)
            expected = ref.eval(prefix + [TREE_TOKENS[i] for i in _path(TREE_PARENTS, node)])
            np.testing.assert_allclose(logits[node], expected, rtol=1e-3, atol=2e-3, err_msg=f"node {node}")


def test_commit_path_keeps_exactly_the_accepted_branch(tree_engine: LlamaCppEngine, tiny_model: Path) -> None:
    prefix = tree_engine.tokenize("hello world")
    tree_engine.eval(prefix)
    for _ in range(2):  # twice: a second tree must find the cache clean
        tree_engine.eval_tree(TREE_TOKENS, TREE_PARENTS, _depths(TREE_PARENTS))
        path = _path(TREE_PARENTS, 8)  # 0 -> 2 -> 5 -> 7 -> 8
        tree_engine.commit_path(path)
        prefix = prefix + [TREE_TOKENS[i] for i in path]
        assert tree_engine.kv_len == len(prefix)
    after = tree_engine.eval([50])
    with LlamaCppEngine(tiny_model, EngineConfig(n_threads=1)) as ref:
        ref.open(256)
        expected = ref.eval(prefix + [50])
    np.testing.assert_allclose(after, expected, rtol=1e-3, atol=2e-3)


def test_a_tree_grown_over_several_calls_equals_one_call(tree_engine: LlamaCppEngine) -> None:
    prefix = tree_engine.tokenize("def fib(n): return")
    tree_engine.eval(prefix)
    depths = _depths(TREE_PARENTS)
    whole = tree_engine.eval_tree(TREE_TOKENS, TREE_PARENTS, depths)
    tree_engine.commit_path([])
    parts = [tree_engine.eval_tree(TREE_TOKENS[:end], TREE_PARENTS[:end], depths[:end], start)
             for start, end in [(0, 2), (2, 5), (5, 9)]]
    np.testing.assert_allclose(np.concatenate(parts), whole, rtol=1e-3, atol=2e-3)
    with pytest.raises(ValueError, match="evaluated"):
        tree_engine.eval_tree(TREE_TOKENS, TREE_PARENTS, depths, 3)
    tree_engine.commit_path(_path(TREE_PARENTS, 6))  # 0 -> 1 -> 3 -> 6
    assert tree_engine.kv_len == len(prefix) + 4
