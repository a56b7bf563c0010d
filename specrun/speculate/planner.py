"""Choosing what to verify from measured costs (the Sequoia / SmartSpec idea, per step).

A drafter proposes a candidate tree and tags each node with a key describing
how it was found (for prompt lookup: the match length and depth). Running
statistics give, per key, the chance that a node is accepted given that its
parent was. A node's chance of acceptance is the product along its path, so it
never exceeds its parent's, and the best k-node subtree is the k likeliest
nodes. With the target's measured cost c(n) of verifying n tokens, the plan
keeps the k maximising expected tokens per second,

    (1 + sum of the k nodes' acceptance chances) / c(k + 1),

where k = 0 is plain decoding: when nothing pays, nothing is speculated. On a
CPU c(n) grows almost linearly and only likely nodes survive; on an offloaded
target c(n) is flat for hundreds of tokens and large trees win.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Hashable, Protocol, Sequence

import numpy as np

from specrun.spec.tree import DraftTree


@dataclass(frozen=True)
class CostCurve:
    """Seconds for one target pass over n tokens, measured at a few sizes, interpolated between."""

    sizes: tuple[int, ...]  # increasing, starting at 1
    seconds: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.sizes or self.sizes[0] != 1 or list(self.sizes) != sorted(set(self.sizes)):
            raise ValueError("sizes must increase from 1")
        if len(self.sizes) != len(self.seconds) or min(self.seconds) <= 0:
            raise ValueError("one positive time per size")

    def cost(self, n: int) -> float:
        if n <= self.sizes[-1]:
            return float(np.interp(n, self.sizes, self.seconds))
        if len(self.sizes) == 1:
            return self.seconds[0] * n
        (n0, n1), (t0, t1) = self.sizes[-2:], self.seconds[-2:]
        average = (t1 - self.seconds[0]) / (n1 - 1)  # a flat last segment is noise, not a trend
        return t1 + max((t1 - t0) / (n1 - n0), average) * (n - n1)

    @property
    def max_size(self) -> int:
        return self.sizes[-1]


@dataclass
class AcceptanceStats:
    """Per key: how often a drafted node was accepted when its parent was.

    The rate is optimistic by `confidence` standard deviations of the Beta posterior (an
    upper confidence bound). A key that was unlucky in its first tests therefore still gets
    verified now and then, until enough data says it does not pay; without the bound a
    key's first two failures could rule it out for good. Keys seen fewer than `explore`
    times count as `optimistic`. The counts persist with the calibration."""

    prior_accept: float = 1.0
    prior_reject: float = 1.0
    explore: int = 2
    optimistic: float = 0.8
    confidence: float = 1.0
    counts: dict[Hashable, list[int]] = field(default_factory=dict)  # key -> [accepted, tested]

    def rate(self, key: Hashable) -> float:
        accepted, tested = self.counts.get(key, (0, 0))
        if tested < self.explore:
            return self.optimistic
        n = tested + self.prior_accept + self.prior_reject
        mean = (accepted + self.prior_accept) / n
        return min(1.0, mean + self.confidence * float(np.sqrt(mean * (1 - mean) / (n + 1))))

    def update(self, key: Hashable, accepted: bool) -> None:
        c = self.counts.setdefault(key, [0, 0])
        c[0] += int(accepted)
        c[1] += 1


def node_chances(tree: DraftTree, keys: Sequence[Hashable], stats: AcceptanceStats) -> list[float]:
    """P(node accepted) for every node: 1 for the root, parent's chance times the key's rate."""
    chances = [1.0] * len(tree)
    for i in range(1, len(tree)):
        chances[i] = chances[tree.parents[i]] * stats.rate(keys[i])
    return chances


def best_subtree(chances: Sequence[float], cost: CostCurve, max_nodes: int | None = None) -> list[int]:
    """Node indices to verify (root first, a connected subtree): the k likeliest non-root
    nodes for the k maximising (1 + their chances) / cost(k + 1). Ties keep fewer nodes."""
    limit = min(len(chances), max_nodes or cost.max_size)  # no plans beyond what was measured
    order = sorted(range(1, len(chances)), key=lambda i: (-chances[i], i))[: limit - 1]
    best_k, best_rate, expected = 0, 1.0 / cost.cost(1), 1.0
    for k, i in enumerate(order, 1):
        expected += chances[i]
        rate = expected / cost.cost(k + 1)
        if rate > best_rate * (1 + 1e-9):
            best_k, best_rate = k, rate
    return [0] + sorted(order[:best_k])


def expected_speedup(chances: Sequence[float], keep: Sequence[int], cost: CostCurve) -> float:
    """Expected tokens per second of verifying `keep`, relative to plain decoding."""
    return sum(chances[i] for i in keep) / cost.cost(len(keep)) * cost.cost(1)


class Drafter(Protocol):
    costly: bool  # drafting costs time worth saving (a draft model), not next to nothing (lookup)

    def draft(self, context: Sequence[int], max_nodes: int, max_depth: int) -> tuple[DraftTree, list[Hashable]]:
        """A candidate tree rooted at context[-1] and a planner key per node."""
        ...

    def accepted(self, tokens: Sequence[int]) -> None:
        """The target accepted these drafted tokens after the root (a draft model keeps their KV)."""
        ...


class PlannedSpeculator:
    """Drafts a candidate tree, then verifies only the subtree that pays on this hardware
    (`cost` given), or every drafted node (`cost` None: a fixed budget).

    Learns per-key acceptance from what the target accepts; `stats` may be shared and saved."""

    def __init__(self, name: str, drafter: Drafter, cost: CostCurve | None, stats: AcceptanceStats,
                 max_nodes: int = 32) -> None:
        self.name, self.drafter, self.cost, self.stats = name, drafter, cost, stats
        self.max_nodes = max_nodes
        self._keys: list[Hashable] = []
        # Candidates to draft next step when planning: a little more than the last plan kept,
        # so a costly drafter (a draft model) does not grow nodes that will not be verified.
        self._candidates = max_nodes
        # After a plan that kept nothing, a costly drafter rests for `_rest` steps, doubling
        # up to MAX_REST while plans stay empty: drafts nobody verifies only cost time.
        self._rest, self._resting = 1, 0
        self.skipped = False  # the last proposal drafted nothing (resting)

    MAX_REST = 32

    def propose(self, context: Sequence[int], max_depth: int) -> DraftTree:
        self.skipped = False
        if self.cost is None:
            tree, self._keys = self.drafter.draft(context, self.max_nodes, max_depth)
            return tree
        if self._resting > 0:
            self._resting -= 1
            self.skipped = True
            self._keys = [("root",)]
            return DraftTree.rooted(context[-1])
        limit = min(self._candidates, self.max_nodes, self.cost.max_size)
        candidates, keys = self.drafter.draft(context, limit, max_depth)
        keep = best_subtree(node_chances(candidates, keys, self.stats), self.cost)
        self._keys = [keys[i] for i in keep]
        self._candidates = max(2 * len(keep) + 1, 3)
        if len(keep) == 1 and self.drafter.costly:
            self._resting, self._rest = self._rest, min(2 * self._rest, self.MAX_REST)
        else:
            self._rest = 1
        return candidates.subtree(keep)

    def observe(self, tree: DraftTree, path: list[int], seconds: float) -> None:
        """Each node whose parent was accepted was tested: it matched the target's draw or not."""
        accepted = set(path)
        for i in range(1, len(tree)):
            if tree.parents[i] in accepted:
                self.stats.update(self._keys[i], i in accepted)
        self.drafter.accepted([tree.tokens[i] for i in path[1:]])


class AutoSpeculator:
    """Per step: prompt lookup when its planned tree pays (it costs nothing to draft), else
    the draft model while its measured tokens per second beat plain decoding.

    The draft model's rate is an exponential average over the steps that used it,
    drafting time included; it is tried for a few steps first and again now and then,
    since what pays changes with the text. The rate is remembered across runs, per draft
    model, in `memory` ({"rate", "steps", "runs_without"}; saved with the calibration), so
    a run can skip loading a draft model that does not pay here (`load_model`)."""

    name = "auto"
    TRY_STEPS = 3
    RETRY_EVERY = 64  # steps without the draft model before looking again, when it was close
    RETRY_RUNS = 20  # runs without loading it before its remembered rate is measured afresh
    CLOSE = 0.8  # a draft model this fraction of plain speed or faster is worth looking at again

    def __init__(self, lookup: PlannedSpeculator, model: PlannedSpeculator | None, cost: CostCurve,
                 memory: dict[str, float] | None = None) -> None:
        self.lookup, self.model, self.cost = lookup, model, cost
        self.memory = memory if memory is not None else {}
        self._used: PlannedSpeculator | None = None
        self._since_model = 0
        self._t_propose = 0.0

    @classmethod
    def load_model(cls, memory: dict[str, float], cost: CostCurve) -> bool:
        """Whether a run should load the draft model at all (loading, checking and prefilling
        it costs about a second here), judged from its remembered rate. A run that skips it
        is counted; after RETRY_RUNS such runs the rate is forgotten and measured again, since
        the build, the machine or the text may have changed."""
        rate = memory.get("rate")
        if rate is None or memory.get("steps", 0) < cls.TRY_STEPS or rate > cls.CLOSE / cost.cost(1):
            return True
        runs = int(memory.get("runs_without", 0)) + 1
        if runs >= cls.RETRY_RUNS:
            memory.clear()
            return True
        memory["runs_without"] = runs
        return False

    @property
    def _model_rate(self) -> float | None:  # tokens per second when drafting with the model
        return self.memory.get("rate")

    @property
    def _model_steps(self) -> int:
        return int(self.memory.get("steps", 0))

    def propose(self, context: Sequence[int], max_depth: int) -> DraftTree:
        tree = self.lookup.propose(context, max_depth)
        self._used = self.lookup
        if len(tree) == 1 and self.model is not None and self._model_pays():
            self._t_propose = time.perf_counter()
            tree = self.model.propose(context, max_depth)
            self._used = None if self.model.skipped else self.model  # a resting step says nothing of its rate
            self._t_propose = time.perf_counter() - self._t_propose
        self._since_model += 1
        return tree

    def _model_pays(self) -> bool:
        if self._model_steps < self.TRY_STEPS or self._model_rate is None:
            return True
        plain = 1.0 / self.cost.cost(1)
        if self._since_model >= self.RETRY_EVERY and self._model_rate > self.CLOSE * plain:
            return True  # close enough that the text may have changed the verdict: look again
        return self._model_rate > plain

    def observe(self, tree: DraftTree, path: list[int], seconds: float) -> None:
        if self._used is None:
            return
        self._used.observe(tree, path, seconds)
        if self._used is self.model:
            rate = len(path) / (self._t_propose + seconds)
            old = self._model_rate
            self.memory["rate"] = rate if old is None else 0.7 * old + 0.3 * rate
            self.memory["steps"] = self._model_steps + 1
            self.memory["runs_without"] = 0
            self._since_model = 0
        self._used = None
