"""What one generation may risk on speculation: never much slower than plain decoding.

A plan maximises expected tokens per second, and over a long generation the
expectation is what comes out. A short one has no time to average a miss out:
HumanEval/7 in RAM generates 13 tokens, two 4-node trees priced well both
missed, and the generation ran at 0.85-0.93x plain. So each generation keeps
an allowance, in seconds: SHARE of what plain decoding would have taken for the
tokens so far, plus what speculation saved, less what it lost (wall time
against a plain step's, measured in this generation: drafting what the plan
then drops is part of it). A plan whose extra cost over a plain step the
allowance covers may be verified. Beyond it, a plan must
accept enough tokens to pay the difference back with a chance of at least
1 - MISS, by the rates the evidence stands behind (young keys one standard
deviation below their mean, untested keys at nothing): the rates plans are
priced at are optimistic while keys are young, and a wide tree's many
children priced so let 16-node trees through in RAM that all missed.
A generation's first decode step is plain: it measures what a plain step costs.

It holds only where a pass's cost climbs with its tokens (STEEP: in RAM on a
CPU a second token costs half a pass), so a miss costs a good share of a step.
Where passes are flat (a streamed target, a GPU) a miss costs little beside
what a hit gives, and the allowance is too small for the trees that pay: on the
Xeon's disk it took the draft model's trees from 2.74x plain to 2.13x and the
free drafters' from 1.61x to 1.11x.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, Sequence


class Priced(Protocol):
    """A cost curve, or a step's (planner.py)."""

    def cost(self, n: int) -> float:
        """Seconds of a pass over n tokens."""
        ...


SHARE = 0.03  # of plain decoding's time a generation may lose at worst on plans that miss
MISS = 0.25  # the chance a plan beyond the allowance may have of not paying its difference back
SMOOTHING = 0.3  # weight of the newest plain step in what a plain step costs
STEEP = 1.2  # a pass over 2 tokens costing this many times one's or more: the allowance holds


def holds(cost: Priced) -> bool:
    """Whether passes priced by `cost` climb steeply enough with their tokens for an allowance."""
    return cost.cost(2) >= STEEP * cost.cost(1)


@dataclass
class Allowance:
    """Seconds a generation may still lose against plain decoding (`spare_s`), and what a plain
    step costs here (`plain_s`: None until one was measured)."""

    share: float = SHARE
    miss: float = MISS
    spare_s: float = 0.0
    plain_s: float | None = None

    def admits(self, step_s: float, plain_step_s: float, at_least: Sequence[float]) -> bool:
        """Whether a plan whose step the cost curve prices at `step_s` seconds, against
        `plain_step_s` for a plain one, may be verified (the curve gives the shape, the plain
        steps measured here the scale), where at_least[j] (j >= 1) is the sure chance it
        accepts j tokens or more."""
        if self.plain_s is None:
            return False
        short = (step_s / plain_step_s - 1) * self.plain_s - self.spare_s
        if short <= 0:
            return True
        need = math.ceil(short / ((1 + self.share) * self.plain_s))  # tokens that pay it back
        return need < len(at_least) and at_least[need] >= 1 - self.miss

    def step(self, tokens: int, wall_s: float, speculated: bool) -> None:
        """A step produced `tokens` tokens in `wall_s` seconds; `speculated`: it verified a tree
        (else it measures a plain step: with the drafting the plan then dropped, which the
        allowance is not for, and which on a tiny model took half a step)."""
        if not speculated:
            self.plain_s = wall_s if self.plain_s is None else self.plain_s + SMOOTHING * (wall_s - self.plain_s)
        if self.plain_s is not None:  # (None: a speculator that plans without it speculated first)
            self.spare_s += (1 + self.share) * tokens * self.plain_s - wall_s


@dataclass(frozen=True)
class Risk:
    """A plan's candidates as an allowance judges them: per node, the chance the evidence stands
    behind that it is accepted (merge.chances with sure rates), and its depth. The sure chance
    of accepting j tokens or more is taken as the best kept node's at depth j. Nodes at one
    depth exclude each other, so their sum would be the chance if rates held node by node,
    but they do not: in RAM, 4-node trees whose children's sure chances summed past 0.75 got a
    token 44% of the time (worst HumanEval prompt 0.91-0.94x plain, 0.93-0.96x with the best)."""

    allowance: Allowance
    sure: Sequence[float]
    depths: Sequence[int]
