"""Suffix drafting: continue the text the way earlier text continued the same words.

The last tokens of the context are looked up in a suffix array over a token
stream (the context itself, a session's earlier generations, a corpus of one's
own files), and every earlier occurrence of the longest suffix that occurs
votes for what followed it. The continuations form a trie whose nodes carry
their counts: a node followed by 9 of 10 occurrences is a better guess than
one followed by 1 (SuffixDecoding, arXiv 2411.04975; REST, arXiv 2311.08252).

The context itself is searched through prompt lookup's n-gram index (it grows
a token at a time); text that is read many times (a corpus, earlier
generations) gets a suffix array. The array is built over the stream reversed, so the pattern (the context read
backwards from its last token) grows at its end as the match lengthens and
each longer match narrows the range of the shorter one by binary search; a
match of length L in a stream of n tokens costs O(L log n) comparisons.
Documents are joined with SEPARATOR, which no token equals, so no match and
no continuation crosses from one document into the next.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np

from specrun.speculate.base import Draft, Verified
from specrun.speculate.ngram import NgramConfig, NgramDrafter, match_bucket
from specrun.speculate.tree import DraftTree

SEPARATOR = -1  # between documents: equal to no token
SHARE_BUCKETS = (0.25, 0.5, 0.75, 0.95)  # edges of a node's share of its parent's occurrences


def suffix_array(stream: np.ndarray) -> np.ndarray:
    """int64 [n]: the start of every suffix of `stream` (int32 [n]) in sorted order; shorter first on ties."""
    if len(stream) == 0:
        return np.zeros(0, dtype=np.int64)
    from pydivsufsort import divsufsort  # a compiled sort (libdivsufsort); imported where it is needed
    return np.asarray(divsufsort(np.ascontiguousarray(stream, dtype=np.int32)), dtype=np.int64)


class SuffixIndex:
    """A suffix array over documents joined by SEPARATOR, read backwards (see the module's
    docstring). `matches(context)` finds where the context's longest suffix occurs."""

    def __init__(self, documents: Iterable[Sequence[int]] = (), stream: np.ndarray | None = None,
                 order: np.ndarray | None = None) -> None:
        """From documents, or from a stream (forward, documents joined by SEPARATOR) and, when
        kept from before, the suffix array of its reverse (`order`)."""
        if stream is None:
            parts: list[int] = []
            for doc in documents:
                parts.extend(doc)
                parts.append(SEPARATOR)
            stream = np.asarray(parts, dtype=np.int32)
        self.stream = np.asarray(stream, dtype=np.int32)  # forward [n]
        self._reversed = self.stream[::-1].copy()  # [n]
        self.order = suffix_array(self._reversed) if order is None else np.asarray(order, dtype=np.int64)
        if len(self.order) != len(self.stream):
            raise ValueError("the suffix array does not fit the stream")

    def __len__(self) -> int:
        return len(self.stream)

    def matches(self, context: Sequence[int], max_len: int = 32, max_hits: int = 64) -> tuple[int, list[int]]:
        """(L, starts): the longest L <= max_len whose last L context tokens occur in the stream
        with a token after them, and where those continuations start (at most `max_hits`,
        latest in the stream first); (0, []) when not even the last token occurs."""
        rev, order, n = self._reversed, self.order, len(self._reversed)
        lo, hi, found = 0, n, (0, 0, 0)
        for k in range(min(max_len, len(context))):
            token = context[len(context) - 1 - k]

            def at(i: int, k: int = k) -> int:
                j = int(order[i]) + k
                return int(rev[j]) if j < n else SEPARATOR - 1  # a suffix that ended sorts first

            lo, hi = bisect_left(range(n), token, lo, hi, key=at), bisect_right(range(n), token, lo, hi, key=at)
            if not any(self._followed(int(r)) for r in order[lo:hi]):  # stops at the first followed one
                break  # (only where a document ends is an occurrence not followed by a token)
            found = (k + 1, lo, hi)
        length, lo, hi = found
        starts = sorted((n - int(r) for r in order[lo:hi] if self._followed(int(r))), reverse=True)
        return (length, starts[:max_hits])

    def _followed(self, r: int) -> bool:
        """Reversed suffix r ends its forward occurrence at n-1-r: is a token next, at n-r?"""
        return r > 0 and self.stream[len(self.stream) - r] != SEPARATOR


@dataclass(frozen=True)
class SuffixConfig:
    max_len: int = 32  # longest suffix matched
    max_hits: int = 64  # occurrences that vote on the continuation at most


class SuffixDrafter:
    """Drafts the trie of what followed the context's longest suffix wherever it occurred:
    in the context itself (through prompt lookup's n-gram index, extended as the context
    grows: a suffix array rebuilt every step would cost an O(n) sort a step, and
    libdivsufsort's OpenMP threads spinning after it slowed the target's next pass by a
    fifth on 2 cores), and in `shared` suffix arrays built once (a session's earlier
    generations, a corpus)."""

    costly = False

    def __init__(self, shared: Callable[[], Sequence[SuffixIndex]] = lambda: (),
                 config: SuffixConfig = SuffixConfig()) -> None:
        self.shared, self.config = shared, config
        self._own = NgramDrafter(NgramConfig(max_ngram=4, max_matches=config.max_hits, max_match=config.max_len))

    def _occurrences(self, context: Sequence[int]) -> list[tuple[int, Sequence[int], list[int]]]:
        """(match length, the stream it is in, where the continuations start) per place read."""
        found = self._own.matches(context)
        longest = found[0][0] if found else 0
        out: list[tuple[int, Sequence[int], list[int]]] = [
            (longest, context, [end for length, end in found if length == longest])] if found else []
        for index in self.shared():
            length, starts = index.matches(context, self.config.max_len, self.config.max_hits)
            if starts:
                out.append((length, index.stream, starts))
        return out

    def draft(self, context: Sequence[int], max_nodes: int, max_depth: int) -> Draft:
        """The likeliest `max_nodes` nodes of the continuation trie (empirical probability:
        a node's occurrences over the match's), keyed ("suffix", match length bucket, share
        of the parent's occurrences bucket, depth capped at 3). Only the longest match found
        anywhere votes: a shorter one says less about what comes next."""
        tree, keys = DraftTree.rooted(context[-1]), [("root",)]
        if max_nodes <= 1 or max_depth <= 0:
            return Draft(tree, keys)
        places = self._occurrences(context)
        length = max((p[0] for p in places), default=0)
        if length == 0:
            return Draft(tree, keys)
        trie, counts = DraftTree.rooted(context[-1]), [0]  # counts: occurrences through each node
        for found, stream, starts in places:
            if found < length:
                continue
            for start in starts:
                node = 0
                counts[0] += 1
                for tok in stream[start:start + max_depth]:
                    if tok == SEPARATOR:
                        break
                    child = trie.child(node, int(tok))
                    if child is None:
                        child = trie.add(int(tok), node)
                        counts.append(0)
                    node = child
                    counts[node] += 1
        share = [1.0] + [counts[i] / counts[trie.parents[i]] for i in range(1, len(trie))]
        prob = [1.0] * len(trie)
        for i in range(1, len(trie)):
            prob[i] = prob[trie.parents[i]] * share[i]
        keep = sorted(sorted(range(1, len(trie)), key=lambda i: (-prob[i], i))[:max_nodes - 1])
        tree = trie.subtree([0] + keep)
        keys += [("suffix", match_bucket(length), sum(share[i] >= e for e in SHARE_BUCKETS), min(trie.depths[i], 3))
                 for i in keep]
        return Draft(tree, keys)

    def accepted(self, verified: Verified) -> None:
        pass  # the context grows by itself

    def warm(self, context: Sequence[int]) -> float:
        return 0.0

    def prepare(self, until: Callable[[], bool], deadline: float | None = None) -> float:
        return 0.0
