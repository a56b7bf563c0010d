"""The planner's memory: what it knows about a model on this machine, kept between runs.

One versioned JSON file per model and engine settings (the "calibration file"),
under the store root's calibration/: the target's cost curve as measured
(calibrate.py measures it) and as runs corrected it, acceptance statistics per
drafter, each draft model's measured speed, what a step costs in wall time per
speculator, and whether drafting during target passes pays. Files of the first,
unversioned format are still read. Beside them, under recycle/, the target's
recycled top-k per token (one table per model file), so token recycling starts
a run from what earlier runs read instead of from nothing.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from specrun.files import model_bytes, write_atomic, write_whole
from specrun.speculate.auto import DraftSpeed
from specrun.speculate.recycle import MAX_PAIRS, TOP_K, RecycleTable
from specrun.speculate.acceptance import AcceptanceStats
from specrun.speculate.planner import CostCurve, LearntCurve, StepCost

VERSION = 2


@dataclass
class PlannerMemory:
    """What the planner knows about one model with one engine's settings on this machine: the
    measured cost curve, and what runs learnt with it. Stored as JSON (`save`, `load`)."""

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


def memory_path(root: Path, model: Path, settings: str) -> Path:
    """One file per model (by name and size: a directory's size is its files') and engine settings."""
    digest = hashlib.sha256(f"{model.name}|{model_bytes(model)}|{settings}".encode()).hexdigest()[:16]
    return root / "calibration" / f"{model.stem}-{digest}.json"


def stored_for(root: Path, model: Path) -> list[PlannerMemory]:
    """Every calibration kept for this model file, whatever the settings."""
    found = (load(p) for p in sorted((root / "calibration").glob(f"{model.stem}-*.json")))
    return [c for c in found if c is not None]


def load(path: Path) -> PlannerMemory | None:
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
        return PlannerMemory(path, cost, stats, speeds, str(data["settings"]), overlap, steps,
                           bool(data["cost"].get("trusted", True)))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _load_v1(path: Path, data: dict) -> PlannerMemory:
    """The first format: acceptance keys joined with '|', draft speeds under "memory"."""
    def parse(part: str) -> object:
        return int(part) if part.lstrip("-").isdigit() else part

    cost = LearntCurve(CostCurve(tuple(data["sizes"]), tuple(data["seconds"])))
    stats = {name: AcceptanceStats(counts={tuple(parse(p) for p in key.split("|")): list(v)
                                           for key, v in counts.items()})
             for name, counts in data.get("acceptance", {}).items()}
    speeds = {str(draft): DraftSpeed.from_json(learnt) for draft, learnt in data.get("memory", {}).items()
              if isinstance(learnt, dict)}  # the oldest files kept one flat record: measure again
    return PlannerMemory(path, cost, stats, speeds, str(data.get("settings", "")))


def recycle_path(root: Path, model: Path) -> Path:
    """The target's recycled top-k table (speculate/recycle.py): one per model file, whatever
    the engine settings, since it is what the model predicts, not what a pass costs."""
    digest = hashlib.sha256(f"{model.name}|{model_bytes(model)}".encode()).hexdigest()[:16]
    return root / "recycle" / f"{model.stem}-{digest}.npz"


def load_recycled(path: Path, k: int = TOP_K) -> RecycleTable:
    """The table kept at `path`; an empty one when there is none, or one that cannot be read
    (it is a cache of what the target said: losing it costs a few runs' learning). Files kept
    before pairs were (no `pairs` in them) give the tokens' rows alone."""
    table = RecycleTable(k)
    try:
        with np.load(path, allow_pickle=False) as kept:
            tokens, successors = kept["tokens"], kept["successors"]
            if successors.ndim == 2 and successors.shape == (len(tokens), k):
                table.successors = {int(t): successors[i].astype(np.int32) for i, t in enumerate(tokens)}
            if "pairs" in kept.files:
                pairs, after = kept["pairs"], kept["pair_successors"]
                if pairs.ndim == 2 and pairs.shape[1] == 2 and after.shape == (len(pairs), k):
                    kept_pairs = [(int(a), int(b)) for a, b in pairs[-MAX_PAIRS:].tolist()]  # oldest first
                    table.pairs = dict(zip(kept_pairs, after[-MAX_PAIRS:].astype(np.int32)))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return RecycleTable(k)
    return table


def save_recycled(path: Path, table: RecycleTable) -> None:
    """Whole or nothing (files.write_whole)."""
    if not table.successors:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens = np.fromiter(table.successors, dtype=np.int32, count=len(table.successors))
    successors = np.stack([table.successors[int(t)] for t in tokens])  # [m, k]
    pairs = np.asarray(list(table.pairs), dtype=np.int32).reshape(-1, 2)  # [p, 2], oldest first
    after = np.stack(list(table.pairs.values())) if table.pairs else np.zeros((0, table.k), np.int32)  # [p, k]
    write_whole(path, lambda tmp: np.savez(tmp, tokens=tokens, successors=successors, pairs=pairs,
                                           pair_successors=after))
