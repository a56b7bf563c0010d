"""A draft tree as flat parallel arrays (as SpecExec stores it).

Node 0 is the root: the last committed token, not yet evaluated by the target.
Every other node i holds a drafted token `tokens[i]` whose parent is
`parents[i]` (< i, so the arrays are in topological order) at depth
`depths[i]` = depths[parent] + 1. Everything else (attention mask, llama.cpp
sequence ids, paths) is derived from these arrays, never stored beside them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from specrun.engines.base import ancestor_mask


@dataclass
class DraftTree:
    tokens: list[int] = field(default_factory=list)  # [n]
    parents: list[int] = field(default_factory=list)  # [n], -1 for the root
    depths: list[int] = field(default_factory=list)  # [n], 0 for the root

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
        return len(self.tokens) - 1

    def child(self, node: int, token: int) -> int | None:
        """The child of `node` holding `token`, if any."""
        for i in range(node + 1, len(self.tokens)):
            if self.parents[i] == node and self.tokens[i] == token:
                return i
        return None

    def add_path(self, tokens: list[int], parent: int = 0) -> None:
        """Merge a chain of tokens under `parent`, sharing existing prefixes (a trie insert)."""
        for tok in tokens:
            nxt = self.child(parent, tok)
            parent = self.add(tok, parent) if nxt is None else nxt

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root to `node`, both included."""
        path = []
        while node != -1:
            path.append(node)
            node = self.parents[node]
        return path[::-1]

    def ancestor_mask(self) -> np.ndarray:
        """bool [n, n]: mask[i, j] iff node j is node i or one of its ancestors."""
        return ancestor_mask(self.parents)

    def subtree(self, keep: list[int]) -> "DraftTree":
        """The tree of nodes `keep` (sorted, root first, closed under parents), re-indexed in order."""
        index = {old: new for new, old in enumerate(keep)}
        out = DraftTree()
        for old in keep:
            parent = self.parents[old]
            if parent != -1 and parent not in index:
                raise ValueError(f"node {old} kept without its parent {parent}")
            out.tokens.append(self.tokens[old])
            out.parents.append(-1 if parent == -1 else index[parent])
            out.depths.append(self.depths[old])
        return out
