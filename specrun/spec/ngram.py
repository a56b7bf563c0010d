"""Prompt-lookup drafting: continue the text the way it continued before.

When the last few tokens also occur earlier in the prompt or the output, the
tokens that followed them there are a free guess for what follows now (code
repeats names, signatures and whole lines). All matches of the longest
matching suffix, then of shorter ones, are merged into one tree (shared
prefixes share nodes), most recent match first, within a node budget.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Hashable, Sequence

from specrun.spec.tree import DraftTree


@dataclass(frozen=True)
class NgramConfig:
    max_ngram: int = 4  # longest suffix looked up
    min_ngram: int = 1  # shortest suffix that still counts as a match
    max_matches: int = 8  # earlier occurrences used per suffix length


class NgramDrafter:
    """Keeps an index of every n-gram's end positions, extended as the context grows."""

    costly = False  # a dictionary lookup per step

    def __init__(self, config: NgramConfig = NgramConfig()) -> None:
        self.config = config
        self._index: dict[tuple[int, ...], list[int]] = defaultdict(list)
        self._context: list[int] = []

    def _extend(self, context: Sequence[int]) -> None:
        """Index positions whose continuation is known: n-grams ending before the last token."""
        if len(context) < len(self._context) or list(context[: len(self._context)]) != self._context:
            self._index.clear()
            self._context = []
        start = len(self._context)
        self._context.extend(context[start:])
        ctx = self._context
        for end in range(max(start, 1), len(ctx)):  # n-gram ctx[end-n:end], continuation ctx[end]
            for n in range(self.config.min_ngram, min(self.config.max_ngram, end) + 1):
                self._index[tuple(ctx[end - n:end])].append(end)

    def accepted(self, tokens: Sequence[int]) -> None:
        pass  # the index grows from the context itself

    def draft(self, context: Sequence[int], max_nodes: int, max_depth: int) -> tuple[DraftTree, list[Hashable]]:
        """A tree rooted at context[-1] (the pending token) with at most `max_nodes` nodes in
        all, and per node the planner's key: (match length, depth), both capped at 3."""
        self._extend(context)
        ctx = list(context)
        tree, keys = DraftTree.rooted(ctx[-1]), [("root",)]
        if max_nodes <= 1 or max_depth <= 0:
            return tree, keys
        n_ctx = len(ctx)
        for n in range(min(self.config.max_ngram, n_ctx), self.config.min_ngram - 1, -1):
            ends = self._index.get(tuple(ctx[n_ctx - n:]), [])
            for end in reversed(ends[-self.config.max_matches:]):
                node = 0
                for tok in ctx[end:end + max_depth]:
                    nxt = tree.child(node, tok)
                    if nxt is None:
                        if len(tree) >= max_nodes:
                            break
                        nxt = tree.add(tok, node)
                        keys.append(("ngram", min(n, 3), min(tree.depths[nxt], 3)))
                    node = nxt
                if len(tree) >= max_nodes:
                    return tree, keys
        return tree, keys
