"""Speculation modes and the one place that builds a speculator for a mode."""

from __future__ import annotations

from dataclasses import dataclass

from specrun.errors import UsageError
from specrun.speculate.auto import AutoSpeculator, DraftSpeed
from specrun.speculate.base import Drafter, Speculator
from specrun.speculate.draft_model import DraftModel, ModelDraftConfig, ModelDrafter
from specrun.speculate.ngram import NgramDrafter
from specrun.speculate.planner import AcceptanceStats, PassCost, PlannedSpeculator, StepCost

SPEC_MODES = ("auto", "none", "ngram", "chain", "tree")
OVERLAPS = ("auto", "on", "off")
MODEL_MODES = ("chain", "tree")  # need a draft model
DEFAULT_DEPTH = 16
DEFAULT_NODES = 32  # what a mode without --budget asks the engines for at least (calibration asks for more)


@dataclass(frozen=True)
class SpecConfig:
    """How to speculate. `budget` None lets the planner size each tree from measured costs;
    in auto mode the planner always decides and `budget` only caps the tree size."""

    mode: str = "auto"  # auto | none | ngram | chain | tree
    budget: int | None = None  # nodes per verified tree, root included
    depth: int | None = None  # deepest draft node; None: DEFAULT_DEPTH
    overlap: str = "auto"  # draft while the target verifies: on, off, or auto (where measured to pay)

    @property
    def needs_costs(self) -> bool:
        return self.mode == "auto" or (self.mode != "none" and self.budget is None)

    @property
    def max_nodes(self) -> int:
        """Nodes the target verifies in one pass at most, root included (1: plain decoding)."""
        return 1 if self.mode == "none" else self.budget or DEFAULT_NODES


def make_speculator(spec: SpecConfig, cost: PassCost | None, stats: dict[str, AcceptanceStats],
                    draft: DraftModel | None = None, speed: DraftSpeed | None = None,
                    steps: dict[str, StepCost] | None = None, overlap: bool = False) -> Speculator | None:
    """The speculator for `spec`, or None for plain decoding. `stats` gains the acceptance
    statistics it learns, keyed by drafter ("ngram", "model"); `speed` is what auto learns
    about the draft model's speed; `steps` what steps cost in wall time, keyed by speculator
    ("ngram", "chain", "tree") and, for a run that drafts while the target verifies
    (`overlap`), apart from runs that do not ("tree, overlapped"): their steps cost differently.
    All persist with the calibration."""
    depth = spec.depth or DEFAULT_DEPTH
    if spec.max_nodes == 1:
        return None
    if spec.needs_costs and cost is None:
        raise ValueError("planned speculation needs a cost curve")
    plan = cost if spec.needs_costs else None

    # Without --budget the planner sizes trees up to what the calibration measured: hundreds of
    # nodes where a pass costs about what one token does (an offloaded target), a few on a CPU.
    cap = spec.budget or (cost.max_size if cost is not None and spec.needs_costs else spec.max_nodes)

    def planned(name: str, drafter: Drafter, stats_key: str) -> PlannedSpeculator:
        key = f"{name}, overlapped" if overlap and drafter.costly else name  # prompt lookup prepares nothing
        step = steps.setdefault(key, StepCost(plan)) if plan is not None and steps is not None else None
        return PlannedSpeculator(name, drafter, plan, stats.setdefault(stats_key, AcceptanceStats()), cap, depth, step)

    lookup = planned("ngram", NgramDrafter(), "ngram")
    if spec.mode == "ngram":
        return lookup
    if spec.mode in MODEL_MODES:
        if draft is None:
            raise UsageError(f"--spec {spec.mode} needs a draft model", hint="pass --draft NAME, or use --spec ngram")
        config = ModelDraftConfig.chain(min(depth, 8)) if spec.mode == "chain" else ModelDraftConfig()
        return planned(spec.mode, ModelDrafter(draft, config), "model")
    model = planned("tree", ModelDrafter(draft), "model") if draft is not None else None
    assert cost is not None
    return AutoSpeculator(lookup, model, cost, speed)
