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

c(n) is a whole step's wall time (`StepCost`): the target's calibrated pass plus
the drafting a tree of that size costs, less what hides behind the target
(measured as the run goes). A streamed target reads the next pass's first
layers while the draft works, an overlapped pass has the draft working
alongside, so the drafting that is free there does not shrink the trees; the
rest does. On 2 CPU cores with the target streamed from disk (a model read:
0.33 s), trees of about 11 nodes, drafted in about 0.17 s, gave 6.6 tokens a
0.38 s step; planned on the pass alone, trees of 49 nodes gave 10 a 0.84 s one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

import numpy as np

from specrun.speculate.base import Drafter, Proposal
from specrun.speculate.tree import DraftTree


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


JITTER = 0.005  # seconds: passes this far apart differ by a scheduler's noise, not a busy machine's


class LearntCurve:
    """The calibrated cost curve as runs correct it. Each pass a run times alone (nothing
    drafting beside it) is kept with its size (the last MIN_PASSES per measured size); where
    their median is off the curve by more than CONTRADICTED, the curve is replaced in this
    run: each observed size costs what its passes measured, sizes between observed ones move
    by the ratio between, sizes above the largest by its ratio, sizes below the smallest stay;
    kept monotone. Off by more than FAR (a curve measured in another world: calibrated while
    the machine was busy, 24 tokens 9.1 s where they take 0.8) also marks it `stale`, so the
    next run measures it afresh instead of starting from it."""

    CONTRADICTED = (0.7, 1.4)  # observed / predicted
    FAR = (0.5, 2.0)
    MIN_PASSES = 4  # passes of a size before they may replace the curve

    def __init__(self, curve: CostCurve) -> None:
        self.curve = curve
        self._seen: dict[int, list[float]] = {}  # index of a measured size -> its last passes, in seconds at that size
        self.replaced: list[str] = []  # one line per replacement, for -v
        self.stale = False
        self.version = 0  # replacements so far (what was learnt against an older curve is stale)

    def __eq__(self, other: object) -> bool:  # what it says now; a plain CostCurve is equal to it then
        return self.curve == (other.curve if isinstance(other, LearntCurve) else other)

    __hash__ = None  # type: ignore[assignment]  # it changes

    def cost(self, n: int) -> float:
        return self.curve.cost(n)

    @property
    def max_size(self) -> int:
        return self.curve.max_size

    @property
    def sizes(self) -> tuple[int, ...]:
        return self.curve.sizes

    @property
    def seconds(self) -> tuple[float, ...]:
        return self.curve.seconds

    def observe(self, n: int, seconds: float) -> None:
        """A pass over n tokens took `seconds` with nothing beside it."""
        i = min(range(len(self.sizes)), key=lambda k: (abs(np.log(self.sizes[k] / n)), k))
        last = self._seen.setdefault(i, [])
        last.append(seconds * self.seconds[i] / self.curve.cost(n))  # as if at the measured size
        del last[:-self.MIN_PASSES]
        low, high = self.CONTRADICTED
        if len(last) == self.MIN_PASSES and not low <= self._ratio(i) <= high:
            self._replace(i)

    def _ratio(self, i: int) -> float:
        return (float(np.median(self._seen[i])) + JITTER) / (self.seconds[i] + JITTER)  # ms apart say little

    def _replace(self, trigger: int) -> None:
        seen = sorted(i for i, passes in self._seen.items() if len(passes) >= self.MIN_PASSES // 2)
        ratios = {i: self._ratio(i) for i in seen}
        logs = np.log(np.asarray(self.sizes, dtype=float))
        times: list[float] = []
        for k, t in enumerate(self.seconds):
            if k < seen[0]:
                r = 1.0
            elif k >= seen[-1]:
                r = ratios[seen[-1]]
            else:
                hi = next(i for i in seen if i >= k)
                lo = max(i for i in seen if i <= k)
                w = 0.0 if hi == lo else (logs[k] - logs[lo]) / (logs[hi] - logs[lo])
                r = ratios[lo] ** (1 - w) * ratios[hi] ** w
            times.append(max(t * r, times[-1] if times else 0.0))
        ratio = ratios[trigger]
        self.stale = self.stale or not self.FAR[0] <= ratio <= self.FAR[1]
        self.replaced.append(f"passes over {self.sizes[trigger]} tokens took {ratio:.2f}x what the stored cost curve "
                             f"said: replaced it (1 token {self.seconds[0] * 1000:.0f} -> {times[0] * 1000:.0f} ms, "
                             f"{self.max_size} tokens {self.seconds[-1] * 1000:.0f} -> {times[-1] * 1000:.0f} ms)")
        self.curve = CostCurve(self.sizes, tuple(times))
        self.version += 1
        for i in self._seen:  # what they measured now agrees with the curve: ratios start again from 1
            self._seen[i] = [self.seconds[i]] * len(self._seen[i])


PassCost = CostCurve | LearntCurve  # seconds of a target pass over n tokens


def learn_pass(cost: PassCost | None, n: int, pass_s: float | None) -> None:
    """A pass over n tokens took `pass_s` with nothing beside it (None: the draft worked during
    it): a learnt curve corrects itself from it; a fixed one, or no curve, learns nothing."""
    if pass_s is not None and isinstance(cost, LearntCurve):
        cost.observe(n, pass_s)


@dataclass
class StepCost:
    """Wall seconds of a step verifying n nodes (the root included): the target's pass, plus
    drafting at `per_node` seconds a node for the nodes beyond the `free` ones (found while
    the target verified the previous tree), less the `hidden` seconds a step hides behind the
    target. All are learnt from the steps taken (exponential averages); until then a step
    costs its pass. `hidden` goes negative where drafting slows the pass (shared cores)."""

    passes: PassCost
    per_node: float = 0.0
    hidden: float = 0.0
    steps: int = 0
    kept: float = 0.0  # nodes per verified tree (average): where the next run's first draft starts
    free: float = 0.0  # of them, found during the previous pass (average; 0 without overlap)
    SMOOTHING = 0.3  # weight of the newest step
    _version: int = field(default=0, repr=False, compare=False)  # the curve's replacements `hidden` was learnt against

    def cost(self, n: int) -> float:
        self._follow()
        c = self.passes.cost(n)
        return c if n <= 1 else c + max(0.0, self.per_node * max(0.0, n - self.free) - self.hidden)

    def _follow(self) -> None:
        """What a step hides behind the pass was learnt as the curve's pass less the wall time: a
        replaced curve made it wrong (the curve's error looked like drafting slowing the pass)."""
        version = getattr(self.passes, "version", 0)
        if version != self._version:
            self.hidden, self._version = 0.0, version

    @property
    def max_size(self) -> int:
        return self.passes.max_size

    def observe(self, n: int, drafting_s: float, wall_s: float, needed: float = 1.0, afresh: bool = False,
                free: int = 0) -> None:
        """A step verified n nodes, `free` of them found during the previous pass, after
        `drafting_s` seconds of drafting it waited for, and took `wall_s` seconds. Drafting
        during the previous pass is not counted: it was free but for how it slowed that pass,
        which shows in `hidden`. `needed`: the share of the drafting a step verifying n nodes
        needs; the rest grew candidates the plan dropped (a run's first draft, sized before
        anything was learnt), which would make drafting look dearer a node than it is and
        shrink every later plan. `afresh`: the step was verified because the figures were
        stale; it replaces them instead of averaging in."""
        if n <= 1:
            return  # plain steps say nothing about drafting
        self._follow()
        a = 1.0 if self.steps == 0 or afresh else self.SMOOTHING
        self.per_node += a * (needed * drafting_s / max(n - free, 1) - self.per_node)
        self.hidden += a * (self.passes.cost(n) + drafting_s - wall_s - self.hidden)
        self.kept += a * (n - self.kept)
        self.free += a * (free - self.free)
        self.steps += 1

    def to_json(self) -> dict[str, float]:
        return {"per_node": self.per_node, "hidden": self.hidden, "steps": self.steps, "kept": self.kept,
                "free": self.free}

    @classmethod
    def from_json(cls, passes: PassCost, data: dict[str, Any]) -> "StepCost":
        return cls(passes, float(data["per_node"]), float(data["hidden"]), int(data["steps"]), float(data["kept"]),
                   float(data.get("free", 0.0)))


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

    WINDOW = 400  # tests of a key kept at most: beyond, older ones weigh half (recent text and machines count)

    def update(self, key: Hashable, accepted: bool) -> None:
        c = self.counts.setdefault(key, [0, 0])
        c[0] += int(accepted)
        c[1] += 1
        if c[1] > self.WINDOW:
            c[0], c[1] = (c[0] + 1) // 2, (c[1] + 1) // 2


def node_chances(tree: DraftTree, keys: Sequence[Hashable], stats: AcceptanceStats) -> list[float]:
    """P(node accepted) for every node: 1 for the root, parent's chance times the key's rate."""
    chances = [1.0] * len(tree)
    for i in range(1, len(tree)):
        chances[i] = chances[tree.parents[i]] * stats.rate(keys[i])
    return chances


def best_subtree(chances: Sequence[float], cost: PassCost | StepCost, max_nodes: int | None = None) -> list[int]:
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


class PlannedSpeculator:
    """Drafts a candidate tree, then verifies only the subtree that pays on this hardware
    (`cost` given), or every drafted node (`cost` None: a fixed budget).

    Learns per-key acceptance from what the target accepts; `stats` may be shared and saved."""

    def __init__(self, name: str, drafter: Drafter, cost: PassCost | None, stats: AcceptanceStats,
                 max_nodes: int = 32, max_depth: int = 16, step_cost: StepCost | None = None, *,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.name, self.drafter, self.cost, self.stats = name, drafter, cost, stats
        self.clock = clock  # times drafting (tests pass a fake one; a drafter's own must be the same)
        self.max_nodes, self.max_depth = max_nodes, max_depth
        # What the plan maximises over: `step_cost` (shared, kept with the calibration), else learnt here.
        self.step_cost = step_cost if step_cost is not None else StepCost(cost) if cost is not None else None
        # Candidates to draft next step when planning: a little more than the last plan kept,
        # so a costly drafter (a draft model) does not grow nodes that will not be verified.
        # With nothing learnt, FIRST_DRAFT: trees grow a quarter a step from there while plans
        # keep them whole (a first draft of 256 nodes took a second on 2 cores, and what it
        # taught about drafting costs misled the plans after it).
        step = self.step_cost
        self._candidates = (self._drafts_for(round(step.kept)) if step is not None and step.steps
                            else min(max_nodes, self.FIRST_DRAFT))
        # After a plan that kept nothing, a costly drafter rests for `_rest` steps, doubling
        # up to MAX_REST while plans stay empty: drafts nobody verifies only cost time.
        self._rest, self._resting = 1, 0
        # Proposals since a draft tree was last verified. What earlier runs taught about drafting
        # costs may be stale (a busy hour, a draft paged out under a memory limit): a run starts
        # due for one verified tree, so its own first steps measure drafting afresh.
        self._unverified = self.EXPLORE_EVERY if step is not None and step.steps else 0

    MAX_REST = 32
    FIRST_DRAFT = 32  # candidates a run drafts first when no run has taught the planner anything
    EXPLORE_EVERY = 32  # steps without a verified draft tree before one is verified anyway (propose)

    def propose(self, context: Sequence[int], max_depth: int, max_nodes: int) -> Proposal:
        self._unverified += 1
        max_depth, max_nodes = min(max_depth, self.max_depth), min(max_nodes, self.max_nodes)
        if self.cost is None:
            draft = self.drafter.draft(context, max_nodes, max_depth)
            return Proposal(draft.tree, draft.keys, draft.reused, source=self)
        if self._resting > 0:
            self._resting -= 1
            return Proposal(DraftTree.rooted(context[-1]), [("root",)], skipped=True, source=self)
        limit = min(self._candidates, max_nodes, self.cost.max_size)
        t0 = self.clock()
        draft = self.drafter.draft(context, limit, max_depth)
        drafting_s = self.clock() - t0 - draft.catch_up_s
        assert self.step_cost is not None
        chances = node_chances(draft.tree, draft.keys, self.stats)
        keep = best_subtree(chances, self.step_cost)
        explored = False
        if len(keep) == 1 and self.drafter.costly and self._unverified >= self.EXPLORE_EVERY:
            # Only the learnt drafting cost can rule out what the pass alone would pay for, and
            # it is learnt from verified trees only: verify one now and then to learn it afresh
            # (the text, the machine's load, a run's first draft may have set it wrong).
            keep = best_subtree(chances, self.cost)
            explored = len(keep) > 1
        if len(keep) == 1 and self.drafter.costly:
            self._resting, self._rest = self._rest, min(2 * self._rest, self.MAX_REST)
        else:
            self._rest, self._unverified = 1, 0
        self._candidates = self._drafts_for(len(keep))
        prepared = draft.prepared
        return Proposal(draft.tree.subtree(keep), [draft.keys[i] for i in keep], draft.reused, drafting_s,
                        draft.catch_up_s, free=sum(1 for i in keep[1:] if i < len(prepared) and prepared[i]),
                        needed=min(1.0, self._drafts_for(len(keep)) / len(draft.tree)), explored=explored,
                        source=self)

    @staticmethod
    def _drafts_for(kept: int) -> int:
        """Candidates to draft when plans keep about `kept` nodes: a quarter more, so the plan
        has a choice, but not so many more that the draft model grows nodes nobody verifies
        (a draft call costs about its level: 15 ms for one node on 2 cores, 39 for two)."""
        return max(kept + kept // 4 + 1, 3)

    def warm(self, context: Sequence[int]) -> float:
        return self.drafter.warm(context)

    def prepare(self, proposal: Proposal, until: Callable[[], bool]) -> float:
        """A costly drafter grows its last draft while the target verifies; lookup has nothing to do."""
        if proposal.skipped or not self.drafter.costly:
            return 0.0
        # When the pass is expected back: its calibrated cost, measured with no draft beside it
        # (a pass on a GPU or a disk takes about that with one; on shared cores, longer).
        deadline = self.clock() + self.cost.cost(len(proposal.tree)) if self.cost is not None else None
        return self.drafter.prepare(until, deadline)

    def expected_tokens(self, proposal: Proposal) -> float:
        """Tokens a proposal is expected to yield, its root's included."""
        return sum(node_chances(proposal.tree, proposal.keys, self.stats))

    def observe(self, proposal: Proposal, path: list[int], wall_s: float, pass_s: float | None = None) -> None:
        """Each node whose parent was accepted was tested: it matched the target's draw or not.
        `pass_s`: the target's pass, where nothing drafted beside it, corrects the cost curve."""
        tree, p = proposal.tree, proposal
        learn_pass(self.cost, len(tree), pass_s)
        if self.step_cost is not None and not p.skipped:
            self.step_cost.observe(len(tree), p.drafting_s, wall_s - p.catch_up_s, p.needed, p.explored, p.free)
        accepted = set(path)
        for i in range(1, len(tree)):
            if tree.parents[i] in accepted:
                self.stats.update(p.keys[i], i in accepted)
        self.drafter.accepted([tree.tokens[i] for i in path[1:]])
