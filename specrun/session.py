"""A loaded target model, its optional draft model, and what was measured about them.

`run`, `chat` and `bench` all need the same assembly: plan the run's memory
(where the target runs, whether the draft fits, how big a context and a tree),
open the engines as planned, check that the draft tokenizes like the target,
make their KV caches, find (or measure) the target's cost curve, and build
speculators for a `SpecConfig`. It lives here once, so what `bench` measures
is what `run` and `chat` do. No backend is named here: the memory plan picks
it from the model, the placement and the memory this process may use.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from specrun import calibrate, planner_memory
from specrun.engines import Cache, Engine, Placement, open_engine, tree_limit
from specrun.engines.memory_plan import MemoryPlan, PlanRequest, plan_memory
from specrun.engines.rpc import parse_endpoint
from specrun.errors import UsageError
from specrun.files import model_bytes
from specrun.generate import Generation, GenerationConfig
from specrun.memory_limit import MemoryLimit
from specrun.planner_memory import PlannerMemory
from specrun.speculate.auto import could_pay
from specrun.speculate.base import Speculator
from specrun.speculate.draft_model import DraftModel, VocabMismatch, check_vocab_compatible
from specrun.speculate.factory import MODEL_MODES, FreeSources, SpecConfig, make_speculator
from specrun.speculate.recycle import RecycleTable
from specrun.speculate.suffix import SuffixIndex
from specrun.speculate.overlap import measure_overlap, should_overlap


def others_load(target: Placement) -> calibrate.OthersLoad:
    """What a calibration checks other processes took of the CPU: not measured where RPC workers
    on this machine compute the target's passes (their CPU time is the pass's own)."""
    workers = [parse_endpoint(w, "--rpc") for w in target.rpc]
    return calibrate.OthersLoad(read=lambda: None) if any(w.loopback for w in workers) else calibrate.OthersLoad()


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
    keep_recycled: bool = True  # start token recycling from the table earlier runs kept, and keep it (bench
    # does not: its prompts are measured unseen, every mode from an empty table)
    batched: int = 0  # sequences sharing the target's passes at most (batched.py), each step a tree: even a
    # plain one's node; 0: one sequence, not batched

    @property
    def max_tree_nodes(self) -> int:
        """The largest tree the modes would verify in one pass, or the calibration measure (the
        memory plan caps it at what the engine and the memory allow); 0: none. A batch's pass
        holds a node per sequence at least: its curve (and bench's bound) must reach that far."""
        nodes = [s.max_nodes for s in self.specs] + [self.batched]
        nodes += [max(calibrate.SIZES) for s in self.specs if s.needs_costs]
        return max(nodes) if max(nodes) > 1 or self.batched else 0

    def plan_request(self) -> PlanRequest:
        return PlanRequest(self.target, self.draft, self.target_placement, self.draft_placement, self.ctx,
                           self.needed_ctx, self.max_tree_nodes,
                           draft_required=any(s.mode in MODEL_MODES for s in self.specs),
                           fixed_nodes=max((s.budget or 0 for s in self.specs if s.mode != "none"), default=0),
                           sequences=max(self.batched, 1))


class Session:
    """Target (and draft) engines, a cache on each (`cache`, `draft_cache`: what run, chat and
    bench generate in; an engine makes more for other sequences), and the target's calibration.

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
        self.target: Engine = open_engine(config.target, config.target_placement, self.plan.tree_nodes,
                                           max(config.batched, 1))
        for line in self.target.notices:
            notice(line)
        self.draft: Engine | None = None
        self.cache: Cache | None = None  # the target's, once `open`ed
        self.draft_cache: Cache | None = None  # the draft's, as long as the target's, once the draft loads
        self.calibration: PlannerMemory | None = None
        self.unsaved = False  # the store could not keep what was measured (said once)
        self.corpus: SuffixIndex | None = None  # --corpus: what the suffix drafter reads beside the context
        self._earlier: list[list[int]] = []  # this session's earlier generations (`remember`)
        self._earlier_index: SuffixIndex | None = None
        self._auto_loads: bool | None = None  # whether auto drafts with the draft model in this session
        self.draft_hopeless: bool | None = None  # the cost curve says no draft model could pay (auto.could_pay)
        self._recycled: dict[SpecConfig, RecycleTable] = {}  # per mode: shared by its speculators, prompt to prompt
        # Caches for a batch's next sequences (`sequence`): ones ended sequences gave back, and
        # the session's own (`cache`) while not lent. Not kept in the list: open() and calibrated()
        # replace it, and the list would hand out the closed one.
        self._spare: list[Cache] = []
        self._draft_caches: dict[int, tuple[Cache, Cache]] = {}  # a batch's target caches' draft caches, by id
        self._own_lent = False

    @property
    def draft_tree_nodes(self) -> int:
        """The draft engine's largest tree: the target's, up to its own limit (a tree bigger than
        that is grown with leaves the draft never evaluates)."""
        assert self.config.draft is not None
        return min(self.plan.tree_nodes, tree_limit(self.config.draft, self.config.draft_placement) or
                   self.plan.tree_nodes)

    def _draft_engine(self) -> Engine | None:
        """The draft engine, loaded and vocabulary-checked on first use, opened like the target
        (a batch's sequences' draft caches share its passes as their target caches do)."""
        if self.draft is None and self.config.draft is not None:
            draft = open_engine(self.config.draft, self.config.draft_placement, self.draft_tree_nodes,
                                max(self.config.batched, 1))
            try:
                check_vocab_compatible(self.target.vocab, draft.vocab)
            except VocabMismatch as e:
                draft.close()
                raise UsageError(f"{self.config.draft.name} cannot draft for {self.config.target.name}: {e}",
                                 hint="pick a draft of the same model family, or --no-draft") from None
            for line in draft.notices:
                self.notice(line)
            if self.cache is not None:
                self.draft_cache = draft.new_cache(self.cache.n_ctx)
            self.draft = draft
        return self.draft

    def _draft_model(self, separate: Cache | None) -> DraftModel | None:
        """The draft engine (loaded on first use) and a cache as long as the target's: the
        session's, or for `separate` (another sequence's target cache) a new one as long as it."""
        draft = self._draft_engine()
        if draft is None:
            return None
        if separate is not None:  # one draft cache per target cache, kept with it as the batch hands it on
            kept = self._draft_caches.get(id(separate))
            if kept is None or kept[0] is not separate or kept[1].closed:
                kept = self._draft_caches[id(separate)] = (separate, draft.new_cache(separate.n_ctx))
            return DraftModel(draft, kept[1])
        if self.cache is None:
            raise RuntimeError("a draft model's speculator before open()")
        if self.draft_cache is None:
            self.draft_cache = draft.new_cache(self.cache.n_ctx)
        return DraftModel(draft, self.draft_cache)

    @property
    def n_ctx(self) -> int:
        """The context the memory plan made room for (--ctx when given)."""
        return self.plan.n_ctx

    def open(self, n_ctx: int) -> Cache:
        """Allocate the KV caches (the draft's, once loaded, as long as the target's), replacing
        any this session made before; the target's."""
        for cache in (self.cache, self.draft_cache):
            if cache is not None:
                cache.close()
        self.cache = self.target.new_cache(n_ctx)
        if self.draft is not None:
            self.draft_cache = self.draft.new_cache(self.cache.n_ctx)
        return self.cache

    def forget(self) -> None:
        """Empty both caches, so the next generation evaluates its whole prompt (as bench
        needs: every mode pays the same prefill)."""
        for engine, cache in ((self.target, self.cache), (self.draft, self.draft_cache)):
            if engine is not None and cache is not None:
                engine.rewind(cache, 0)

    def calibrated(self, force: bool = False) -> PlannerMemory:
        """The stored cost curve for this model and these settings, measured now if missing
        (or if `force`, or if it stops short of sizes measured now). Leaves the target's cache
        empty; one too small to measure in is replaced by a big enough one for the measurement
        (freed first: the memory plan counted one), then by a new one of its own size: read
        `cache` after asking for a speculator."""
        if self.calibration is not None and not force:
            return self.calibration
        if self.cache is None:
            raise RuntimeError("calibrated() before open()")
        file = planner_memory.memory_path(self.config.calibration_root, self.config.target,
                                          self.target.settings_key())
        sizes = calibrate.sizes_up_to(self.target.max_tree_nodes)
        stored = planner_memory.load(file)
        found = None if force else stored
        if found is not None and (calibrate.stops_short(found.cost, sizes) or not found.trusted):
            found = None  # measured with fewer sizes (up to 32) on a curve flat enough for more, or while busy
        if found is None:
            once = "" if force else " (once)"
            self.notice(f"measuring this machine's cost curve for {self.config.target.name}{once}…")
            n_ctx, small = self.cache.n_ctx, self.cache.n_ctx < calibrate.context_needed(sizes)
            if small:
                self.cache.close()
                self.cache = self.target.new_cache(calibrate.context_needed(sizes))
            try:
                curve, trusted = calibrate.measure_checked(self.target, self.cache, sizes, self.notice,
                                                           load=lambda: others_load(self.config.target_placement))
            finally:
                if small:
                    self.cache.close()
                    self.cache = self.target.new_cache(n_ctx)
            old = stored  # keep what was learnt about acceptance
            # Acceptance is about text and is kept; what auto learnt about draft speed was
            # relative to the old curve and is measured again.
            found = PlannerMemory(file, curve, old.stats if old else {}, {}, self.target.settings_key(),
                                  trusted=trusted)
            self._keep(found)
        found.settings = self.target.settings_key()  # also for files from before settings were kept
        self.calibration = found
        return found

    def sequence(self, prompt: Sequence[int], config: GenerationConfig, spec: SpecConfig, n_ctx: int) -> Generation:
        """A sequence for a batch (`BatchGeneration.join`) on the target, with a speculator of its own
        for `spec`, in a spare cache of at least `n_ctx` tokens: the session's own first, then one
        an ended sequence gave back (`sequence_ended`; what it holds in common with the prompt is
        kept), else a new one."""
        own = self.cache
        if own is not None and not self._own_lent and own.n_ctx >= n_ctx:
            cache, self._own_lent = own, True
        else:
            cache = next((c for c in self._spare if c.n_ctx >= n_ctx), None)
            if cache is not None:
                self._spare.remove(cache)
            else:
                cache = self.target.new_cache(n_ctx)
        try:
            # The session's own cache drafts in the session's draft cache (the draft engine's shared
            # context has a slot per sequence, that one included); every other in one of its own.
            separate = None if cache is own else cache
            speculator = self.speculator(spec, separate=separate) if spec.mode != "none" else None
            return Generation(self.target, cache, list(prompt), config, speculator)
        except Exception:  # (a prompt too long for the cache, say): the cache stays spare
            self._give_back(cache)
            raise

    def sequence_ended(self, generation: Generation) -> None:
        """A batch's sequence is over: its cache serves the next one."""
        self._give_back(generation.cache)

    def _give_back(self, cache: Cache) -> None:
        if cache is self.cache:
            self._own_lent = False
        else:
            self._spare.append(cache)

    def speculator(self, spec: SpecConfig, separate: Cache | None = None) -> Speculator | None:
        """The speculator for `spec` (None: plain decoding), sharing this session's draft engine
        and what it learnt. It drafts in the session's draft cache, or for `separate` (the target
        cache of a sequence other than the session's own, as a second conversation's) in a draft
        cache of its own, freed with the draft engine."""
        if spec.budget is not None and spec.max_nodes > max(self.target.max_tree_nodes, 1):  # planned trees fit
            raise ValueError(f"the engines were opened for trees of at most {self.target.max_tree_nodes} nodes")
        cal = self.calibrated() if spec.needs_costs else None
        speed = None
        draft = self._draft_model(separate) if spec.mode in MODEL_MODES else None
        if spec.mode == "auto" and spec.use_draft and cal is not None and self.config.draft is not None:
            speed = cal.speed_of(self.config.draft)
            # Loading is decided once a session (a run is a process, not each of bench's prompts);
            # a draft another mode loaded is there anyway, and auto's gate decides step by step.
            if self.draft_hopeless is None:
                self.draft_hopeless = not could_pay(cal.cost, self._draft_pass_guess(cal))
            if self._auto_loads is None and self.draft is None:
                self._auto_loads = not self.draft_hopeless and speed.should_load(1.0 / cal.cost.cost(1))
            if not self.draft_hopeless and (self.draft is not None or self._auto_loads):
                draft = self._draft_model(separate)
        return make_speculator(spec, cal.cost if cal else None, cal.stats if cal else {}, draft, speed,
                               cal.steps if cal else None, self.overlaps(spec),
                               FreeSources(self._indexes, self._recycled_for(spec)))

    def _draft_pass_guess(self, cal: PlannerMemory) -> float:
        """What a pass of the draft model over one token may cost, before it is loaded: where
        both models compute from RAM on this CPU, the target's one-token pass scaled by the
        files' sizes (such passes cost about their bytes: the 0.5B draft measured 0.44x the
        1.5B target's rate on the EPYC); else nothing, since a streamed or remote pass costs
        a read or a round trip the draft does not pay."""
        draft = self.config.draft
        if draft is None or not self.target.on_cpu or self.plan.target.offload != "none" or self.plan.target.rpc:
            return 0.0
        return cal.cost.cost(1) * model_bytes(draft) / max(model_bytes(self.config.target), 1)

    def _recycled_for(self, spec: SpecConfig) -> RecycleTable:
        """The mode's recycled top-k table: what earlier runs kept (keep_recycled), else empty."""
        if spec not in self._recycled:
            path = planner_memory.recycle_path(self.config.calibration_root, self.config.target)
            self._recycled[spec] = planner_memory.load_recycled(path) if self.config.keep_recycled else RecycleTable()
        return self._recycled[spec]

    def remember(self, tokens: list[int]) -> None:
        """A generation this session made (a reply, with what it answered): the suffix drafter of
        every later speculator reads it, as a conversation's own context does its earlier turns."""
        if tokens:
            self._earlier.append(list(tokens))
            self._earlier_index = None

    def _indexes(self) -> list[SuffixIndex]:
        """What the free drafters read beside the context: the corpus, earlier generations."""
        if self._earlier and self._earlier_index is None:
            self._earlier_index = SuffixIndex(self._earlier)
        return [i for i in (self.corpus, self._earlier_index) if i is not None]

    def overlaps(self, spec: SpecConfig) -> bool:
        """Whether to draft while the target verifies (overlap.should_overlap; never for plain
        decoding: there is no speculator to draft). Where target and draft share the CPU, it
        measures once whether overlapping pays here, and keeps the answer."""
        if spec.max_nodes == 1:
            return False
        drafts = (spec.mode in MODEL_MODES or (spec.mode == "auto" and spec.use_draft)) and self.draft is not None
        return should_overlap(spec.overlap, drafts, self.target.on_cpu, self._overlap_gain)

    def _overlap_gain(self) -> float:
        cal = self.calibrated()
        assert self.config.draft is not None and self.draft is not None
        gain = cal.overlap.get(self.config.draft.name)
        if gain is None:
            self.notice("measuring whether drafting during target passes pays here (once)…")
            target_cache, draft = self.cache, self._draft_model(separate=None)
            assert target_cache is not None and draft is not None
            tokens = calibrate.measurement_tokens(min(self.target.vocab.n_vocab, self.draft.vocab.n_vocab))
            gain = cal.overlap[self.config.draft.name] = measure_overlap(self.target, target_cache, draft.engine,
                                                                         draft.cache, tokens)
            self._keep(cal)
        return gain

    def save(self) -> None:
        """Keep what was learnt about acceptance and, unless told not to, the recycled top-k
        (also after Ctrl-C)."""
        if self.calibration is not None:
            self._keep(self.calibration)
        if self.config.keep_recycled:
            path = planner_memory.recycle_path(self.config.calibration_root, self.config.target)
            for table in self._recycled.values():
                try:
                    planner_memory.save_recycled(path, table)
                except OSError:
                    pass  # a cache of what the target said: the next run learns it again

    def _keep(self, cal: PlannerMemory) -> None:
        """Save `cal`. A store that cannot be written (read-only, full) costs the next run a new
        measurement, not this run: it goes on, and says so once."""
        try:
            cal.save()
        except OSError as e:
            if not self.unsaved:
                self.unsaved = True
                self.notice(f"warning: cannot save what was measured and learnt to {cal.path.parent} "
                            f"({e.strerror or e}); this run goes on without saving it")

    def close(self) -> None:
        for engine in (self.draft, getattr(self, "target", None)):
            if engine is not None:
                engine.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
