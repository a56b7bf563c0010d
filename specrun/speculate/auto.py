"""`--spec auto`: the free sources every step, the draft model while it is measured to pay.

Prompt lookup, the suffix index and recycled top-k cost next to nothing to
draft, so their merged tree is planned every step. The draft model costs a
pass per tree level, so auto measures the tokens per second of wall time the
steps it drafted in gave, and lets it draft only while that beats plain
decoding and the free sources' expected rate. What it learns (`DraftSpeed`) is
kept across runs with the calibration, so a run can skip loading a draft
model that does not pay on this machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from specrun.speculate.base import Proposal
from specrun.speculate.planner import PassCost

TRY_STEPS = 3  # steps with the draft model before its rate is trusted
RETRY_EVERY = 64  # steps without the draft model before looking again, when it was close
RETRY_RUNS = 10  # runs without loading it before its remembered rate is measured afresh
CLOSE = 0.8  # a draft model this fraction of plain speed or faster is worth looking at again
FREE_MARGIN = 1.5  # the free drafters' expected rate over the draft model's measured one that leaves it out
HOPEFUL = 0.9  # each level's chance in `could_pay`: above the 72-76% a 0.5B draft's nodes were measured right


def could_pay(cost: PassCost, draft_pass_s: float) -> bool:
    """Whether the draft model could beat plain decoding on this cost curve at all: a chain of
    n - 1 of its nodes, each level accepted with chance HOPEFUL and drafted at `draft_pass_s` a
    level, verified in one pass over n tokens, for any n the curve prices. Where a second token
    costs nearly a whole pass and the draft shares the cores (RAM on the 2-core EPYC: 2 tokens
    1.91x one), none can; trying it there cost a fresh store's first prompt a third of its speed
    (0.66x plain) for nodes the planner then never verified."""
    plain = 1.0 / cost.cost(1)
    expected, level = 1.0, 1.0
    for n in range(2, cost.max_size + 1):
        level *= HOPEFUL
        expected += level
        if expected / (cost.cost(n) + (n - 1) * draft_pass_s) > plain:
            return True
    return False


@dataclass
class DraftSpeed:
    """One draft model's measured speed here: tokens per second of wall time in the steps that
    drafted with it (an exponential average), how many such steps, and how many runs since
    one last loaded it."""

    rate: float | None = None
    steps: int = 0
    runs_without: int = 0
    plain: float | None = None  # plain decoding's rate by the cost curve when `rate` was measured

    @property
    def known(self) -> bool:
        return self.rate is not None and self.steps >= TRY_STEPS

    def record(self, rate: float, plain: float | None = None) -> None:
        self.rate = rate if self.rate is None else 0.7 * self.rate + 0.3 * rate
        self.plain = plain if plain is not None else self.plain
        self.steps += 1
        self.runs_without = 0

    def speedup(self, plain_rate: float) -> float:
        """Its rate over plain decoding's, both as measured at the time: a period that slowed
        the whole machine (a busy CPU) moves both, and leaves the verdict as it was."""
        return (self.rate or 0.0) / (self.plain or plain_rate)

    def pays(self, plain_rate: float) -> bool:
        return not self.known or self.speedup(plain_rate) > 1.0

    def close_to(self, plain_rate: float) -> bool:
        """Near enough plain decoding that a change of text may tip the verdict."""
        return self.speedup(plain_rate) > CLOSE

    def should_load(self, plain_rate: float) -> bool:
        """Whether a run should load the draft model at all (loading, checking and prefilling
        it costs about a second here). A run that skips it is counted; after RETRY_RUNS such
        runs the rate is forgotten and measured again, since the build, the machine or the
        text may have changed."""
        if not self.known or self.close_to(plain_rate):
            return True
        self.runs_without += 1
        if self.runs_without >= RETRY_RUNS:
            self.forget()
            return True
        return False

    def forget(self) -> None:
        self.rate, self.steps, self.runs_without = None, 0, 0

    def to_json(self) -> dict[str, Any]:
        return {"rate": self.rate, "steps": self.steps, "runs_without": self.runs_without, "plain": self.plain}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "DraftSpeed":
        rate, plain = data.get("rate"), data.get("plain")
        return cls(None if rate is None else float(rate), int(data.get("steps", 0)), int(data.get("runs_without", 0)),
                   None if plain is None else float(plain))


class ModelGate:
    """auto's gate on the draft model (planned.Gate): it drafts while its measured tokens per
    second beat plain decoding and what the free sources' plan of the step is expected to
    give; it is tried for a few steps first and again now and then, since what pays changes
    with the text."""

    def __init__(self, cost: PassCost, speed: DraftSpeed | None = None) -> None:
        self.cost = cost
        self.speed = speed if speed is not None else DraftSpeed()
        self._since_model = 0

    def wants(self, free_rate: float) -> bool:
        """Where a pass over many tokens costs what one does (an offloaded target), a free plan
        of a few likely nodes always pays, but the draft model's tree of dozens pays more; on a
        CPU the model rarely pays and the free sources win when they have anything."""
        self._since_model += 1
        plain = 1.0 / self.cost.cost(1)
        if self._since_model > RETRY_EVERY and self.speed.close_to(plain):
            return True  # close enough that the text may have changed the verdict: look again
        if not self.speed.pays(plain):
            return False
        # Its nodes join the free ones rather than replace them, so only its drafting time is
        # saved by leaving it out: worth it where the free plan alone is clearly faster (its
        # expected rate leans on optimistic rates of keys seldom tested).
        return not (self.speed.known and free_rate >= FREE_MARGIN * (self.speed.rate or 0.0))

    def observe(self, proposal: Proposal, path: list[int], wall_s: float) -> None:
        if proposal.costly:  # a new prompt's prefill in the draft is not what drafting costs
            self.speed.record(len(path) / max(wall_s - proposal.catch_up_s, 1e-9), 1.0 / self.cost.cost(1))
            self._since_model = 0
