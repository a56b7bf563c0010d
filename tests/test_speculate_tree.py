from __future__ import annotations

import numpy as np
import pytest

from specrun.speculate.tree import DraftTree
from tests.fakes import add_path, path_to


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


def reference_child(tree: DraftTree, node: int, token: int) -> int | None:
    """Obviously right: scan every node."""
    return next((i for i in range(len(tree)) if tree.parents[i] == node and tree.tokens[i] == token), None)


@pytest.mark.parametrize("seed", range(20))
def test_mask_depths_and_child_index_match_the_references(seed: int) -> None:
    rng = np.random.default_rng(seed)
    tree = random_tree(rng, 1 + seed * 7)
    np.testing.assert_array_equal(tree.ancestor_mask(), reference_mask(tree))
    for i in range(len(tree)):
        assert tree.depths[i] == len(path_to(tree, i)) - 1
        for token in range(100):
            assert tree.child(i, token) == reference_child(tree, i, token)
    keep = sorted({j for i in rng.integers(len(tree), size=3) for j in path_to(tree, int(i))})
    sub = tree.subtree(keep)
    for new, old in enumerate(keep):
        assert sub.tokens[new] == tree.tokens[old] and sub.depths[new] == tree.depths[old]
        assert sub.child(sub.parents[new], sub.tokens[new]) == new if new else True


def test_add_path_merges_shared_prefixes() -> None:
    """The tests' own tree building (tests/fakes.py) on the tree's child index."""
    tree = DraftTree.rooted(7)
    add_path(tree, [1, 2, 3])
    add_path(tree, [1, 2, 4])
    add_path(tree, [5])
    assert tree.tokens == [7, 1, 2, 3, 4, 5]
    assert tree.parents == [-1, 0, 1, 2, 2, 0]
    assert tree.depths == [0, 1, 2, 3, 3, 1]
    assert tree.child(2, 4) == 4 and tree.child(2, 9) is None
    assert path_to(tree, 4) == [0, 1, 2, 4]
    with pytest.raises(ValueError):
        tree.add(1, 99)
    with pytest.raises(ValueError, match="without its parent"):
        tree.subtree([0, 2])
    rebuilt = DraftTree(list(tree.tokens), list(tree.parents), list(tree.depths))  # from arrays alone
    assert [rebuilt.child(p, t) for p, t in zip(tree.parents, tree.tokens)] == \
        [tree.child(p, t) for p, t in zip(tree.parents, tree.tokens)]

