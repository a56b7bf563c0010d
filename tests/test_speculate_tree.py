from __future__ import annotations

import numpy as np
import pytest

from specrun.engines.llamacpp import tree_seq_ids
from specrun.spec.tree import DraftTree


def random_tree(rng: np.random.Generator, n: int) -> DraftTree:
    tree = DraftTree.rooted(int(rng.integers(100)))
    for _ in range(n - 1):
        tree.add(int(rng.integers(100)), int(rng.integers(len(tree))))
    return tree


def reference_mask(tree: DraftTree) -> np.ndarray:
    """Obviously right: walk each node's parents to the root."""
    n = len(tree)
    mask = np.zeros((n, n), dtype=bool)
    for i in range(n):
        j = i
        while j != -1:
            mask[i, j] = True
            j = tree.parents[j]
    return mask


@pytest.mark.parametrize("seed", range(20))
def test_mask_and_seq_ids_match_the_reference(seed: int) -> None:
    tree = random_tree(np.random.default_rng(seed), 1 + seed * 7)
    ref = reference_mask(tree)
    np.testing.assert_array_equal(tree.ancestor_mask(), ref)
    seq = tree_seq_ids(tree.parents)
    for j in range(len(tree)):
        assert seq[j][0] == j + 1
        # llama.cpp rule: query i sees cell j iff cell j carries i's first seq id (i + 1)
        for i in range(len(tree)):
            assert ((i + 1) in seq[j]) == ref[i, j]
    for i in range(len(tree)):
        assert tree.depths[i] == len(tree.path_to(i)) - 1


def test_add_path_merges_shared_prefixes() -> None:
    tree = DraftTree.rooted(7)
    tree.add_path([1, 2, 3])
    tree.add_path([1, 2, 4])
    tree.add_path([5])
    assert tree.tokens == [7, 1, 2, 3, 4, 5]
    assert tree.parents == [-1, 0, 1, 2, 2, 0]
    assert tree.depths == [0, 1, 2, 3, 3, 1]
    assert tree.child(2, 4) == 4 and tree.child(2, 9) is None
    assert tree.path_to(4) == [0, 1, 2, 4]
    with pytest.raises(ValueError):
        tree.add(1, 99)
