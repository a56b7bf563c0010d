"""A loaded target model, its optional draft model, and what was measured about them.

`run`, `chat` and `bench` all need the same assembly: plan the run's memory
(where the target runs, whether the draft fits, how big a context and a tree),
open the engines as planned, check that the draft tokenizes like the target,
open KV caches, find (or measure) the target's cost curve, and build
speculators for a `SpecConfig`. It lives here once, so what `bench` measures
is what `run` and `chat` do. No backend is named here: the memory plan picks
it from the model, the placement and the memory this process may use.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from specrun import calibrate
from specrun.engines import Engine, Placement, open_engine, tree_limit
from specrun.engines.memory_plan import MemoryPlan, PlanRequest, plan_memory
from specrun.errors import UsageError
from specrun.memory_limit import MemoryLimit
from specrun.speculate.base import Speculator
from specrun.speculate.draft_model import VocabMismatch, check_vocab_compatible
from specrun.speculate.factory import MODEL_MODES, SpecConfig, make_speculator


@dataclass(frozen=True)
class SessionConfig:
    target: Path
    draft: Path | None  # None: no draft model (prompt lookup is still available)
    calibration_root: Path  # where cost curves and what was learnt are kept
    specs: tuple[SpecConfig, ...] = (SpecConfig(),)  # the modes it will serve: they size the trees
    target_placement: Placement = Placement()
    draft_placement: Placement = Placement()
    ctx: int | None = None  # --ctx; None: the memory plan's (at least what `needed_ctx` says, 4096 where it fits)
    needed_ctx: int = 0  # tokens the requests may need at most (prompt plus tokens to generate)

    @property
    def max_tree_nodes(self) -> int:
        """The largest tree the modes would verify in one pass, or the calibration measure (the
        memory plan caps it at what the engine and the memory allow); 0: none."""
        nodes = [s.max_nodes for s in self.specs]
        nodes += [max(calibrate.SIZES) for s in self.specs if s.needs_costs]
        return max(nodes) if max(nodes) > 1 else 0

    def plan_request(self) -> PlanRequest:
        return PlanRequest(self.target, self.draft, self.target_placement, self.draft_placement, self.ctx,
                           self.needed_ctx, self.max_tree_nodes,
                           draft_required=any(s.mode in MODEL_MODES for s in self.specs),
                           fixed_nodes=max((s.budget or 0 for s in self.specs if s.mode != "none"), default=0))


class Session:
    """Target (and draft) engines with open caches, and the target's calibration.

    The draft model is loaded when a speculator first needs it: chain and tree always do,
    auto only while the draft's remembered speed says it may pay (DraftSpeed.should_load),
    so a run that will not draft with it does not spend a second loading, checking and
    prefilling it."""

    def __init__(self, config: SessionConfig, notice: Callable[[str], None] = lambda _: None,
                 limit: MemoryLimit | None = None) -> None:
        """Plan the run's memory (under `limit`; None: the limit this process is under), then
        load the target as planned (no cache yet). `notice` receives one-line progress
        messages, what the plan gave up, and what each engine noticed as it loaded."""
        self.plan: MemoryPlan = plan_memory(config.plan_request(), limit)
        for line in self.plan.notices:
            notice(line)
        config = replace(config, target_placement=self.plan.target,
                         draft=config.draft if self.plan.draft is not None else None,
                         draft_placement=self.plan.draft or config.draft_placement)
        self.config, self.notice = config, notice
        self.target: Engine = open_engine(config.target, config.target_placement, self.plan.tree_nodes)
        for line in self.target.notices:
            notice(line)
        self.draft: Engine | None = None
        self.calibration: calibrate.Calibration | None = None

    @property
    def draft_tree_nodes(self) -> int:
        """The draft engine's largest tree: the target's, up to its own limit (a tree bigger than
        that is grown with leaves the draft never evaluates)."""
        assert self.config.draft is not None
        return min(self.plan.tree_nodes, tree_limit(self.config.draft, self.config.draft_placement) or
                   self.plan.tree_nodes)

    def _draft_engine(self) -> Engine | None:
        """The draft engine, loaded and vocabulary-checked on first use, opened like the target."""
        if self.draft is None and self.config.draft is not None:
            draft = open_engine(self.config.draft, self.config.draft_placement, self.draft_tree_nodes)
            try:
                check_vocab_compatible(self.target.vocab, draft.vocab)
            except VocabMismatch as e:
                draft.close()
                raise UsageError(f"{self.config.draft.name} cannot draft for {self.config.target.name}: {e}",
                                 hint="pick a draft of the same model family, or --no-draft") from None
            for line in draft.notices:
                self.notice(line)
            if self.target.n_ctx:
                draft.open(self.target.n_ctx)
            self.draft = draft
        return self.draft

    @property
    def n_ctx(self) -> int:
        """The context the memory plan made room for (--ctx when given)."""
        return self.plan.n_ctx

    def open(self, n_ctx: int) -> None:
        """Allocate the KV caches (the draft's, once loaded, as long as the target's)."""
        self.target.open(n_ctx)
        if self.draft is not None:
            self.draft.open(self.target.n_ctx)

    def forget(self) -> None:
        """Empty both caches, so the next generation evaluates its whole prompt (as bench
        needs: every mode pays the same prefill)."""
        for engine in (self.target, self.draft):
            if engine is not None:
                engine.rewind(0)

    def calibrated(self, force: bool = False) -> calibrate.Calibration:
        """The stored cost curve for this model and these settings, measured now if missing
        (or if `force`, or if it stops short of sizes measured now). Leaves the target's cache
        empty; a cache too small to measure in is replaced by a big enough one for the
        measurement, then reopened at its own size."""
        if self.calibration is not None and not force:
            return self.calibration
        if not self.target.n_ctx:
            raise RuntimeError("calibrated() before open()")
        file = calibrate.calibration_path(self.config.calibration_root, self.config.target,
                                          self.target.settings_key())
        sizes = calibrate.sizes_up_to(self.target.max_tree_nodes)
        stored = calibrate.load(file)
        found = None if force else stored
        if found is not None and (calibrate.stops_short(found.cost, sizes) or not found.trusted):
            found = None  # measured with fewer sizes (up to 32) on a curve flat enough for more, or while busy
        if found is None:
            once = "" if force else " (once)"
            self.notice(f"measuring this machine's cost curve for {self.config.target.name}{once}…")
            n_ctx = self.target.n_ctx
            if n_ctx < calibrate.context_needed(sizes):
                self.target.open(calibrate.context_needed(sizes))
            try:
                curve, trusted = calibrate.measure_checked(self.target, sizes, self.notice)
            finally:
                if self.target.n_ctx != n_ctx:
                    self.target.open(n_ctx)
            old = stored  # keep what was learnt about acceptance
            # Acceptance is about text and is kept; what auto learnt about draft speed was
            # relative to the old curve and is measured again.
            found = calibrate.Calibration(file, curve, old.stats if old else {}, {}, self.target.settings_key(),
                                          trusted=trusted)
            found.save()
        found.settings = self.target.settings_key()  # also for files from before settings were kept
        self.calibration = found
        return found

    def speculator(self, spec: SpecConfig) -> Speculator | None:
        """The speculator for `spec` (None: plain decoding), sharing this session's draft engine
        and what it learnt."""
        if spec.budget is not None and spec.max_nodes > max(self.target.max_tree_nodes, 1):  # planned trees fit
            raise ValueError(f"the engines were opened for trees of at most {self.target.max_tree_nodes} nodes")
        cal = self.calibrated() if spec.needs_costs else None
        speed = None
        draft = self._draft_engine() if spec.mode in MODEL_MODES else None
        if spec.mode == "auto" and cal is not None and self.config.draft is not None:
            speed = cal.speed_of(self.config.draft)
            if speed.should_load(1.0 / cal.cost.cost(1)):
                draft = self._draft_engine()
        return make_speculator(spec, cal.cost if cal else None, cal.stats if cal else {}, draft, speed,
                               cal.steps if cal else None, self.overlaps(spec))

    def overlaps(self, spec: SpecConfig) -> bool:
        """Whether to draft while the target verifies. `--overlap on` and `off` say so; auto
        overlaps where a draft model drafts (prompt lookup has nothing to prepare) and the
        target leaves the CPU to it (it computes on a GPU), and where both compute on the CPU
        only if overlapping was measured to pay on this machine (measured once, then kept).
        Never for plain decoding: there is no speculator to draft."""
        if spec.max_nodes == 1:
            return False
        if spec.overlap != "auto":
            return spec.overlap == "on"
        if spec.mode not in MODEL_MODES + ("auto",) or self.draft is None:
            return False
        if not self.target.on_cpu:
            return True
        cal = self.calibrated()
        assert self.config.draft is not None
        gain = cal.overlap.get(self.config.draft.name)
        if gain is None:
            self.notice("measuring whether drafting during target passes pays here (once)…")
            gain = cal.overlap[self.config.draft.name] = calibrate.measure_overlap(self.target, self.draft)
            cal.save()
        return gain >= calibrate.OVERLAP_PAYS

    def save(self) -> None:
        """Keep what was learnt about acceptance (also after Ctrl-C)."""
        if self.calibration is not None:
            self.calibration.save()

    def close(self) -> None:
        for engine in (self.draft, getattr(self, "target", None)):
            if engine is not None:
                engine.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
