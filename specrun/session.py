"""A loaded target model, its optional draft model, and what was measured about them.

`run`, `chat` and `bench` all need the same assembly: load the engines, check
that the draft tokenizes like the target, open KV caches, find (or measure) the
target's cost curve, and build speculators for a `SpecConfig`. It lives here
once, so what `bench` measures is what `run` and `chat` do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from specrun import calibrate
from specrun.engines import EngineConfig
from specrun.engines.llamacpp import LlamaCppEngine, default_ctx
from specrun.errors import UsageError
from specrun.generate import MODEL_MODES, Speculator, SpecConfig, make_speculator
from specrun.spec.draft_model import VocabMismatch, check_vocab_compatible
from specrun.spec.planner import AutoSpeculator


@dataclass(frozen=True)
class SessionConfig:
    target: Path
    draft: Path | None  # None: no draft model (prompt lookup is still available)
    engine: EngineConfig  # shared by target and draft; n_seq_max bounds tree size
    calibration_root: Path  # where cost curves and acceptance statistics are kept


def n_seq_for(specs: list[SpecConfig]) -> int:
    """KV sequences the engines need for the largest tree any of `specs` may verify."""
    return max([1] + [s.max_nodes + 1 for s in specs if s.mode != "none"])


class Session:
    """Target (and draft) engines with open contexts, and the target's calibration.

    The draft model is loaded when a speculator first needs it: chain and tree always do,
    auto only while the draft's remembered speed says it may pay (AutoSpeculator.load_model),
    so a run that will not draft with it does not spend a second loading, checking and
    prefilling it."""

    def __init__(self, config: SessionConfig, notice: Callable[[str], None] = lambda _: None) -> None:
        """Load the target (no context yet). `notice` receives one-line progress messages."""
        self.config, self.notice = config, notice
        self.target = LlamaCppEngine(config.target, config.engine)
        self.draft: LlamaCppEngine | None = None
        self.calibration: calibrate.Calibration | None = None

    def _draft_engine(self) -> LlamaCppEngine | None:
        """The draft engine, loaded and vocabulary-checked on first use, opened like the target."""
        if self.draft is None and self.config.draft is not None:
            draft = LlamaCppEngine(self.config.draft, self.config.engine)
            try:
                check_vocab_compatible(self.target, draft)
            except VocabMismatch as e:
                draft.close()
                raise UsageError(f"{self.config.draft.name} cannot draft for {self.config.target.name}: {e}",
                                 hint="pick a draft of the same model family, or --no-draft") from None
            if self.target.n_ctx:
                draft.open(self.target.n_ctx)
            self.draft = draft
        return self.draft

    def context_size(self, requested: int | None, needed: int = 0) -> int:
        """--ctx when given, else a cache that fits `needed` tokens (see default_ctx)."""
        return requested or default_ctx(self.target.n_ctx_train, needed)

    def open(self, n_ctx: int) -> None:
        """Allocate the KV caches (the draft's, once loaded, as long as the target's)."""
        self.target.open(n_ctx)
        if self.draft is not None:
            self.draft.open(self.target.n_ctx)

    def calibrated(self, force: bool = False) -> calibrate.Calibration:
        """The stored cost curve for this model and these settings, measured now if missing
        (or if `force`). Needs an open context; leaves the target's cache empty."""
        if self.calibration is not None and not force:
            return self.calibration
        file = calibrate.calibration_path(self.config.calibration_root, self.config.target,
                                          self.target.settings_key())
        found = None if force else calibrate.load(file)
        if found is None:
            once = "" if force else " (once)"
            self.notice(f"measuring this machine's cost curve for {self.config.target.name}{once}…")
            sizes = tuple(n for n in calibrate.SIZES if n <= self.target.config.n_seq_max - 1)
            old = calibrate.load(file)  # keep what was learnt about acceptance
            # Acceptance is about text and is kept; what auto learnt about draft speed was
            # relative to the old curve and is measured again.
            found = calibrate.Calibration(file, calibrate.measure_cost_curve(self.target, sizes),
                                          old.stats if old else {}, {}, self.target.settings_key())
            found.save()
        found.settings = self.target.settings_key()  # also for files from before settings were kept
        self.calibration = found
        return found

    def speculator(self, spec: SpecConfig) -> tuple[Speculator | None, int]:
        """(speculator or None for plain decoding, max tree depth) for `spec`, sharing this
        session's draft engine and learnt statistics."""
        if spec.mode != "none" and spec.max_nodes + 1 > self.target.config.n_seq_max:
            raise ValueError(f"engines were opened for trees of at most {self.target.config.n_seq_max - 1} nodes")
        cal = self.calibrated() if spec.needs_costs else None
        memory = None
        draft = self._draft_engine() if spec.mode in MODEL_MODES else None
        if spec.mode == "auto" and cal is not None and self.config.draft is not None:
            memory = cal.memory.setdefault(self.config.draft.name, {})
            if AutoSpeculator.load_model(memory, cal.cost):
                draft = self._draft_engine()
        return make_speculator(spec, cal.cost if cal else None, cal.stats if cal else {}, draft, memory)

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
