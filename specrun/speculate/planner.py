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

import bisect
import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from specrun.speculate.allowance import Risk


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
        if n <= self.sizes[0]:
            return self.seconds[0]
        if n <= self.sizes[-1]:  # linear between the measured sizes around n (np.interp, 10x cheaper here)
            i = bisect.bisect_left(self.sizes, n)
            (n0, n1), (t0, t1) = self.sizes[i - 1:i + 1], self.seconds[i - 1:i + 1]
            return t0 + (t1 - t0) * (n - n0) / (n1 - n0)
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
    run, in one of two ways.

    - Reshaped where each pass of a size is off against the passes of other sizes timed
      around it (within AROUND passes before it, and also after it: a CPU's 16-token passes
      at 1.4x its calibration among one-token passes that agree with it), or where no other
      size was timed around it and it is off by more than FAR (a busy CPU: each node beyond
      a few costs 0.4 s). Each observed size costs what its passes measured, sizes between
      observed ones move by the ratio between, sizes above the largest by its ratio, sizes
      below the smallest stay; kept monotone.
    - Moved as a whole, by the median of every kept pass, otherwise. A streamed target's disk
      drifts (one-token passes from 0.22 to 0.45 s within a run) and moves every size alike,
      but sizes are not timed at the same moments: read one by one, a drift seen at one size
      bent a flat curve until 8 tokens cost 2.3-3.8x one, and the trees shrank where only the
      disk's speed had changed.

    Off by more than FAR also marks the curve `stale`, so the next run measures it afresh
    instead of starting from it (calibrated while the machine was busy: 24 tokens 9.1 s where
    they take 0.8)."""

    CONTRADICTED = (0.7, 1.4)  # observed / predicted
    FAR = (0.4, 2.5)  # beyond what a streamed target's disk drifts (2x within a run)
    MIN_PASSES = 4  # passes of a size before they may replace the curve
    AROUND = 3  # passes before and after a pass that are timed "around" it

    def __init__(self, curve: CostCurve) -> None:
        self.curve = curve
        # index of a measured size -> its last passes: (seconds as if at that size, the pass's number)
        self._seen: dict[int, list[tuple[float, int]]] = {}
        self._recent: list[tuple[int, int, float]] = []  # (number, size index, seconds as if at that size), latest last
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
        i = self._nearest(n)
        q = seconds / self.curve.cost(n)  # its ratio to the curve
        number = self._recent[-1][0] + 1 if self._recent else 0
        self._recent.append((number, i, q * self.seconds[i]))
        del self._recent[:-self.MIN_PASSES * (2 * self.AROUND + 1)]
        last = self._seen.setdefault(i, [])
        last.append((q * self.seconds[i], number))
        del last[:-self.MIN_PASSES]
        low, high = self.CONTRADICTED
        if len(last) == self.MIN_PASSES and not low <= self._ratio(i) <= high:
            self._replace(i)

    def _nearest(self, n: int) -> int:
        """The index of the measured size nearest n on a log scale (the smaller on ties)."""
        return min(range(len(self.sizes)), key=lambda k: (abs(math.log(self.sizes[k] / n)), k))

    def _ratio(self, i: int) -> float:
        at_size = statistics.median(t for t, _ in self._seen[i])
        return (at_size + JITTER) / (self.seconds[i] + JITTER)  # ms apart say little

    def _replace(self, trigger: int) -> None:
        ratio = self._ratio(trigger)
        off = self._off_against_others(trigger)
        if off if off is not None else not self.FAR[0] <= ratio <= self.FAR[1]:
            self._install(trigger, ratio, self._reshaped(), "replaced it")
        else:
            level = statistics.median(t / self.seconds[i] for i, passes in self._seen.items() for t, _ in passes)
            self._install(trigger, ratio, [t * level for t in self.seconds], "moved it as a whole")

    def _off_against_others(self, i: int) -> bool | None:
        """Whether each of size i's kept passes is off by more than CONTRADICTED, the same way,
        both against the other sizes' passes timed just before it and against those just after
        (None: fewer than MIN_PASSES - 1 had others on both sides). A drift that begins or
        ends beside a pass moves one side with it, so the pass agrees with the other side."""
        low, high = self.CONTRADICTED
        sides = []
        for t, number in self._seen[i]:
            before = [u / self.seconds[k] for m, k, u in self._recent if k != i and number - self.AROUND <= m < number]
            after = [u / self.seconds[k] for m, k, u in self._recent if k != i and number < m <= number + self.AROUND]
            if before and after:
                q = t / self.seconds[i]
                contrasts = (q / statistics.median(before), q / statistics.median(after))
                sides.append(1 if min(contrasts) > high else -1 if max(contrasts) < low else 0)
        if len(sides) < self.MIN_PASSES - 1:
            return None
        return abs(sum(sides)) == len(sides)  # every one off, and the same way

    def _reshaped(self) -> list[float]:
        """The curve through each observed size's passes (see the class's docstring)."""
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
        return times

    def _install(self, trigger: int, ratio: float, times: list[float], how: str) -> None:
        self.stale = self.stale or not self.FAR[0] <= ratio <= self.FAR[1]
        self.replaced.append(f"passes over {self.sizes[trigger]} tokens took {ratio:.2f}x what the stored cost curve "
                             f"said: {how} (1 token {self.seconds[0] * 1000:.0f} -> {times[0] * 1000:.0f} ms, "
                             f"{self.max_size} tokens {self.seconds[-1] * 1000:.0f} -> {times[-1] * 1000:.0f} ms)")
        self.curve = CostCurve(self.sizes, tuple(times))
        self.version += 1
        # Only passes measured against the new curve say anything about it. Counting the old ones
        # as agreeing with it (ratio 1) made a disk whose speed drifts whipsaw the curve's shape:
        # a fast spell seen at one size replaced it against sizes "confirmed" at the old speed,
        # and 2 tokens came to cost 1.5x one where the calibration had measured 1.0x.
        self._seen = {}  # (the recent passes stay: what is around a pass does not change with the curve)


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


def best_subtree(chances: Sequence[float], cost: PassCost | StepCost, max_nodes: int | None = None,
                 risk: Risk | None = None) -> list[int]:
    """Node indices to verify (root first, a connected subtree): the k likeliest non-root
    nodes for the k maximising (1 + their chances) / cost(k + 1), among the k the generation's
    allowance admits (`risk`). Ties keep fewer nodes."""
    return best_subtrees([chances], cost, max_nodes, risk=risk)[0]


def best_subtrees(chances: Sequence[Sequence[float]], cost: PassCost | StepCost, max_nodes: int | None = None,
                  fixed: int = 0, risk: Risk | None = None) -> list[list[int]]:
    """best_subtree for several sequences sharing one pass (TETRIS): every tree's root is
    verified, then the likeliest non-root nodes over all the trees, the k of them maximising
    (roots + fixed + their chances) / cost(roots + fixed + k), within `max_nodes` for the pass
    (None: the largest size measured; no plans beyond it); `fixed`: nodes of other sequences
    already in it. Ties keep fewer nodes. Per tree, its node indices (root first, a connected
    subtree: a node's chance is at most its parent's, and ties go to lower indices). A
    `risk` (one tree only) admits only the plans its allowance can afford."""
    if risk is not None and len(chances) != 1:
        raise ValueError("an allowance is one generation's: it plans one tree")
    base = len(chances) + fixed
    order = sorted(((c[i], s, i) for s, c in enumerate(chances) for i in range(1, len(c))),
                   key=lambda t: (-t[0], t[1], t[2]))[:max((max_nodes or cost.max_size) - base, 0)]
    best_k, best_rate, expected = 0, base / cost.cost(max(base, 1)), float(base)
    at_least = [1.0]  # [j]: the sure chance the kept nodes accept j tokens or more (Risk)
    for k, (chance, _, i) in enumerate(order, 1):
        expected += chance
        if risk is not None:
            depth = risk.depths[i]
            at_least.extend([0.0] * (depth + 1 - len(at_least)))
            at_least[depth] = max(at_least[depth], risk.sure[i])  # (not their sum: see Risk)
        step_s = cost.cost(base + k)
        rate = expected / step_s
        if rate > best_rate * (1 + 1e-9) and (risk is None or risk.allowance.admits(step_s, cost.cost(base), at_least)):
            best_k, best_rate = k, rate
    keep: list[list[int]] = [[] for _ in chances]
    for _, s, i in order[:best_k]:
        keep[s].append(i)
    return [[0] + sorted(k) for k in keep]
