"""Speculative modes side by side on one workload: what `specrun bench` measures.

Every mode runs on the same prompts through the same session and generation
loop that `run` and `chat` use, alternating per prompt (a rotating order) so
machine noise spreads over all modes. Speed is decode tokens per second, from
the first token to the last (prefill excluded, as for every peer), and each
speculative run is compared with plain decoding of the same prompt in the
same round. llama-cpp-python's own prompt-lookup drafting runs as a peer row.

No I/O here: workloads come from `specrun.workloads`, progress and notices go
to callbacks, and the CLI draws the table.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from specrun.errors import UsageError
from specrun.generate import Generation, GenerationConfig
from specrun.sampling import SamplingConfig
from specrun.session import Session
from specrun.speculate.factory import SpecConfig
from specrun.peers import LlamaCppPythonPeer
from specrun.workloads import Prompt

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
    Mode("tree-seq", "specrun tree, no overlap", SpecConfig("tree", overlap="off"), needs_draft=True),
    Mode("lcp-lookup", "llama-cpp-python lookup", None),
    Mode("lcp-plain", "llama-cpp-python plain", None),
)}
DEFAULT_MODES = ("plain", "auto", "ngram", "chain", "tree", "lcp-lookup")


def parse_modes(text: str, have_draft: bool, notice: Callable[[str], None]) -> list[Mode]:
    """Comma-separated mode keys (plain always included, first). Draft-model modes are dropped
    with a notice when no draft is available, unless asked for by name."""
    keys = [k.strip() for k in text.split(",") if k.strip()] if text else list(DEFAULT_MODES)
    unknown = [k for k in keys if k not in MODES]
    if unknown:
        raise UsageError(f"unknown mode '{unknown[0]}'", hint=f"use some of: {', '.join(MODES)}")
    modes = [MODES["plain"]] + [MODES[k] for k in dict.fromkeys(keys) if k != "plain"]
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


class Bench:
    """Runs `modes` over `prompts` on a session; results in `self.results`."""

    def __init__(self, session: Session, modes: list[Mode], config: BenchConfig,
                 peers: dict[str, LlamaCppPythonPeer], template: Any = None) -> None:
        self.session, self.modes, self.config, self.peers, self.template = session, modes, config, peers, template
        self.results: list[RunResult] = []

    def prompt_tokens(self, prompt: Prompt) -> list[int]:
        target = self.session.target.vocab
        if prompt.text is not None:
            return target.tokenize(prompt.text)
        if self.template is None:
            raise UsageError(f"prompt {prompt.id} is a conversation, and the model has no chat template")
        assert prompt.messages is not None
        return target.tokenize(self.template.render(prompt.messages), add_special=False)

    def run(self, prompts: list[Prompt], on_run: Callable[[str, str], None] = lambda p, m: None) -> None:
        """Every mode on every prompt, `repeats` rounds; `on_run(prompt id, mode label)` after each."""
        k = 0
        for rnd in range(self.config.repeats):
            for prompt in prompts:
                tokens = self.prompt_tokens(prompt)
                order = self.modes[k % len(self.modes):] + self.modes[:k % len(self.modes)]
                k += 1
                done = {}
                for mode in order:
                    done[mode.key] = self._run_one(mode, prompt.id, rnd, tokens)
                    on_run(prompt.id, mode.label)
                self._compare(done, tokens)
                self.results += [done[m.key] for m in self.modes]

    def _run_one(self, mode: Mode, prompt_id: str, rnd: int, tokens: list[int]) -> RunResult:
        cfg = self.config
        if mode.spec is None:
            peer, target = self.peers[mode.key], self.session.target
            tokens_out: list[int] = []

            def peer_tokens() -> Iterator[int]:
                for tok in peer.generate(tokens, cfg.max_tokens, cfg.sampling, target.vocab.is_eog):
                    tokens_out.append(tok)
                    yield tok

            rate, n = _timed(peer_tokens())
            return RunResult(prompt_id, rnd, mode.key, rate, n, _detok(self.session, tokens_out), tokens_out)
        self.session.forget()  # every mode pays the same prefill
        speculator = self.session.speculator(mode.spec)
        overlap = self.session.overlaps(mode.spec)
        gen = Generation(self.session.target, tokens, GenerationConfig(cfg.max_tokens, cfg.sampling, overlap),
                         speculator)
        accepted_lengths, tree_sizes, depths = [], [], []
        for step in gen:
            if step.target_calls:
                accepted_lengths.append(step.accepted)
                tree_sizes.append(step.drafted + 1)
                depths.append(step.depth)
        s = gen.stats
        self.session.save()
        # As the peers' rate, from the first token (the prefill's) to the last. Not from the first
        # piece printed: a speculative first step comes out with the prefill's token, so a short
        # answer drafted whole in one step would be timed over its last few tokens alone.
        return RunResult(
            prompt_id, rnd, mode.key, s.tokens_per_s, s.generated_tokens, gen.text, list(gen.tokens),
            target_calls=s.target_calls, drafted=s.drafted_tokens, accepted=s.accepted_tokens, draft_s=s.draft_s,
            verify_s=s.verify_s, accepted_lengths=accepted_lengths, tree_sizes=tree_sizes,
            tokens_per_call=s.tokens_per_call, depths=depths, bytes_per_pass=s.bytes_per_pass,
            read_s_per_pass=s.stream_busy_s / s.streamed_passes if s.streamed_passes else 0.0,
            overlap=overlap, parallel_s=s.parallel_s, prepared_used=s.prepared_used,
            prepared_dropped=s.prepared_dropped)

    def _compare(self, done: dict[str, RunResult], prompt: list[int]) -> None:
        """Speed-up over plain, and where the output differs from plain's, the first differing
        token and the target's top-2 logit margin after plain's prefix there."""
        plain = done["plain"]
        assert plain.tokens is not None
        for r in done.values():
            r.speedup = r.tokens_per_s / plain.tokens_per_s if plain.tokens_per_s > 0 else 0.0
            if r is plain:
                continue
            at = self._first_difference(plain.tokens, r)
            if at is not None:
                r.differs_at = at
                r.top2_margin = self._margin(prompt + plain.tokens[:at])

    @staticmethod
    def _first_difference(plain: list[int], r: RunResult) -> int | None:
        assert r.tokens is not None
        if r.tokens == plain:
            return None
        return next((i for i, (a, b) in enumerate(zip(plain, r.tokens)) if a != b), min(len(plain), len(r.tokens)))

    def _margin(self, context: list[int]) -> float:
        self.session.forget()
        logits = self.session.target.eval(context).row(0)  # [n_vocab]
        top2 = np.sort(logits)[-2:]
        return float(top2[1] - top2[0])


def _detok(session: Session, tokens: list[int]) -> str:
    return b"".join(session.target.vocab.piece(t) for t in tokens).decode("utf-8", "replace")


# --- summary -----------------------------------------------------------------------

@dataclass(frozen=True)
class ModeSummary:
    mode: str
    label: str
    runs: int
    tokens_per_s: float  # median
    tokens_per_s_min: float
    tokens_per_s_max: float
    speedup: float  # median of per-prompt ratios
    speedup_min: float
    speedup_max: float
    tokens_per_call: float | None  # mean over runs
    draft_share: float | None  # drafting time / (drafting + verifying)
    mean_tree: float | None  # nodes verified per target call
    max_tree: int | None  # the most nodes verified in one call
    mean_depth: float | None  # verified tree depth per target call
    pass_s: float | None  # a verify pass (and its walk), mean over calls
    bytes_per_pass: float  # offloaded targets: weight bytes streamed per pass (0: resident)
    read_s_per_pass: float  # time reads were in flight per pass
    parallel_s_per_pass: float | None  # overlap: drafting during a target pass, prefills too (None: no overlap)
    prepared_share: float | None  # overlap: prepared trees the target's outcome matched
    identical: int  # runs whose output equals plain's
    differences: list[dict[str, Any]]  # prompt, round, token index, margin
    accepted_histogram: dict[int, int]  # accepted drafted tokens per call -> calls


def summarize(results: list[RunResult], modes: list[Mode]) -> list[ModeSummary]:
    out = []
    for mode in modes:
        rs = [r for r in results if r.mode == mode.key]
        tps = [r.tokens_per_s for r in rs]
        sp = [r.speedup for r in rs]
        spec = mode.spec is not None and mode.spec.mode != "none"
        calls = [r.tokens_per_call for r in rs if r.tokens_per_call is not None]
        draft = sum(r.draft_s or 0 for r in rs)
        verify = sum(r.verify_s or 0 for r in rs)
        trees = [n for r in rs for n in r.tree_sizes]
        depths = [d for r in rs for d in r.depths]
        passes = sum(len(r.tree_sizes) for r in rs)
        hist: dict[int, int] = {}
        for r in rs:
            for a in r.accepted_lengths:
                hist[a] = hist.get(a, 0) + 1
        out.append(ModeSummary(
            mode.key, mode.label, len(rs),
            tokens_per_s=statistics.median(tps), tokens_per_s_min=min(tps), tokens_per_s_max=max(tps),
            speedup=statistics.median(sp), speedup_min=min(sp), speedup_max=max(sp),
            tokens_per_call=statistics.mean(calls) if calls else None,
            draft_share=draft / (draft + verify) if spec and draft + verify > 0 else None,
            mean_tree=statistics.mean(trees) if trees else None,
            max_tree=max(trees) if trees else None,
            mean_depth=statistics.mean(depths) if depths else None,
            pass_s=verify / passes if passes and mode.spec is not None else None,
            bytes_per_pass=statistics.mean(r.bytes_per_pass for r in rs),
            read_s_per_pass=statistics.mean(r.read_s_per_pass for r in rs),
            # every run's prefill is a pass the draft works during too (it prefills the prompt)
            parallel_s_per_pass=(sum(r.parallel_s for r in rs) / (passes + len(rs))
                                 if passes and any(r.overlap for r in rs) else None),
            prepared_share=_share(sum(r.prepared_used for r in rs), sum(r.prepared_dropped for r in rs)),
            identical=sum(r.differs_at is None for r in rs),
            differences=[{"prompt": r.prompt_id, "round": r.round, "token": r.differs_at,
                          "top2_margin": r.top2_margin} for r in rs if r.differs_at is not None],
            accepted_histogram=dict(sorted(hist.items())),
        ))
    return out


def _share(used: int, dropped: int) -> float | None:
    return used / (used + dropped) if used + dropped else None


def planner_explanation(session: Session, summaries: list[ModeSummary]) -> list[str]:
    """Why the planner verified what it did: the measured cost curve, the acceptance it
    learnt, and the tree sizes it chose per mode."""
    cal = session.calibrated()
    cost = cal.cost
    lines = ["a target pass over n tokens costs " + ", ".join(
        f"{n}: {cost.cost(n) / cost.cost(1):.2f}x" for n in (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
        if n <= cost.max_size)
        + f" the time of 1 token ({cost.cost(1) * 1000:.0f} ms) on this machine"]
    rates = []
    for name, stats in sorted(cal.stats.items()):
        accepted = sum(c[0] for c in stats.counts.values())
        tested = sum(c[1] for c in stats.counts.values())
        if tested:
            rates.append(f"{'prompt lookup' if name == 'ngram' else 'draft model'} {accepted / tested:.0%} "
                         f"of {tested}")
    if rates:
        lines.append("drafted nodes accepted so far: " + ", ".join(rates))
    for name, step in sorted(cal.steps.items()):
        if step.steps:
            free = f" beyond the {step.free:.1f} found during the previous pass" if step.free >= 0.05 else ""
            lines.append(f"{name}: drafting costs {step.per_node * 1000:.1f} ms a verified node{free}, less "
                         f"{step.hidden * 1000:.0f} ms a step hidden behind the target (learnt over {step.steps} steps)")
    draft = session.config.draft
    model_rate = cal.speeds[draft.name].rate if draft and draft.name in cal.speeds else None
    if model_rate:
        plain = 1.0 / cost.cost(1)
        verdict = "pays" if model_rate > plain else "does not pay: auto keeps to prompt lookup"
        lines.append(f"the draft model's measured rate {model_rate:.1f} tok/s against plain {plain:.1f} tok/s: "
                     f"it {verdict}")
    for s in summaries:
        if s.mean_tree is not None and s.mode != "plain":
            lines.append(f"{s.mode}: verified {s.mean_tree:.2f} nodes per target call on average (at most "
                         f"{s.max_tree}), trees {s.mean_depth:.1f} deep, {s.tokens_per_call or 0:.2f} tokens per call")
    lines += [f"{s.mode}: the draft worked {s.parallel_s_per_pass:.3f} s during each target pass; "
              + (f"{s.prepared_share:.0%} of the trees it prepared were used" if s.prepared_share is not None
                 else "no prepared tree was verified") for s in summaries if s.parallel_s_per_pass is not None]
    lines += streaming_explanation(session, summaries)
    return lines


def streaming_explanation(session: Session, summaries: list[ModeSummary]) -> list[str]:
    """For an offloaded target: bytes per pass, and a pass's time against what reading those
    bytes alone takes at the disk's (or link's) throughput, measured now with no compute."""
    plain = next((s for s in summaries if s.mode == "plain"), None)
    if plain is None or not plain.bytes_per_pass or not plain.pass_s:
        return []
    lines = [f"streamed {plain.bytes_per_pass / 1e6:.0f} MB of weights per pass; reads in flight "
             f"{plain.read_s_per_pass:.3f} s per plain pass"]
    if link := session.target.measure_link():
        limit = plain.bytes_per_pass / link
        lines.append(f"reading them alone takes {limit:.3f} s ({link / 1e9:.2f} GB/s, measured now with no compute); "
                     f"a plain pass took {plain.pass_s:.3f} s, {plain.pass_s / limit:.2f}x that limit")
    return lines + [f"{s.mode}: a pass over {s.mean_tree:.0f} nodes took {s.pass_s:.3f} s ({s.pass_s / plain.pass_s:.2f}x "
                    "a plain pass)" for s in summaries if s.mode != "plain" and s.pass_s and s.mean_tree]


def to_json(config: BenchConfig, workload: str, model: str, draft: str | None, threads: int | None,
            summaries: list[ModeSummary], results: list[RunResult], planner: list[str]) -> dict[str, Any]:
    return {
        "workload": workload, "model": model, "draft": draft, "threads": threads or os.cpu_count(),
        "max_tokens": config.max_tokens, "repeats": config.repeats,
        "sampling": {"temperature": config.sampling.temperature, "top_p": config.sampling.top_p,
                     "seed": config.sampling.seed},
        "planner": planner,
        "modes": [s.__dict__ for s in summaries],
        "runs": [{k: v for k, v in r.__dict__.items() if k not in ("tokens",)} for r in results],
    }
