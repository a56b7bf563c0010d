"""Measuring what a target pass costs on this machine, and remembering it.

The planner needs c(n): seconds for one target pass over n tokens (a draft tree
of n nodes). It depends on the model, the build, the threads and the GPU
layers, so it is measured once per such combination, on first use, and kept
under the store root with the acceptance statistics learnt while generating.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from specrun.engines.base import Engine
from specrun.spec.planner import AcceptanceStats, CostCurve
from specrun.store import write_atomic

SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)  # about 4 s for a 1.5B model on 2 CPU cores


def measure_cost_curve(engine: Engine, sizes: tuple[int, ...] = SIZES, reps: int = 1,
                       on_size: Callable[[int], None] | None = None) -> CostCurve:
    """Time chains of n nodes after a 64-token prefix (median of `reps`, after one warm-up).

    The cache is left empty. Noise is smoothed so that cost never decreases with size."""
    engine.rewind(0)
    prefix = [(7 * i + 11) % max(engine.n_vocab - 1, 2) + 1 for i in range(64)]
    engine.eval(prefix)
    engine.eval_tree(prefix[:4], [-1, 0, 1, 2], [0, 1, 2, 3])  # warm-up: first-use allocations
    engine.commit_path([])
    times = []
    for n in sizes:
        runs = []
        for rep in range(reps):
            t = time.perf_counter()
            if n == 1:
                engine.eval([prefix[rep]])
                engine.rewind(len(prefix))
            else:
                engine.eval_tree(prefix[:n], [-1] + list(range(n - 1)), list(range(n)))
                engine.commit_path([])
            runs.append(time.perf_counter() - t)
        times.append(statistics.median(runs))
        if on_size:
            on_size(n)
    engine.rewind(0)
    for i in range(len(times) - 2, -1, -1):  # monotone: a later, cheaper size bounds earlier ones
        times[i] = min(times[i], times[i + 1])
    return CostCurve(tuple(sizes), tuple(times))


@dataclass
class Calibration:
    """A cost curve and the acceptance statistics learnt with it, stored as JSON."""

    path: Path
    cost: CostCurve
    stats: dict[str, AcceptanceStats]
    # What auto learnt about each draft model's speed, by draft file name (AutoSpeculator.memory).
    memory: dict[str, dict[str, float]] = field(default_factory=dict)
    settings: str = ""  # the engine settings it was measured with (for `specrun info`)

    def save(self) -> None:
        data = {
            "settings": self.settings,
            "sizes": list(self.cost.sizes), "seconds": list(self.cost.seconds), "memory": self.memory,
            "acceptance": {name: {"|".join(map(str, k)): v for k, v in s.counts.items()}
                           for name, s in self.stats.items()},
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps(data, indent=1))


def calibration_path(root: Path, model: Path, settings: str) -> Path:
    """One file per model file (by name and size) and engine settings."""
    size = model.stat().st_size
    digest = hashlib.sha256(f"{model.name}|{size}|{settings}".encode()).hexdigest()[:16]
    return root / "calibration" / f"{model.stem}-{digest}.json"


def stored_for(root: Path, model: Path) -> list[Calibration]:
    """Every calibration kept for this model file, whatever the settings."""
    found = (load(p) for p in sorted((root / "calibration").glob(f"{model.stem}-*.json")))
    return [c for c in found if c is not None]


def load(path: Path) -> Calibration | None:
    try:
        data = json.loads(path.read_text())
        cost = CostCurve(tuple(data["sizes"]), tuple(data["seconds"]))
        stats = {}
        for name, counts in data.get("acceptance", {}).items():
            s = AcceptanceStats()
            for key, value in counts.items():
                s.counts[tuple(_parse(p) for p in key.split("|"))] = list(value)
            stats[name] = s
        memory = {str(draft): {str(k): float(v) for k, v in learnt.items()}
                  for draft, learnt in data.get("memory", {}).items()
                  if isinstance(learnt, dict)}  # older files kept one flat record: measure again
        return Calibration(path, cost, stats, memory, str(data.get("settings", "")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _parse(part: str) -> object:
    return int(part) if part.lstrip("-").isdigit() else part
