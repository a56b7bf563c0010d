"""Token recycling: the target's own top-k, read where it verified, as a draft for later.

Every verified pass computes, at each node on the accepted path, the target's
distribution over the next token; the walk reads those rows anyway. Their k
likeliest tokens are kept per token (a table token -> its latest top-k
successors, Token Recycling, arXiv 2408.08696), and a draft grows breadth-first
from the pending token through the table: the root's recycled successors, then
theirs. The table's entries were computed in other contexts, so they are a
guess; the planner learns per rank and depth how good a guess. It needs no
model and no memory but the table (a few MB for a 152k vocabulary at k = 8).
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Hashable, Sequence

import numpy as np

from specrun.speculate.base import Draft, Verified
from specrun.speculate.tree import DraftTree

TOP_K = 8  # successors kept per token
MAX_ROWS = 64  # rows of one pass read at most (0.3 ms each for a 152k vocabulary)
RANK_BUCKETS = (0, 1, 2, 4)  # a node of rank r (0: the likeliest) is keyed by the largest bucket <= r


class RecycleTable:
    """token -> int32 [TOP_K] its latest recycled successors, likeliest first."""

    def __init__(self, k: int = TOP_K) -> None:
        self.k = k
        self.successors: dict[int, np.ndarray] = {}

    def learn(self, verified: Verified) -> None:
        """Keep the top-k of the pass's rows: first of the tree's rejected nodes (up to
        MAX_ROWS: each row is the target's guess after that token, if in a context that
        was not kept), then of the accepted path (row `verified.rows[i]` follows
        `verified.tokens[i]`), which wins where both saw a token."""
        if verified.logits is None:
            return
        pairs: list[tuple[int, int]] = []
        if verified.tree is not None:
            on_path = set(verified.rows)
            pairs = [(verified.tree.tokens[i], i) for i in range(len(verified.tree)) if i not in on_path]
            pairs = pairs[:max(0, MAX_ROWS - len(verified.rows))]
        for token, row in pairs + list(zip(verified.tokens, verified.rows)):
            self.successors[int(token)] = np.asarray(verified.logits.top_ids(row, self.k), dtype=np.int32)


class RecycleDrafter:
    """Grows a tree breadth-first through the table: each node's children are the recycled
    successors of its token (the top `width(depth)` of them), keyed ("recycle", rank
    bucket, depth capped at 4)."""

    costly = False

    def __init__(self, table: RecycleTable | None = None) -> None:
        self.table = table if table is not None else RecycleTable()

    @staticmethod
    def width(depth: int) -> int:
        """Children per node at `depth`: wide near the root, where guesses are likeliest."""
        return (8, 4, 2)[depth] if depth < 3 else 1

    def draft(self, context: Sequence[int], max_nodes: int, max_depth: int) -> Draft:
        tree, keys = DraftTree.rooted(context[-1]), [("root",)]
        frontier = deque([0])
        while frontier and len(tree) < max_nodes:
            node = frontier.popleft()
            depth = tree.depths[node]
            if depth >= max_depth:
                continue
            successors = self.table.successors.get(tree.tokens[node])
            if successors is None:
                continue
            for rank, tok in enumerate(successors[:self.width(depth)]):
                if len(tree) >= max_nodes:
                    break
                if tree.child(node, int(tok)) is not None:
                    continue
                child = tree.add(int(tok), node)
                keys.append(("recycle", max(b for b in RANK_BUCKETS if b <= rank), min(depth + 1, 4)))
                frontier.append(child)
        return Draft(tree, keys)

    GRAFT = (2, 1, 1)  # children per grafted node, by hop below the leaf

    def graft(self, tree: DraftTree, max_nodes: int, max_depth: int) -> Draft:
        """Continuations below the leaves of another tree (the merged one: where the draft model
        or a lookup stopped), GRAFT[h] recycled successors per node h hops below a leaf, up to
        `max_nodes` nodes in all: the copied tree's nodes are keyed None (not proposed here),
        the grafted ones ("recycle", "graft", rank bucket, hop)."""
        out = DraftTree(list(tree.tokens), list(tree.parents), list(tree.depths))
        keys: list[Hashable] = [None] * len(out)
        has_child = set(tree.parents[1:])
        frontier = deque((i, 0) for i in range(1, len(tree)) if i not in has_child)
        while frontier and len(out) < max_nodes:
            node, hop = frontier.popleft()
            successors = self.table.successors.get(out.tokens[node])
            if successors is None or out.depths[node] >= max_depth or hop >= len(self.GRAFT):
                continue
            for rank, tok in enumerate(successors[:self.GRAFT[hop]]):
                if len(out) >= max_nodes:
                    break
                if out.child(node, int(tok)) is None:
                    frontier.append((out.add(int(tok), node), hop + 1))
                    keys.append(("recycle", "graft", max(b for b in RANK_BUCKETS if b <= rank), hop + 1))
        return Draft(out, keys)

    def accepted(self, verified: Verified) -> None:
        self.table.learn(verified)

    def warm(self, context: Sequence[int]) -> float:
        return 0.0

    def prepare(self, until: Callable[[], bool], deadline: float | None = None) -> float:
        return 0.0
