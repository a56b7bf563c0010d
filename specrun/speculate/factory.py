"""Speculation modes and the one place that builds a speculator for a mode."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

from specrun.errors import UsageError
from specrun.speculate.auto import DraftSpeed, ModelGate
from specrun.speculate.base import Drafter, Speculator
from specrun.speculate.draft_model import DraftModel, ModelDraftConfig, ModelDrafter
from specrun.speculate.ngram import NgramDrafter, match_priors
from specrun.speculate.planned import PlannedSpeculator, Source
from specrun.speculate.acceptance import AcceptanceStats
from specrun.speculate.planner import PassCost, StepCost
from specrun.speculate.recycle import RecycleDrafter, RecycleTable
from specrun.speculate.suffix import SuffixDrafter, SuffixIndex

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
    use_draft: bool = True  # auto: the draft model may be a source (False: the free drafters alone)

    @property
    def needs_costs(self) -> bool:
        return self.mode == "auto" or (self.mode != "none" and self.budget is None)

    @property
    def max_nodes(self) -> int:
        """Nodes the target verifies in one pass at most, root included (1: plain decoding)."""
        return 1 if self.mode == "none" else self.budget or DEFAULT_NODES


@dataclass
class FreeSources:
    """What the free drafters read beyond the context, shared by the speculators a session
    makes: indexes of a corpus and of earlier generations (`shared`), and the target's
    recycled top-k (None: a table of the speculator's own, learnt as it goes)."""

    shared: Callable[[], Sequence[SuffixIndex]] = lambda: ()
    recycled: RecycleTable | None = None


def make_speculator(spec: SpecConfig, cost: PassCost | None, stats: dict[str, AcceptanceStats],
                    draft: DraftModel | None = None, speed: DraftSpeed | None = None,
                    steps: dict[str, StepCost] | None = None, overlap: bool = False,
                    free: FreeSources = FreeSources()) -> Speculator | None:
    """The speculator for `spec`, or None for plain decoding. `stats` gains the acceptance
    statistics it learns, keyed by source ("ngram", "suffix", "recycle", "model"); `speed` is
    what auto learns about the draft model's speed; `steps` what steps cost in wall time,
    keyed by speculator ("ngram", "chain", "tree", "auto", and "auto, free" for auto's steps
    without the draft model) and, for a run that drafts while the target verifies (`overlap`),
    apart from runs that do not ("tree, overlapped"): their steps cost differently. All
    persist with the calibration."""
    depth = spec.depth or DEFAULT_DEPTH
    if spec.max_nodes == 1:
        return None
    if spec.needs_costs and cost is None:
        raise ValueError("planned speculation needs a cost curve")
    plan = cost if spec.needs_costs else None

    # Without --budget the planner sizes trees up to what the calibration measured: hundreds of
    # nodes where a pass costs about what one token does (an offloaded target), a few on a CPU.
    cap = spec.budget or (cost.max_size if cost is not None and spec.needs_costs else spec.max_nodes)

    def step(key: str) -> StepCost | None:
        return steps.setdefault(key, StepCost(plan)) if plan is not None and steps is not None else None

    def source(name: str, drafter: Drafter, priors: dict | None = None) -> Source:
        learnt = stats.setdefault(name, AcceptanceStats())
        if priors is not None:  # (not saved with the counts: set on every speculator made)
            learnt.priors = priors
        return Source(name, drafter, learnt)

    def overlapped(key: str) -> str:
        return f"{key}, overlapped" if overlap else key  # free drafters prepare nothing

    lookup = source("ngram", NgramDrafter(), match_priors("ngram"))
    if spec.mode == "ngram":
        return PlannedSpeculator("ngram", [lookup], plan, cap, depth, step("ngram"))
    if spec.mode in MODEL_MODES:
        if draft is None:
            raise UsageError(f"--spec {spec.mode} needs a draft model", hint="pass --draft NAME, or use --spec ngram")
        config = ModelDraftConfig.chain(min(depth, 8)) if spec.mode == "chain" else ModelDraftConfig()
        model = source("model", ModelDrafter(draft, config))
        return PlannedSpeculator(spec.mode, [model], plan, cap, depth, step(overlapped(spec.mode)))
    assert cost is not None
    sources = [lookup, source("suffix", SuffixDrafter(free.shared), match_priors("suffix")),
               replace(source("recycle", RecycleDrafter(free.recycled)), grafts=True, everywhere=True)]
    if draft is not None:
        sources.append(source("model", ModelDrafter(draft)))
    return PlannedSpeculator("auto", sources, plan, cap, depth, step(overlapped("auto")),
                             free_step_cost=step("auto, free"), gate=ModelGate(cost, speed) if draft else None)
