"""Speculative modes side by side on one workload: what `specrun bench` measures.

Every mode runs on the same prompts through the same session and generation
loop that `run` and `chat` use, alternating per prompt (a rotating order) so
machine noise spreads over all modes. Speed is decode tokens per second, from
the first token to the last (prefill excluded, as for every peer), and each
speculative run is compared with plain decoding of the same prompt in the
same round. llama-cpp-python's own decoding runs as peer rows.

A mode runs through a `Runner`: in this process on a shared session
(`SessionRunner`, `PeerRunner`), or in a worker process of its own inside a
memory limit (`bench_workers.WorkerRunner`). `Bench` only rotates prompts
over runners and compares their outputs. No I/O here: progress and notices go
to callbacks, summaries are `bench_report`'s, and the CLI draws the table.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol

import numpy as np

from specrun.engines import Placement
from specrun.errors import UsageError
from specrun.generate import Generation, GenerationConfig
from specrun.peers import LlamaCppPythonPeer
from specrun.sampling import SamplingConfig
from specrun.session import Session
from specrun.speculate.factory import SpecConfig

# --- modes -------------------------------------------------------------------------


@dataclass(frozen=True)
class Mode:
    key: str  # what --modes takes
    label: str  # the table's row name
    spec: SpecConfig | None  # None: a peer engine, not specrun's loop
    needs_draft: bool = False


MODES = {m.key: m for m in (
    Mode("plain", "specrun plain", SpecConfig("none")),
    Mode("auto", "specrun auto", SpecConfig("auto")),
    Mode("ngram", "specrun ngram", SpecConfig("ngram")),
    Mode("chain", "specrun chain", SpecConfig("chain"), needs_draft=True),
    Mode("tree", "specrun tree", SpecConfig("tree"), needs_draft=True),
    Mode("auto-seq", "specrun auto, no overlap", SpecConfig("auto", overlap="off")),
    Mode("free", "specrun auto, no draft model", SpecConfig("auto", use_draft=False)),
    Mode("tree-seq", "specrun tree, no overlap", SpecConfig("tree", overlap="off"), needs_draft=True),
    Mode("lcp-lookup", "llama-cpp-python lookup", None),
    Mode("lcp-plain", "llama-cpp-python plain", None),
)}
DEFAULT_MODES = ("plain", "auto", "ngram", "chain", "tree", "lcp-lookup")


def mode_of(key: str) -> Mode | None:
    """A mode by its --modes key: one of MODES, or `tree:BxD`, a fixed tree of B nodes (root
    included) at most D deep, without overlap (what a sweep compares the planner with)."""
    if key in MODES:
        return MODES[key]
    kind, _, shape = key.partition(":")
    budget, _, depth = shape.partition("x")
    if kind in ("tree", "ngram") and budget.isdigit() and depth.isdigit() and int(budget) >= 1 and int(depth) >= 1:
        spec = SpecConfig(kind, budget=int(budget), depth=int(depth), overlap="off")
        return Mode(key, f"specrun {kind} {budget} nodes, depth {depth}", spec, needs_draft=kind == "tree")
    return None


def parse_modes(text: str, have_draft: bool, notice: Callable[[str], None]) -> list[Mode]:
    """Comma-separated mode keys (plain always included, first). Draft-model modes are dropped
    with a notice when no draft is available, unless asked for by name."""
    keys = [k.strip() for k in text.split(",") if k.strip()] if text else list(DEFAULT_MODES)
    unknown = [k for k in keys if mode_of(k) is None]
    if unknown:
        raise UsageError(f"unknown mode '{unknown[0]}'",
                         hint=f"use some of: {', '.join(MODES)}, or tree:BUDGETxDEPTH (e.g. tree:6x4)")
    modes = [MODES["plain"]] + [m for k in dict.fromkeys(keys) if k != "plain" and (m := mode_of(k)) is not None]
    if not have_draft:
        missing = [m.key for m in modes if m.needs_draft]
        if missing and text:
            raise UsageError(f"mode {missing[0]} needs a draft model", hint="pull the target's draft or pass --draft")
        if missing:
            notice(f"no draft model: skipping {', '.join(missing)}")
        modes = [m for m in modes if not m.needs_draft]
    return modes


# --- results -----------------------------------------------------------------------

@dataclass
class RunResult:
    """One mode on one prompt in one round."""

    prompt_id: str
    round: int
    mode: str
    tokens_per_s: float
    generated_tokens: int
    text: str
    tokens: list[int] = field(default_factory=list)
    target_calls: int | None = None
    drafted: int | None = None
    accepted: int | None = None
    draft_s: float | None = None
    verify_s: float | None = None
    accepted_lengths: list[int] = field(default_factory=list)  # per target call after the prefill
    tree_sizes: list[int] = field(default_factory=list)  # nodes verified per call (1 = plain)
    tokens_per_call: float | None = None  # produced per target call, the prefill's included
    depths: list[int] = field(default_factory=list)  # verified tree depth per call
    bytes_per_pass: float = 0.0  # offloaded targets: weight bytes streamed per pass
    read_s_per_pass: float = 0.0  # ... and the time reads were in flight per pass
    overlap: bool = False  # drafted while the target verified
    parallel_s: float = 0.0  # drafting done during target passes
    prepared_used: int = 0  # trees grown from what was prepared during the previous pass
    prepared_dropped: int = 0
    speedup: float = 0.0  # over plain in the same round
    differs_at: int | None = None  # first token that differs from plain, None if identical
    top2_margin: float | None = None  # target's top-2 logit margin there (greedy)
    failed: str | None = None  # the mode could not run this prompt (its worker was killed, ...)
    sources: dict[str, list[int]] = field(default_factory=dict)  # per drafter: [proposed, verified, accepted]


@dataclass(frozen=True)
class BenchConfig:
    max_tokens: int = 128
    repeats: int = 1
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.0))


def _timed(tokens: Iterator[int]) -> tuple[float, int]:
    """(tokens per second from the first token to the last, tokens) for a peer's token stream:
    the prefill's time (to the first token) is left out, as it is of specrun's modes."""
    first = last = None
    n = 0
    for _ in tokens:
        last = time.perf_counter()
        if first is None:
            first = last
        n += 1
    rate = (n - 1) / (last - first) if first is not None and last is not None and last > first else 0.0
    return rate, n


# --- runners -------------------------------------------------------------------------

class Runner(Protocol):
    """Runs one mode on a prompt's tokens."""

    def run(self, tokens: list[int], prompt_id: str, rnd: int) -> RunResult: ...

    def margin(self, context: list[int]) -> float:
        """The target's top-2 logit margin after `context` (plain's runner is asked)."""
        ...


class SessionRunner:
    """A specrun mode on a session shared with the other modes of this process."""

    def __init__(self, session: Session, mode: Mode, config: BenchConfig) -> None:
        assert mode.spec is not None
        self.session, self.mode, self.spec, self.config = session, mode, mode.spec, config

    def run(self, tokens: list[int], prompt_id: str, rnd: int) -> RunResult:
        cfg, session = self.config, self.session
        session.forget()  # every mode pays the same prefill
        speculator = session.speculator(self.spec)
        overlap = session.overlaps(self.spec)
        gen = Generation(session.target, session.cache, tokens, GenerationConfig(cfg.max_tokens, cfg.sampling, overlap),
                         speculator)
        accepted_lengths, tree_sizes, depths = [], [], []
        for step in gen:
            if step.target_calls:
                accepted_lengths.append(step.accepted)
                tree_sizes.append(step.drafted + 1)
                depths.append(step.depth)
        s = gen.stats
        session.save()
        # As the peers' rate, from the first token (the prefill's) to the last. Not from the first
        # piece printed: a speculative first step comes out with the prefill's token, so a short
        # answer drafted whole in one step would be timed over its last few tokens alone.
        return RunResult(
            prompt_id, rnd, self.mode.key, s.tokens_per_s, s.generated_tokens, gen.text, list(gen.tokens),
            target_calls=s.target_calls, drafted=s.drafted_tokens, accepted=s.accepted_tokens, draft_s=s.draft_s,
            verify_s=s.verify_s, accepted_lengths=accepted_lengths, tree_sizes=tree_sizes,
            tokens_per_call=s.tokens_per_call, depths=depths, bytes_per_pass=s.bytes_per_pass,
            read_s_per_pass=s.stream_busy_s / s.streamed_passes if s.streamed_passes else 0.0,
            overlap=overlap, parallel_s=s.parallel_s, prepared_used=s.prepared_used,
            prepared_dropped=s.prepared_dropped,
            sources={name: [c.proposed, c.verified, c.accepted] for name, c in s.sources.items()})

    def margin(self, context: list[int]) -> float:
        self.session.forget()
        assert self.session.cache is not None
        logits = self.session.target.eval(self.session.cache, context).row(0)  # [n_vocab]
        top2 = np.sort(logits)[-2:]
        return float(top2[1] - top2[0])


class PeerRunner:
    """llama-cpp-python on the target's file: the peer users compare against."""

    def __init__(self, peer: LlamaCppPythonPeer, mode: Mode, config: BenchConfig, vocab: object) -> None:
        self.peer, self.mode, self.config, self.vocab = peer, mode, config, vocab

    @classmethod
    def open(cls, target: Path, mode: Mode, config: BenchConfig, n_ctx: int, placement: Placement,
             vocab: object) -> "PeerRunner":
        """The peer on `target` with the target's threads and GPU layers (`vocab`: the target's)."""
        gpu_layers = 0 if placement.device == "cpu" else placement.gpu_layers
        peer = LlamaCppPythonPeer(target, n_ctx, placement.threads, gpu_layers, lookup=mode.key == "lcp-lookup")
        return cls(peer, mode, config, vocab)

    def run(self, tokens: list[int], prompt_id: str, rnd: int) -> RunResult:
        out: list[int] = []

        def stream() -> Iterator[int]:
            for tok in self.peer.generate(tokens, self.config.max_tokens, self.config.sampling,
                                          self.vocab.is_eog):  # type: ignore[attr-defined]
                out.append(tok)
                yield tok

        rate, n = _timed(stream())
        text = b"".join(self.vocab.piece(t) for t in out).decode("utf-8", "replace")  # type: ignore[attr-defined]
        return RunResult(prompt_id, rnd, self.mode.key, rate, n, text, out)

    def margin(self, context: list[int]) -> float:
        raise NotImplementedError("margins are plain decoding's to give")

    def close(self) -> None:
        self.peer.close()


# --- the benchmark ---------------------------------------------------------------------

class Bench:
    """Runs `modes` over prompts (as token ids) through their runners; results in `self.results`."""

    def __init__(self, runners: dict[str, Runner], modes: list[Mode], config: BenchConfig) -> None:
        self.runners, self.modes, self.config = runners, modes, config
        self.results: list[RunResult] = []

    def run(self, prompts: list[tuple[str, list[int]]], on_run: Callable[[str, str], None] = lambda p, m: None) -> None:
        """Every mode on every prompt, `repeats` rounds; `on_run(prompt id, mode label)` after each."""
        k = 0
        for rnd in range(self.config.repeats):
            for pid, tokens in prompts:
                order = self.modes[k % len(self.modes):] + self.modes[:k % len(self.modes)]
                k += 1
                done = {}
                for mode in order:
                    done[mode.key] = self.runners[mode.key].run(tokens, pid, rnd)
                    on_run(pid, mode.label)
                self._compare(done, tokens)
                self.results += [done[m.key] for m in self.modes]

    def _compare(self, done: dict[str, RunResult], prompt: list[int]) -> None:
        """Speed-up over plain, and where the output differs from plain's, the first differing
        token and the target's top-2 logit margin after plain's prefix there."""
        plain = done["plain"]
        for r in done.values():
            r.speedup = r.tokens_per_s / plain.tokens_per_s if plain.tokens_per_s > 0 else 0.0
            if r is plain or r.failed or plain.failed:
                continue
            at = _first_difference(plain.tokens, r.tokens)
            if at is not None:
                r.differs_at = at
                r.top2_margin = self.runners["plain"].margin(prompt + plain.tokens[:at])


def _first_difference(plain: list[int], other: list[int]) -> int | None:
    if other == plain:
        return None
    return next((i for i, (a, b) in enumerate(zip(plain, other)) if a != b), min(len(plain), len(other)))
