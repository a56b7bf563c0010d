"""Token recycling: the target's own top-k, read where it verified, as a draft for later.

Every verified pass computes, at each node on the accepted path, the target's
distribution over the next token; the walk reads those rows anyway. Their k
likeliest tokens are kept per token (a table token -> its latest top-k
successors, Token Recycling, arXiv 2408.08696), and a draft grows breadth-first
from the pending token through the table: the root's recycled successors, then
theirs. The table's entries were computed in other contexts, so they are a
guess; the planner learns per rank and depth how good a guess. It needs no
model and no memory but the table (a few MB for a 152k vocabulary at k = 8).

Each row is also kept under the pair of tokens it followed (the token and the
one before it), and a node whose pair was seen grows from that row. Over 10
HumanEval prompts' greedy outputs, the latest row's first guess was the next
token 55% of the time where the pair had a row and 24% where only the token
had one. Pair rows are keyed apart ("recycle", "pair", ...), so plans price
them at their own rate.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Hashable, Sequence

import numpy as np

from specrun.speculate.base import Draft, Verified
from specrun.speculate.tree import DraftTree

TOP_K = 8  # successors kept per token
MAX_PAIRS = 1 << 16  # pairs of tokens kept at most (about 19 MiB), the oldest dropped first
MAX_ROWS = 64  # rows of one pass read at most (0.3 ms each for a 152k vocabulary)
RANK_BUCKETS = (0, 1, 2, 4)  # a node of rank r (0: the likeliest) is keyed by the largest bucket <= r


class RecycleTable:
    """token -> int32 [TOP_K] its latest recycled successors, likeliest first; and the same
    per pair of tokens (the token before, the token)."""

    def __init__(self, k: int = TOP_K) -> None:
        self.k = k
        self.successors: dict[int, np.ndarray] = {}
        self.pairs: dict[tuple[int, int], np.ndarray] = {}  # insertion order: oldest first

    def learn(self, verified: Verified, before: int | None = None) -> None:
        """Keep the top-k of the pass's rows: first of the tree's rejected nodes (up to
        MAX_ROWS: each row is the target's guess after that token, if in a context that
        was not kept), then of the accepted path (row `verified.rows[i]` follows
        `verified.tokens[i]`), which wins where both saw a token. Each row is kept under its
        token and under the pair it ends (its parent's token, or for the root `before`, the
        context's token before it, when known)."""
        if verified.logits is None:
            return
        triples: list[tuple[int | None, int, int]] = []  # (the token before, the token, its row)
        tree = verified.tree
        if tree is not None:
            on_path = set(verified.rows)
            rejected = [i for i in range(len(tree)) if i not in on_path][:max(0, MAX_ROWS - len(verified.rows))]
            triples = [(tree.tokens[tree.parents[i]] if i else before, tree.tokens[i], i) for i in rejected]
        path = list(verified.tokens)
        triples += [(path[j - 1] if j else before, tok, row) for j, (tok, row) in enumerate(zip(path, verified.rows))]
        for prev, token, row in triples:
            top = np.asarray(verified.logits.top_ids(row, self.k), dtype=np.int32)
            self.successors[int(token)] = top
            if prev is not None:
                self.keep_pair((int(prev), int(token)), top)

    def keep_pair(self, pair: tuple[int, int], top: np.ndarray) -> None:
        self.pairs.pop(pair, None)  # to the end: the newest
        self.pairs[pair] = top
        if len(self.pairs) > MAX_PAIRS:
            del self.pairs[next(iter(self.pairs))]

    def after(self, before: int | None, token: int) -> tuple[np.ndarray | None, bool]:
        """(the recycled successors of `token` after `before`, whether the pair's): the pair's row
        where it was seen, else the token's, else None."""
        if before is not None:
            top = self.pairs.get((before, token))
            if top is not None:
                return top, True
        return self.successors.get(token), False


class RecycleDrafter:
    """Grows a tree breadth-first through the table: each node's children are the recycled
    successors of its token after its parent's (the pair's row, else the token's; the top
    `width(depth)` of them), keyed ("recycle", rank bucket, depth capped at 4), or
    ("recycle", "pair", rank bucket, depth capped at 4) from a pair's row."""

    costly = False

    def __init__(self, table: RecycleTable | None = None) -> None:
        self.table = table if table is not None else RecycleTable()
        self._root: tuple[int, int] | None = None  # the last draft's (root, the token before it)

    @staticmethod
    def width(depth: int) -> int:
        """Children per node at `depth`: wide near the root, where guesses are likeliest."""
        return (8, 4, 2)[depth] if depth < 3 else 1

    def draft(self, context: Sequence[int], max_nodes: int, max_depth: int) -> Draft:
        before = context[-2] if len(context) > 1 else None
        self._root = (context[-1], before) if before is not None else None
        tree, keys = DraftTree.rooted(context[-1]), [("root",)]
        frontier = deque([0])
        while frontier and len(tree) < max_nodes:
            node = frontier.popleft()
            depth = tree.depths[node]
            if depth >= max_depth:
                continue
            successors, paired = self.table.after(tree.tokens[tree.parents[node]] if node else before, tree.tokens[node])
            if successors is None:
                continue
            for rank, tok in enumerate(successors[:self.width(depth)]):
                if len(tree) >= max_nodes:
                    break
                if tree.child(node, int(tok)) is not None:
                    continue
                child = tree.add(int(tok), node)
                keys.append(("recycle", *(("pair",) if paired else ()), _bucket(rank), min(depth + 1, 4)))
                frontier.append(child)
        return Draft(tree, keys)

    GRAFT = (2, 1, 1)  # children per grafted node, by hop below the leaf

    def graft(self, tree: DraftTree, max_nodes: int, max_depth: int) -> Draft:
        """Continuations below the leaves of another tree (the merged one: where the draft model
        or a lookup stopped), GRAFT[h] recycled successors per node h hops below a leaf, up to
        `max_nodes` nodes in all: the copied tree's nodes are keyed None (not proposed here),
        the grafted ones ("recycle", "graft", rank bucket, hop), or ("recycle", "pair graft",
        ...) from a pair's row."""
        out = DraftTree(list(tree.tokens), list(tree.parents), list(tree.depths))
        keys: list[Hashable] = [None] * len(out)
        has_child = set(tree.parents[1:])
        frontier = deque((i, 0) for i in range(1, len(tree)) if i not in has_child)
        while frontier and len(out) < max_nodes:
            node, hop = frontier.popleft()
            successors, paired = self.table.after(out.tokens[out.parents[node]], out.tokens[node])
            if successors is None or out.depths[node] >= max_depth or hop >= len(self.GRAFT):
                continue
            for rank, tok in enumerate(successors[:self.GRAFT[hop]]):
                if len(out) >= max_nodes:
                    break
                if out.child(node, int(tok)) is None:
                    frontier.append((out.add(int(tok), node), hop + 1))
                    keys.append(("recycle", "pair graft" if paired else "graft", _bucket(rank), hop + 1))
        return Draft(out, keys)

    def accepted(self, verified: Verified) -> None:
        """Learn the pass's rows; the root's pair is known where this drafter drafted for that root."""
        root = self._root
        self.table.learn(verified, root[1] if root is not None and verified.tokens and root[0] == verified.tokens[0]
                         else None)

    def warm(self, context: Sequence[int]) -> float:
        return 0.0

    def prepare(self, until: Callable[[], bool], deadline: float | None = None) -> float:
        return 0.0


def _bucket(rank: int) -> int:
    return max(b for b in RANK_BUCKETS if b <= rank)
