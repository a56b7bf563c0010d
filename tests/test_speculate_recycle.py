"""Token recycling's pair rows: the target's top-k kept under the pair of tokens it followed,
against a slow reference; the drafter grows from a pair's row where it has one; the rows persist."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import specrun.speculate.recycle as recycle
from specrun.planner_memory import load_recycled, save_recycled
from specrun.speculate.base import Verified
from specrun.speculate.recycle import RecycleDrafter, RecycleTable
from specrun.speculate.tree import DraftTree
from tests.fakes import ArrayLogits, add_path, path_to


def random_tree(rng: np.random.Generator, n: int, vocab: int) -> DraftTree:
    tree = DraftTree.rooted(int(rng.integers(vocab)))
    for _ in range(n - 1):
        parent = int(rng.integers(len(tree)))
        token = int(rng.integers(vocab))
        if tree.child(parent, token) is None:
            tree.add(token, parent)
    return tree


def test_pair_rows_equal_a_slow_reference_over_random_trees() -> None:
    """Every row read is kept under (its parent's token, its token); the root's under (before,
    root) where `before` is known; rejected rows first, the accepted path's last (they win)."""
    rng = np.random.default_rng(1)
    table, tokens_ref, pairs_ref = RecycleTable(k=3), {}, {}
    for step in range(60):
        tree = random_tree(rng, int(rng.integers(1, 12)), vocab=6)
        leaf = int(rng.integers(len(tree)))
        path = path_to(tree, leaf)  # node indices, root first
        logits = rng.normal(size=(len(tree), 20)).astype(np.float32)
        before = None if step % 3 == 0 else int(rng.integers(6))
        table.learn(Verified([tree.tokens[i] for i in path], ArrayLogits(logits), path, tree), before)
        order = [i for i in range(len(tree)) if i not in path] + path  # the slow way: every row, path last
        for i in order:
            top = list(np.argsort(-logits[i], kind="stable")[:3])
            tokens_ref[tree.tokens[i]] = top
            prev = tree.tokens[tree.parents[i]] if i else before
            if prev is not None:
                pairs_ref[(prev, tree.tokens[i])] = top
    assert {t: list(v) for t, v in table.successors.items()} == tokens_ref
    assert {p: list(v) for p, v in table.pairs.items()} == pairs_ref


def test_the_drafter_grows_from_a_pairs_row_where_it_has_one() -> None:
    table = RecycleTable(k=8)
    table.successors = {1: np.array([10, 11], dtype=np.int32), 10: np.array([20], dtype=np.int32)}
    table.pairs = {(5, 1): np.array([12, 13], dtype=np.int32), (1, 12): np.array([30], dtype=np.int32)}
    drafter = RecycleDrafter(table)
    paired = drafter.draft([5, 1], max_nodes=16, max_depth=4)
    walks = {tuple(paired.tree.tokens[j] for j in path_to(paired.tree, i)): paired.keys[i]
             for i in range(1, len(paired.tree))}
    assert walks == {(1, 12): ("recycle", "pair", 0, 1), (1, 13): ("recycle", "pair", 1, 1),
                     (1, 12, 30): ("recycle", "pair", 0, 2)}  # 13 has no row: a leaf
    alone = drafter.draft([7, 1], max_nodes=16, max_depth=4)  # the pair (7, 1) was never seen
    walks = {tuple(alone.tree.tokens[j] for j in path_to(alone.tree, i)): alone.keys[i]
             for i in range(1, len(alone.tree))}
    assert walks == {(1, 10): ("recycle", 0, 1), (1, 11): ("recycle", 1, 1), (1, 10, 20): ("recycle", 0, 2)}
    assert drafter.draft([1], max_nodes=16, max_depth=4).tree.tokens == [1, 10, 11, 20]  # no token before: the token's row


def test_the_drafter_learns_the_roots_pair_from_the_context_it_drafted_after() -> None:
    tree = DraftTree.rooted(3)
    add_path(tree, [4])
    logits = np.zeros((2, 16), dtype=np.float32)
    logits[0, 4] = logits[1, 9] = 5.0
    drafter = RecycleDrafter()
    drafter.draft([8, 3], max_nodes=4, max_depth=2)
    drafter.accepted(Verified([3, 4], ArrayLogits(logits), [0, 1], tree))
    assert {p: int(v[0]) for p, v in drafter.table.pairs.items()} == {(8, 3): 4, (3, 4): 9}
    drafter.accepted(Verified([4], ArrayLogits(logits[1:]), [0], DraftTree.rooted(4)))  # not what it drafted for
    assert (8, 4) not in drafter.table.pairs and (3, 4) in drafter.table.pairs


def test_pair_rows_are_capped_oldest_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recycle, "MAX_PAIRS", 3)
    table = RecycleTable(k=1)
    for pair in [(1, 1), (1, 2), (1, 3), (1, 1), (1, 4)]:  # (1, 1) seen again: the newest
        table.keep_pair(pair, np.array([pair[1]], dtype=np.int32))
    assert list(table.pairs) == [(1, 3), (1, 1), (1, 4)]


def test_pair_rows_are_kept_with_the_table_and_old_files_still_load(tmp_path: Path) -> None:
    table = RecycleTable(k=2)
    table.successors = {1: np.array([2, 3], dtype=np.int32)}
    for pair in [(4, 1), (5, 1), (4, 2)]:
        table.keep_pair(pair, np.array([pair[0], 9], dtype=np.int32))
    path = tmp_path / "r.npz"
    save_recycled(path, table)
    again = load_recycled(path, k=2)
    assert list(again.pairs) == list(table.pairs)
    assert all(list(again.pairs[p]) == list(table.pairs[p]) for p in table.pairs)
    np.savez(path, tokens=np.array([1], dtype=np.int32), successors=np.array([[2, 3]], dtype=np.int32))  # before pairs
    old = load_recycled(path, k=2)
    assert list(old.successors[1]) == [2, 3] and old.pairs == {}
