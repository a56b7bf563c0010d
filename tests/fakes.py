"""Helpers the tests share that production does not need: logits held in a numpy array (for
fake engines, and as the reference other handles are compared with), and draft tree
building and walking by token chains."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from specrun.engines.base import Cache
from specrun.engines.top_k import top_ids_of, top_k_of
from specrun.speculate.base import Draft
from specrun.speculate.tree import DraftTree
from tests.clocks import FakeClock


class ArrayLogits:
    """Logits held in a numpy array [n, n_vocab], with the `Logits` protocol's reads."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array  # [n, n_vocab] float32

    def __len__(self) -> int:
        return len(self.array)

    def row(self, i: int) -> np.ndarray:
        return np.array(self.array[i], dtype=np.float32)

    def argmax(self, i: int) -> int:
        return int(np.argmax(self.array[i]))

    def top_k(self, i: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        return top_k_of(self.array[i], k)

    def top_ids(self, i: int, k: int) -> np.ndarray:
        return top_ids_of(self.array[i], k)


def add_path(tree: DraftTree, tokens: Sequence[int], parent: int = 0) -> None:
    """Merge a chain of tokens under `parent`, sharing existing prefixes (a trie insert)."""
    for tok in tokens:
        nxt = tree.child(parent, tok)
        parent = tree.add(tok, parent) if nxt is None else nxt


def path_to(tree: DraftTree, node: int) -> list[int]:
    """Node indices from the root to `node`, both included."""
    path = []
    while node != -1:
        path.append(node)
        node = tree.parents[node]
    return path[::-1]


class FixedDrafter:
    """Proposes the same chain of `n` nodes under one planner key every time."""

    def __init__(self, n: int, key: str, costly: bool) -> None:
        self.n, self.key, self.costly, self.calls = n, key, costly, 0
        self.prepared: list[bool] = []  # for its drafts' `prepared`: found during the previous pass

    def draft(self, context, max_nodes, max_depth) -> Draft:
        self.calls += 1
        tree = DraftTree.rooted(context[-1])
        for i in range(min(self.n, max_nodes - 1)):
            tree.add(100 + i, i)
        return Draft(tree, [("root",)] + [self.key] * (len(tree) - 1), prepared=list(self.prepared))

    def accepted(self, tokens) -> None:
        pass


class NextTokenDrafter(FixedDrafter):
    """Drafts the chain the counting engine will accept, for free (as prompt lookup does)."""

    def draft(self, context, max_nodes, max_depth) -> Draft:
        tree = DraftTree.rooted(context[-1])
        for i in range(min(self.n, max_nodes - 1, max_depth)):
            tree.add((context[-1] + 1 + i) % 1000, i)
        return Draft(tree, [("root",)] + [self.key] * (len(tree) - 1))


class CountingEngine:
    """A target that always continues with the next token id (so a chain of the next ids is
    all accepted), whose passes take `cost(n)` of `clock`: a machine whose costs can change mid-run."""

    n_ctx_train, max_tree_nodes, notices = 4096, 64, ()

    def __init__(self, cost, clock: FakeClock) -> None:
        self.cost, self.clock, self.passes = cost, clock, 0
        self.vocab = SimpleVocab()

    def new_cache(self, n_ctx: int) -> Cache:
        return Cache(n_ctx)

    def _rows(self, tokens) -> ArrayLogits:
        rows = np.zeros((len(tokens), self.vocab.n_vocab), dtype=np.float32)
        for i, t in enumerate(tokens):
            rows[i, (t + 1) % self.vocab.n_vocab] = 1.0
        self.clock.advance(self.cost(len(tokens)))
        self.passes += 1
        return ArrayLogits(rows)

    def sync(self, cache: Cache, tokens):
        cache.cut(0)
        cache.appended(tokens)
        return ArrayLogits(self._rows(tokens).array[-1:])

    def eval(self, cache: Cache, tokens):
        cache.appended(tokens)
        return self._rows(tokens)

    def eval_tree(self, cache: Cache, tokens, parents, depths, start=0):
        cache.evaluated_tree(tokens, parents)
        return self._rows(tokens)

    def commit_path(self, cache: Cache, path, keep=()):
        cache.committed(path, keep)

    def transfer(self):
        return None


class SimpleVocab:
    n_vocab = 1000

    def piece(self, token: int) -> bytes:
        return b"x"

    def is_eog(self, token: int) -> bool:
        return False
