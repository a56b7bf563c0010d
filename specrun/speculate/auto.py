"""`--spec auto`: prompt lookup when it pays, the draft model while it is measured to pay.

Prompt lookup costs next to nothing to draft, so its planned tree is used
whenever the planner keeps any of it. The draft model costs a pass per tree
level, so auto measures the tokens per second of wall time it gives and uses
it only while that beats plain decoding. What it learns (`DraftSpeed`) is
kept across runs with the calibration, so a run can skip loading a draft
model that does not pay on this machine.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

from specrun.speculate.base import Proposal
from specrun.speculate.planner import PassCost, PlannedSpeculator, learn_pass

TRY_STEPS = 3  # steps with the draft model before its rate is trusted
RETRY_EVERY = 64  # steps without the draft model before looking again, when it was close
RETRY_RUNS = 10  # runs without loading it before its remembered rate is measured afresh
CLOSE = 0.8  # a draft model this fraction of plain speed or faster is worth looking at again


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


class AutoSpeculator:
    """Per step: prompt lookup when its planned tree pays, else the draft model while its
    measured tokens per second beat plain decoding; it is tried for a few steps first and
    again now and then, since what pays changes with the text."""

    name = "auto"

    def __init__(self, lookup: PlannedSpeculator, model: PlannedSpeculator | None, cost: PassCost,
                 speed: DraftSpeed | None = None) -> None:
        self.lookup, self.model, self.cost = lookup, model, cost
        self.speed = speed if speed is not None else DraftSpeed()
        self.max_depth = max(lookup.max_depth, model.max_depth if model else 0)
        self._since_model = 0

    def propose(self, context: Sequence[int], max_depth: int, max_nodes: int) -> Proposal:
        """The lookup's proposal, or the draft model's; its `source` is the part that made it
        (None: a resting step, which says nothing of the model's rate)."""
        proposal = self.lookup.propose(context, max_depth, max_nodes)
        if self.model is not None and self._model_pays() and not self._lookup_beats_model(proposal):
            drafted = self.model.propose(context, max_depth, max_nodes)
            if not drafted.skipped:
                proposal = drafted
            elif len(proposal.tree) == 1:
                proposal = replace(proposal, source=None)
        self._since_model += 1
        return proposal

    def warm(self, context: Sequence[int]) -> float:
        return self.model.warm(context) if self.model is not None else 0.0

    def prepare(self, proposal: Proposal, until: Callable[[], bool]) -> float:
        return proposal.source.prepare(proposal, until) if proposal.source is not None else 0.0

    def _lookup_beats_model(self, proposal: Proposal) -> bool:
        """Whether the lookup tree's expected tokens per second (it costs nothing to draft) beat
        the draft model's measured rate. Where a pass over many tokens costs what one does (an
        offloaded target), a lookup tree of a few likely nodes always pays, but a draft model's
        tree of dozens pays more; on a CPU the model rarely pays and lookup wins when it has any."""
        if len(proposal.tree) == 1:
            return False
        rate = self.speed.rate
        return (rate is not None and self.speed.known
                and self.lookup.expected_tokens(proposal) / self.cost.cost(len(proposal.tree)) >= rate)

    def _model_pays(self) -> bool:
        plain = 1.0 / self.cost.cost(1)
        if self._since_model >= RETRY_EVERY and self.speed.close_to(plain):
            return True  # close enough that the text may have changed the verdict: look again
        return self.speed.pays(plain)

    def observe(self, proposal: Proposal, path: list[int], wall_s: float, pass_s: float | None = None) -> None:
        used = proposal.source
        if used is None:  # a resting step: only its pass is worth learning from
            learn_pass(self.cost, len(proposal.tree), pass_s)
            return
        if used is self.model:  # a new prompt's prefill in the draft is not what drafting costs
            self.speed.record(len(path) / max(wall_s - proposal.catch_up_s, 1e-9), 1.0 / self.cost.cost(1))
            self._since_model = 0
        used.observe(proposal, path, wall_s, pass_s)
