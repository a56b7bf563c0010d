"""How often a drafter's nodes are accepted, per key.

A drafter tags each node with a key describing how it was found (for prompt
lookup: the match length and depth; merge.py adds the company it was proposed
in). The planner prices a node by the rate of
its key (planner.py) and learns from each node the target tested.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Sequence

import numpy as np


@dataclass
class AcceptanceStats:
    """Per key: how often a drafted node was accepted when its parent was.

    The rate is the posterior mean of a Beta prior centred on the key's coarser keys' rate
    (`_prior`), and while a key has been tested fewer than `young` times, `confidence`
    standard deviations above it (an upper confidence bound). A key that was unlucky in its
    first tests therefore still gets verified now and then; without the bound a key's first
    two failures could rule it out for good. Beyond, the
    plans need the rate itself: with the bound kept for good (and counts windowed, so it
    never narrowed), a disk-streamed target's free plans expected 3.95 accepted nodes a
    step and got 1.42 (recycled guesses right 2.4% of the time priced at 10%), and
    verified 27 nodes a pass where fewer paid more.

    A key tested fewer than `explore` times takes the rate of the nearest coarser key that
    was (a tuple key less its last parts: ("suffix", 1, 4, 2) -> ("suffix", 1, 4) ->
    ("suffix", 1), pooling the depths, then the shares), or its prior where a coarser key
    without tests has one (`priors`), and `optimistic` where none has.
    When every new key counted as optimistic, HumanEval's first prompt in RAM verified five
    16-node chains because one proposer's key (a suffix share, a depth) was new, accepted 3
    tokens in all, and ran at 18 tok/s (26 once its keys were known). The counts persist
    with the calibration; the pooled ones are rebuilt from them."""

    prior_accept: float = 1.0
    prior_reject: float = 1.0
    explore: int = 2
    optimistic: float = 0.8
    confidence: float = 1.0
    young: int = 16  # tests below which a key's rate carries the bound
    counts: dict[Hashable, list[float]] = field(default_factory=dict)  # key -> [accepted, tested]
    # coarser key -> the rate its keys start from while untested (a drafter's measured prior: ngram.py)
    priors: dict[Hashable, float] = field(default_factory=dict, compare=False)
    # key -> [accepted, tested] over it and every key it is coarser than (`coarser`)
    pooled: dict[Hashable, list[float]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for key, (accepted, tested) in self.counts.items():
            for coarse in [key] + coarser(key):
                c = self.pooled.setdefault(coarse, [0, 0])
                c[0], c[1] = c[0] + accepted, c[1] + tested
        for c in self.pooled.values():
            while c[1] > self.WINDOW:
                self._halve(c)

    def rate(self, key: Hashable, sure: bool = False) -> float:
        """The rate plans price a node of `key` at; `sure`: one the evidence stands behind
        instead (young keys `confidence` standard deviations below their mean, keys nothing was
        learnt for 0), for what a generation may risk (allowance.py)."""
        accepted, tested = self.counts.get(key, (0, 0))
        above = coarser(key)
        if tested < self.explore:  # priced by the nearest coarser key tested, its own prior above it
            for j, coarse in enumerate(above):
                accepted, tested = self.pooled.get(coarse, (0, 0))
                if tested >= self.explore:
                    above = above[j + 1:]
                    break
                if coarse in self.priors:
                    return self.priors[coarse]
        if tested < self.explore:
            return 0.0 if sure else self.optimistic
        m = self.prior_accept + self.prior_reject
        n = tested + m
        mean = (accepted + m * self._prior(above)) / n
        if tested >= self.young:
            return mean
        bound = self.confidence * float(np.sqrt(mean * (1 - mean) / (n + 1)))
        return max(0.0, mean - bound) if sure else min(1.0, mean + bound)

    def _prior(self, above: Sequence[Hashable]) -> float:
        """The mean a key's own tests are added to: its coarser keys' (`above`, finest first), each
        drawn towards the next coarser one's, from `prior_accept`'s share at the top. A flat
        Beta(1, 1) drew every key to a half: a recycled rank right once in 50 read 0.08 after
        10 tests, 0.14 with the bound (on a key's first run, what plans bought by)."""
        m = self.prior_accept + self.prior_reject
        p = self.prior_accept / m
        for coarse in reversed(above):
            p = self.priors.get(coarse, p)
            accepted, tested = self.pooled.get(coarse, (0, 0))
            p = (accepted + m * p) / (tested + m)
        return p

    # Tests of a key kept at most: beyond, older ones weigh half (recent text and machines count).
    # At 400, prompt lookup's long matches, learnt at 97% on rewrites, kept being verified on
    # HumanEval, where 48 such nodes a prompt missed: a speculative run came out at 0.68x plain.
    WINDOW = 64

    def update(self, key: Hashable, accepted: bool) -> None:
        for c in [self.counts.setdefault(key, [0, 0])] + [self.pooled.setdefault(k, [0, 0])
                                                           for k in [key] + coarser(key)]:
            c[0] += int(accepted)
            c[1] += 1
            if c[1] > self.WINDOW:
                self._halve(c)

    @staticmethod
    def _halve(c: list[float]) -> None:
        """Exact halves: rounding the accepted count up at every halving (every few steps for a
        recycled rank tested four times a step) had added half an acceptance each time."""
        c[0], c[1] = c[0] / 2, c[1] / 2


def coarser(key: Hashable) -> list[Hashable]:
    """The keys `key` pools into, finest first: a tuple less its last parts, down to two."""
    return [key[:n] for n in range(len(key) - 1, 1, -1)] if isinstance(key, tuple) else []
