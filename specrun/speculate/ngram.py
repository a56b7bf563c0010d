"""Prompt-lookup drafting: continue the text the way it continued before.

When the last few tokens also occur earlier in the prompt or the output, the
tokens that followed them there are a free guess for what follows now (code
repeats names, signatures and whole lines). Earlier occurrences of the last
1..max_ngram tokens are found through an index, and each one's true match
length is then measured backwards (up to `max_match` tokens). Matches are
merged into one tree (shared prefixes share nodes), longest match first, most
recent first among equals, within a node budget.

How long the match is says most about whether the guess is right: measured on
HumanEval completions with the default pair, the first drafted token was
accepted 28% of the time after a 1-token match, 69% after 4 to 7 tokens and
94% after 8 or more. The planner's statistics are therefore kept per match
length bucket (MATCH_BUCKETS), so long matches are verified even where short
ones do not pay.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Hashable, Sequence

from specrun.speculate.base import Draft, Verified
from specrun.speculate.tree import DraftTree


@dataclass(frozen=True)
class NgramConfig:
    max_ngram: int = 4  # longest suffix looked up
    min_ngram: int = 1  # shortest suffix that still counts as a match
    max_matches: int = 8  # earlier occurrences used per suffix length
    max_match: int = 32  # how far back a match is measured


MATCH_BUCKETS = (1, 2, 3, 4, 8, 16)  # a match of length L is keyed by the largest bucket <= L


def match_bucket(length: int) -> int:
    return max(b for b in MATCH_BUCKETS if b <= length)


# P(accepted | parent accepted) for a match length bucket no run has tested yet: the first drafted
# token after such a match, on HumanEval completions with the default pair (1, 4-7, 8+ above; 2
# and 3 measured on 10 prompts since). In RAM on a CPU a chain pays only where most of it is
# right, and the planner's flat 0.8 for untested keys got the chains of short matches verified
# (28-35%: each a missed pass over 16 tokens) but, where the curve was calibrated in a slow spell
# (16 tokens 8.7x one), no long match ever (its worth shows in a chain of 16 at 0.94, not 0.8).
MATCH_PRIORS = {1: 0.28, 2: 0.35, 3: 0.55, 4: 0.69, 8: 0.94, 16: 0.94}


def match_priors(source: str) -> dict[tuple[str, int], float]:
    """The priors of a source keyed (source, match length bucket, ...), for AcceptanceStats.priors."""
    return {(source, bucket): rate for bucket, rate in MATCH_PRIORS.items()}


class NgramDrafter:
    """Keeps an index of every n-gram's end positions, extended as the context grows."""

    costly = False  # a dictionary lookup per step: nothing to prepare while the target verifies, no cache

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

    def accepted(self, verified: Verified) -> None:
        pass  # the index grows from the context itself

    def warm(self, context: Sequence[int]) -> float:
        return 0.0  # the index is built from the context when drafting

    def prepare(self, until: Callable[[], bool], deadline: float | None = None) -> float:
        return 0.0

    def draft(self, context: Sequence[int], max_nodes: int, max_depth: int) -> Draft:
        """A tree rooted at context[-1] (the pending token) with at most `max_nodes` nodes in
        all, and per node the planner's key: ("ngram", match length bucket, depth capped at 3)."""
        tree, keys = self._grow(list(context), max_nodes, max_depth)
        return Draft(tree, keys)

    def _grow(self, ctx: list[int], max_nodes: int, max_depth: int) -> tuple[DraftTree, list[Hashable]]:
        tree, keys = DraftTree.rooted(ctx[-1]), [("root",)]
        if max_nodes <= 1 or max_depth <= 0:
            return tree, keys
        for length, end in self.matches(ctx):
            node = 0
            for tok in ctx[end:end + max_depth]:
                nxt = tree.child(node, tok)
                if nxt is None:
                    if len(tree) >= max_nodes:
                        return tree, keys
                    nxt = tree.add(tok, node)
                    keys.append(("ngram", match_bucket(length), min(tree.depths[nxt], 3)))
                node = nxt
        return tree, keys

    def matches(self, ctx: Sequence[int]) -> list[tuple[int, int]]:
        """(match length, end) of earlier occurrences of the context's last tokens, longest
        first, most recent first among equals; ctx[end] is what followed the occurrence."""
        self._extend(ctx)
        n_ctx, found, seen = len(ctx), [], set()
        for n in range(min(self.config.max_ngram, n_ctx), self.config.min_ngram - 1, -1):
            for end in reversed(self._index.get(tuple(ctx[n_ctx - n:]), [])[-self.config.max_matches:]):
                if end in seen:
                    continue
                seen.add(end)
                length = n  # ctx[end - n:end] == ctx[n_ctx - n:]; extend backwards
                while (length < self.config.max_match and end - length > 0
                       and ctx[end - length - 1] == ctx[n_ctx - length - 1]):
                    length += 1
                found.append((length, end))
        found.sort(key=lambda m: -m[0])  # stable: recency order kept among equal lengths
        return found
