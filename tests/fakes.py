"""Helpers the tests share that production does not need: logits held in a numpy array (for
fake engines, and as the reference other handles are compared with), and draft tree
building and walking by token chains."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from specrun.engines.top_k import top_ids_of, top_k_of
from specrun.speculate.tree import DraftTree


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
