"""Measuring what a target pass costs on this machine, and remembering it.

The planner needs c(n): seconds for one target pass over n tokens (a draft tree
of n nodes). It depends on the model, the build, the threads and the GPU
layers, so it is measured once per such combination, on first use (from 1
token up to the engine's limit, stopping where passes grow too costly to ever
pay: see SIZES), and kept
under the store root with what was learnt while generating: acceptance
statistics and each draft model's speed. The file is versioned JSON; files of
the first, unversioned format are still read.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from specrun.engines import model_bytes
from specrun.engines.base import Engine
from specrun.speculate.auto import DraftSpeed
from specrun.speculate.planner import JITTER, AcceptanceStats, CostCurve, LearntCurve, StepCost
from specrun.store import write_atomic

VERSION = 2
# Tokens per pass, measured upward: all of them up to ALWAYS, beyond it while a pass costs at
# most MAX_RATIO plain passes, and never more than the engine verifies in one pass.
SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
ALWAYS = 32  # about 1.5 s for a 1.5B model on 2 CPU cores with llama.cpp
# A pass costing more than this many plain passes must accept more tokens than that to pay,
# and trees of the draft model get about 6-11 accepted (HumanEval, depth 16): beyond, the
# curve is steep (llama.cpp on a CPU: 9.6x at 32 tokens) and measuring it only takes time.
# A flat curve (an offloaded target, a GPU) is measured up to the engine's limit.
MAX_RATIO = 8.0
PREFIX = 64  # tokens in the cache while measuring, as after a short prompt


def sizes_up_to(max_nodes: int) -> tuple[int, ...]:
    """The sizes an engine verifying at most `max_nodes` tokens a pass can be measured at:
    SIZES below it, and `max_nodes` itself."""
    return tuple(n for n in SIZES if n < max_nodes) + (max(max_nodes, 1),)


def stops_short(curve: CostCurve, sizes: tuple[int, ...]) -> bool:
    """Whether a stored curve ends before the largest of `sizes` at a cost that would have
    measured on (it was measured with fewer sizes, or for smaller trees): measure again."""
    return curve.max_size < max(sizes) and curve.seconds[-1] <= MAX_RATIO * curve.seconds[0]


def context_needed(sizes: tuple[int, ...] = SIZES) -> int:
    """KV cells the measurement takes: the prefix, then a tree of the largest size."""
    return PREFIX + max(sizes) + 1


def measurement_tokens(n_vocab: int) -> list[int]:
    """The PREFIX tokens measurements evaluate: varied (what a pass costs must not depend on
    a repeated token) and within the vocabulary."""
    return [(7 * i + 11) % max(n_vocab - 1, 2) + 1 for i in range(PREFIX)]


NOISY = 1.5  # repeats of one size further apart than this: something else was running
DROP = 0.8  # a size costing less than this share of a smaller one: not a curve, noise


def measure_cost_curve(engine: Engine, sizes: tuple[int, ...] = SIZES, reps: int | None = None,
                       on_size: Callable[[int], None] | None = None, max_ratio: float | None = None,
                       clock: Callable[[], float] = time.perf_counter) -> CostCurve:
    """Time chains of n nodes after a 64-token prefix, the minimum of repeats (after one
    warm-up): what the machine can do, not how busy it happened to be (see `measure_runs`).
    The cache is left empty; cost never decreases with size."""
    return curve_of(measure_runs(engine, sizes, reps, on_size, max_ratio, clock))


def measure_runs(engine: Engine, sizes: tuple[int, ...] = SIZES, reps: int | None = None,
                 on_size: Callable[[int], None] | None = None, max_ratio: float | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> dict[int, list[float]]:
    """Seconds of each repeat per size: `reps` each, or (None) 3 while a pass takes under a
    quarter second and 2 beyond (the large sizes of a streamed target take seconds). With
    `max_ratio`, sizes above ALWAYS are measured only while the last one cost at most
    `max_ratio` times one token. The cache is left empty."""
    engine.rewind(0)
    prefix = measurement_tokens(engine.vocab.n_vocab)
    engine.eval(prefix)
    warm = min(4, max(sizes))
    if warm > 1:  # warm-up: first-use allocations
        engine.eval_tree(prefix[:warm], [-1] + list(range(warm - 1)), list(range(warm)))
        engine.commit_path([])
    runs: dict[int, list[float]] = {}
    one: float | None = None
    for n in sizes:
        if max_ratio is not None and n > ALWAYS and runs and one is not None and min(runs[max(runs)]) > max_ratio * one:
            break
        times: list[float] = []
        while len(times) < (reps or (3 if not times or min(times) < 0.25 else 2)):
            t = clock()
            if n == 1:
                engine.eval([prefix[len(times) % PREFIX]])
                engine.rewind(len(prefix))
            else:
                chain = [prefix[i % PREFIX] for i in range(n)]  # sizes beyond the prefix repeat it
                engine.eval_tree(chain, [-1] + list(range(n - 1)), list(range(n)))
                engine.commit_path([])
            times.append(clock() - t)
        runs[n] = times
        one = min(runs[min(runs)])
        if on_size:
            on_size(n)
    engine.rewind(0)
    return runs


def curve_of(runs: dict[int, list[float]]) -> CostCurve:
    """The curve of each size's fastest repeat, made monotone: a later, cheaper size bounds earlier ones."""
    sizes = sorted(runs)
    times = [min(runs[n]) for n in sizes]
    for i in range(len(times) - 2, -1, -1):
        times[i] = min(times[i], times[i + 1])
    return CostCurve(tuple(sizes), tuple(times))


def curve_problem(runs: dict[int, list[float]]) -> str | None:
    """Why a measurement should not be kept: repeats of two or more sizes further apart than
    NOISY, or a size much cheaper than a smaller one. None: it looks like the machine's."""
    noisy = [n for n, times in runs.items()
             if len(times) > 1 and max(times) > NOISY * min(times) and max(times) - min(times) > JITTER]
    if len(noisy) >= 2:
        return f"repeats of {len(noisy)} sizes differed by more than {NOISY:.1f}x"
    fastest = {n: min(t) for n, t in sorted(runs.items())}
    for small, big in zip(fastest, list(fastest)[1:]):
        before = max(fastest[n] for n in fastest if n <= small)
        if fastest[big] < DROP * before and before - fastest[big] > JITTER:
            return f"a pass over {big} tokens measured faster than one over {small}"
    return None


def measure_checked(engine: Engine, sizes: tuple[int, ...], notice: Callable[[str], None],
                    max_ratio: float | None = MAX_RATIO,
                    clock: Callable[[], float] = time.perf_counter) -> tuple[CostCurve, bool]:
    """(the cost curve, whether to keep it): measured, and measured again when noisy or not
    monotonic (something else was running: such a curve, stored, steered every later run);
    when the second measurement is no better, used for this run only, with a notice."""
    runs = measure_runs(engine, sizes, max_ratio=max_ratio, clock=clock)
    if (problem := curve_problem(runs)) is None:
        return curve_of(runs), True
    notice(f"the cost curve looked noisy ({problem}): measuring it again…")
    runs = measure_runs(engine, sizes, max_ratio=max_ratio, clock=clock)
    if (problem := curve_problem(runs)) is None:
        return curve_of(runs), True
    notice(f"the cost curve is too noisy to keep ({problem}; is something else running?): this run plans "
           "from it, and the next one measures again")
    return curve_of(runs), False


OVERLAP_PAYS = 1.15  # overlap on where the same work takes this much less wall time overlapped


def measure_overlap(target: Engine, draft: Engine, nodes: int = 32, draft_nodes: int = 8,
                    clock: Callable[[], float] = time.perf_counter) -> float:
    """How much faster drafting and verifying go overlapped than one after the other, on this
    machine: (a target pass over `nodes` tokens alone + the draft calls over `draft_nodes`
    made during an overlapped pass, each timed alone) / that overlapped pass. About 1 where
    both compute on the same saturated cores; up to 2 where the target leaves the CPU idle
    (a GPU). Leaves both caches empty."""
    tokens = measurement_tokens(min(target.vocab.n_vocab, draft.vocab.n_vocab))
    nodes, draft_nodes = min(nodes, target.max_tree_nodes), min(draft_nodes, draft.max_tree_nodes)
    parents, depths = [-1] + list(range(nodes - 1)), list(range(nodes))

    def tree_pass() -> float:
        t0 = clock()
        target.eval_tree(tokens[:nodes], parents, depths)
        target.commit_path([])
        return clock() - t0

    def draft_call() -> float:
        t0 = clock()
        draft.eval_tree(tokens[:draft_nodes], [-1] * draft_nodes, [0] * draft_nodes)
        draft.commit_path([])
        return clock() - t0

    try:
        target.sync(tokens)
        draft.sync(tokens)
        alone = min(tree_pass() for _ in range(2))
        call = min(draft_call() for _ in range(3))
        gains = []
        for _ in range(2):
            t0, calls = clock(), 0
            pending = target.submit_tree(tokens[:nodes], parents, depths)
            while not pending.done():
                draft_call()
                calls += 1
            pending.result()
            together = clock() - t0
            target.commit_path([])
            gains.append((alone + calls * call) / together)
        return max(gains)
    finally:
        target.rewind(0)
        draft.rewind(0)


@dataclass
class Calibration:
    """A cost curve and what was learnt with it, stored as JSON."""

    path: Path
    cost: LearntCurve  # the measured curve, as runs' own passes correct it (a CostCurve is wrapped)
    stats: dict[str, AcceptanceStats]  # by drafter: "ngram", "model"
    speeds: dict[str, DraftSpeed] = field(default_factory=dict)  # by draft model file name
    settings: str = ""  # the engine settings it was measured with (for `specrun info`)
    overlap: dict[str, float] = field(default_factory=dict)  # by draft model file name: measure_overlap's gain
    steps: dict[str, StepCost] = field(default_factory=dict)  # by speculator: what a step costs in wall time
    trusted: bool = True  # False: measured while something else ran; used, but measured again next run

    def __post_init__(self) -> None:
        if isinstance(self.cost, CostCurve):  # a curve as measured: runs correct it from here
            self.cost = LearntCurve(self.cost)

    def speed_of(self, draft: Path) -> DraftSpeed:
        return self.speeds.setdefault(draft.name, DraftSpeed())

    def save(self) -> None:
        data = {
            "version": VERSION, "settings": self.settings,
            "cost": {"sizes": list(self.cost.sizes), "seconds": list(self.cost.seconds),
                     "trusted": self.trusted and not self.cost.stale},
            "acceptance": {name: [[list(key), counts] for key, counts in s.counts.items()]
                           for name, s in self.stats.items()},
            "draft_speeds": {name: speed.to_json() for name, speed in self.speeds.items()},
            "overlap": self.overlap,
            "step_costs": {name: step.to_json() for name, step in self.steps.items()},
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps(data, indent=1))


def calibration_path(root: Path, model: Path, settings: str) -> Path:
    """One file per model (by name and size: a directory's size is its files') and engine settings."""
    digest = hashlib.sha256(f"{model.name}|{model_bytes(model)}|{settings}".encode()).hexdigest()[:16]
    return root / "calibration" / f"{model.stem}-{digest}.json"


def stored_for(root: Path, model: Path) -> list[Calibration]:
    """Every calibration kept for this model file, whatever the settings."""
    found = (load(p) for p in sorted((root / "calibration").glob(f"{model.stem}-*.json")))
    return [c for c in found if c is not None]


def load(path: Path) -> Calibration | None:
    """The calibration in `path`; None when missing, unreadable or of a later version (then it
    is measured again)."""
    try:
        data = json.loads(path.read_text())
        if "version" not in data:
            return _load_v1(path, data)
        if data["version"] != VERSION:
            return None
        cost = LearntCurve(CostCurve(tuple(data["cost"]["sizes"]), tuple(data["cost"]["seconds"])))
        stats = {name: AcceptanceStats(counts={tuple(key): list(c) for key, c in pairs})
                 for name, pairs in data["acceptance"].items()}
        speeds = {name: DraftSpeed.from_json(v) for name, v in data["draft_speeds"].items()}
        overlap = {str(name): float(gain) for name, gain in data.get("overlap", {}).items()}
        steps = {str(name): StepCost.from_json(cost, v) for name, v in data.get("step_costs", {}).items()}
        return Calibration(path, cost, stats, speeds, str(data["settings"]), overlap, steps,
                           bool(data["cost"].get("trusted", True)))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _load_v1(path: Path, data: dict) -> Calibration:
    """The first format: acceptance keys joined with '|', draft speeds under "memory"."""
    def parse(part: str) -> object:
        return int(part) if part.lstrip("-").isdigit() else part

    cost = LearntCurve(CostCurve(tuple(data["sizes"]), tuple(data["seconds"])))
    stats = {name: AcceptanceStats(counts={tuple(parse(p) for p in key.split("|")): list(v)
                                           for key, v in counts.items()})
             for name, counts in data.get("acceptance", {}).items()}
    speeds = {str(draft): DraftSpeed.from_json(learnt) for draft, learnt in data.get("memory", {}).items()
              if isinstance(learnt, dict)}  # the oldest files kept one flat record: measure again
    return Calibration(path, cost, stats, speeds, str(data.get("settings", "")))
