"""What `specrun bench` reports: a summary per mode, the planner's reasons, and the JSON report."""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass, field
from typing import Any

from specrun.bench import BenchConfig, Mode, RunResult
from specrun.session import Session
from specrun.speculate.auto import HOPEFUL

SOURCE_NAMES = {"ngram": "prompt lookup", "suffix": "suffix index", "recycle": "recycled top-k",
                "model": "draft model"}


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
    failed: int = 0  # runs that could not finish (a worker killed under --memory-limit, ...)
    peak_bytes: int | None = None  # --memory-limit: the most memory its cgroup held, page cache included
    sources: dict[str, list[int]] = field(default_factory=dict)  # per drafter: [proposed, verified, accepted]


def summarize(results: list[RunResult], modes: list[Mode],
              peaks: dict[str, int | None] | None = None) -> list[ModeSummary]:
    out = []
    for mode in modes:
        every = [r for r in results if r.mode == mode.key]
        rs = [r for r in every if not r.failed] or every
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
            failed=sum(r.failed is not None for r in every), peak_bytes=peaks.get(mode.key) if peaks else None,
            sources=_sources(rs),
        ))
    return out


def _sources(results: list[RunResult]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for r in results:
        for name, c in r.sources.items():
            out[name] = [a + b for a, b in zip(out.get(name, [0, 0, 0]), c)]
    return dict(sorted(out.items()))


def _share(used: int, dropped: int) -> float | None:
    return used / (used + dropped) if used + dropped else None


def calibration_lines(session: Session) -> list[str]:
    """Why the planner verified what it did, from what the session measured and learnt: the cost
    curve, the acceptance, what drafting costs a step, and whether the draft model pays."""
    cal = session.calibrated()
    cost = cal.cost
    lines = ["a target pass over n tokens costs " + ", ".join(
        f"{n}: {cost.cost(n) / cost.cost(1):.2f}x" for n in (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
        if n <= cost.max_size)
        + f" the time of 1 token ({cost.cost(1) * 1000:.0f} ms) on this machine"]
    lines += cost.replaced
    rates = []
    for name, stats in sorted(cal.stats.items()):
        accepted = sum(c[0] for c in stats.counts.values())
        tested = sum(c[1] for c in stats.counts.values())
        if tested:
            rates.append(f"{SOURCE_NAMES.get(name, name)} {accepted / tested:.0%} of {tested:.0f}")
    if rates:
        lines.append("drafted nodes accepted lately: " + ", ".join(rates))
    for name, step in sorted(cal.steps.items()):
        if step.steps:
            free = f" beyond the {step.free:.1f} found during the previous pass" if step.free >= 0.05 else ""
            # `hidden` < 0: drafting slowed the target's passes (shared cores); never a negative saving
            hidden = (f"less {step.hidden * 1000:.0f} ms a step hidden behind the target" if step.hidden >= 0.0005
                      else "with nothing hidden behind the target")
            lines.append(f"{name}: drafting costs {step.per_node * 1000:.1f} ms a verified node{free}, {hidden} "
                         f"(learnt over {step.steps} steps)")
    draft = session.config.draft
    model_speed = cal.speeds.get(draft.name) if draft else None
    if session.draft_hopeless:
        lines.append(f"no draft model could pay on this curve, even with {HOPEFUL:.0%} of its levels right: auto "
                     "leaves it unloaded")
    elif model_speed is not None and model_speed.rate:
        plain = 1.0 / cost.cost(1)
        verdict = "pays" if model_speed.pays(plain) else "does not pay: auto keeps to the free drafters"
        lines.append(f"the draft model's measured rate {model_speed.rate:.1f} tok/s, {model_speed.speedup(plain):.2f}x "
                     f"plain decoding measured with it: it {verdict}")
    return lines


def summary_lines(summaries: list[ModeSummary]) -> list[str]:
    """The tree sizes each mode verified, and what overlap prepared."""
    lines = [f"{s.mode}: " + "; ".join(f"{SOURCE_NAMES.get(n, n)} proposed {p}, verified {v}, accepted {a}"
                                       for n, (p, v, a) in s.sources.items())
             for s in summaries if s.sources and s.mode != "plain"]
    lines += [f"{s.mode}: verified {s.mean_tree:.2f} nodes per target call on average (at most "
             f"{s.max_tree}), trees {s.mean_depth:.1f} deep, {s.tokens_per_call or 0:.2f} tokens per call"
             for s in summaries if s.mean_tree is not None and s.mode != "plain"]
    return lines + [f"{s.mode}: the draft worked {s.parallel_s_per_pass:.3f} s during each target pass; "
                    + (f"{s.prepared_share:.0%} of the trees it prepared were used" if s.prepared_share is not None
                       else "no prepared tree was verified") for s in summaries if s.parallel_s_per_pass is not None]


def streaming_lines(link: float | None, summaries: list[ModeSummary]) -> list[str]:
    """For an offloaded target: bytes per pass, and a pass's time against what reading those
    bytes alone takes at the disk's (or link's) throughput `link` (measured with no compute)."""
    plain = next((s for s in summaries if s.mode == "plain"), None)
    if plain is None or not plain.bytes_per_pass or not plain.pass_s:
        return []
    lines = [f"streamed {plain.bytes_per_pass / 1e6:.0f} MB of weights per pass; reads in flight "
             f"{plain.read_s_per_pass:.3f} s per plain pass"]
    if link:
        limit = plain.bytes_per_pass / link
        lines.append(f"reading them alone takes {limit:.3f} s ({link / 1e9:.2f} GB/s, measured now with no compute); "
                     f"a plain pass took {plain.pass_s:.3f} s, {plain.pass_s / limit:.2f}x that limit")
    return lines + [f"{s.mode}: a pass over {s.mean_tree:.0f} nodes took {s.pass_s:.3f} s ({s.pass_s / plain.pass_s:.2f}x "
                    "a plain pass)" for s in summaries if s.mode != "plain" and s.pass_s and s.mean_tree]


def to_json(config: BenchConfig, workload: str, model: str, draft: str | None, threads: int | None,
            summaries: list[ModeSummary], results: list[RunResult], planner: list[str],
            memory_limit: int | None = None) -> dict[str, Any]:
    return {
        "workload": workload, "model": model, "draft": draft, "threads": threads or os.cpu_count(),
        "memory_limit": memory_limit,
        "max_tokens": config.max_tokens, "repeats": config.repeats,
        "sampling": {"temperature": config.sampling.temperature, "top_p": config.sampling.top_p,
                     "seed": config.sampling.seed},
        "planner": planner,
        "modes": [s.__dict__ for s in summaries],
        "runs": [{k: v for k, v in r.__dict__.items() if k != "tokens"} for r in results],
    }
