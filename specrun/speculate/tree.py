"""A draft tree as flat parallel arrays (as SpecExec stores it).

Node 0 is the root: the last committed token, not yet evaluated by the target.
Every other node i holds a drafted token `tokens[i]` whose parent is
`parents[i]` (< i, so the arrays are in topological order) at depth
`depths[i]` = depths[parent] + 1. A (parent, token) -> child index makes
lookups O(1), so growing a tree of n nodes costs O(n), not O(n^2): offloaded
targets verify trees of hundreds of nodes. Everything else (attention masks,
paths) is derived from the arrays, never stored beside them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from specrun.engines.base import ancestor_mask  # one mask for engines and trees


@dataclass
class DraftTree:
    tokens: list[int] = field(default_factory=list)  # [n]
    parents: list[int] = field(default_factory=list)  # [n], -1 for the root
    depths: list[int] = field(default_factory=list)  # [n], 0 for the root
    _children: dict[tuple[int, int], int] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        for node in range(len(self.tokens) - 1, 0, -1):  # built from arrays: index them (first child wins)
            self._children[(self.parents[node], self.tokens[node])] = node

    @classmethod
    def rooted(cls, root_token: int) -> "DraftTree":
        return cls([root_token], [-1], [0])

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, token: int, parent: int) -> int:
        """Append a child of `parent`; returns its index."""
        if not 0 <= parent < len(self.tokens):
            raise ValueError(f"parent {parent} is not a node")
        self.tokens.append(token)
        self.parents.append(parent)
        self.depths.append(self.depths[parent] + 1)
        node = len(self.tokens) - 1
        self._children.setdefault((parent, token), node)
        return node

    def child(self, node: int, token: int) -> int | None:
        """The (first) child of `node` holding `token`, if any."""
        return self._children.get((node, token))

    def ancestor_mask(self) -> np.ndarray:
        """bool [n, n]: mask[i, j] iff node j is node i or one of its ancestors."""
        return ancestor_mask(self.parents)

    def subtree(self, keep: Sequence[int]) -> "DraftTree":
        """The tree of nodes `keep` (sorted, root first, closed under parents), re-indexed in order."""
        index = {old: new for new, old in enumerate(keep)}
        out = DraftTree.rooted(self.tokens[keep[0]])
        for old in keep[1:]:
            parent = self.parents[old]
            if parent not in index:
                raise ValueError(f"node {old} kept without its parent {parent}")
            out.add(self.tokens[old], index[parent])
        return out
