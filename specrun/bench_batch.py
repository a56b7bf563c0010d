"""`bench --batch N`: the workload's prompts N at a time, sharing every target pass, beside the
single-sequence rows.

Each batched mode runs the prompts in groups of N through `BatchGeneration` on the
bench's session (its cache and N - 1 more), drafting as `run --batch` does: auto's
draft model, where the session loaded it, for all of a pass's sequences at once.
What it reports: the aggregate decoding rate (tokens after each prefill's, over the
wall time of the shared passes), how it compares with single-sequence plain
decoding and with the same mode alone, the bound the cost curve sets for the
nodes a pass carried, per-sequence latency, and whether each output equals its
single run.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field, replace
from typing import Callable

from specrun.batched import BatchGeneration
from specrun.generate import GenerationConfig
from specrun.sampling import SamplingConfig
from specrun.session import Session
from specrun.speculate.factory import MODEL_MODES, SpecConfig


@dataclass
class BatchRow:
    """One mode's batched runs over the workload."""

    mode: str  # the bench mode it batches (plain, free, ngram)
    batch: int  # sequences sharing a pass, at most
    decoded: int = 0  # tokens after each prefill's, summed over sequences
    decode_s: float = 0.0  # wall time of the shared passes
    passes: int = 0
    nodes: int = 0  # tree nodes verified, over all passes
    latency_s: list[float] = field(default_factory=list)  # per sequence: its group's start to its last token
    outputs: list[list[int]] = field(default_factory=list)  # per prompt, in order
    cost_ratio: float | None = None  # what the cost curve says a pass over nodes_per_pass costs, in one-token passes

    @property
    def tokens_per_s(self) -> float:
        return self.decoded / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def nodes_per_pass(self) -> float:
        return self.nodes / self.passes if self.passes else 0.0

    @property
    def tokens_per_pass(self) -> float:
        return self.decoded / self.passes if self.passes else 0.0


def batch_spec(spec: SpecConfig) -> SpecConfig | None:
    """A mode's speculation as a batch runs it: the draft model (auto's), if any, drafts for every
    sequence together between passes, not during them; None for the modes that are the draft
    model alone (a batch plans over the free drafters' candidates)."""
    if spec.mode in MODEL_MODES:
        return None
    return replace(spec, overlap="off")


def run_batched(session: Session, mode: str, spec: SpecConfig, prompts: list[list[int]], batch: int,
                max_tokens: int, sampling: SamplingConfig,
                on_group: Callable[[int], None] = lambda done: None) -> BatchRow:
    """The prompts `batch` at a time on the session's target, every pass shared by a group."""
    engine, n_ctx = session.target, session.n_ctx
    row = BatchRow(mode, batch)
    for start in range(0, len(prompts), batch):
        group = prompts[start:start + batch]
        gens = [session.sequence(tokens, GenerationConfig(max_tokens, sampling), spec, n_ctx) for tokens in group]
        for g in gens:
            engine.rewind(g.cache, 0)  # every sequence pays its prefill, as the single runs do
        try:
            cost = session.calibration.cost if session.calibration is not None else None
            together = BatchGeneration(engine, gens, max(engine.max_tree_nodes, 1), cost)
            ended: dict[int, float] = {}
            for i, _ in together:
                if together.generations[i].done is not None and i not in ended:
                    ended[i] = together.stats.prefill_s + together.stats.decode_s
            st = together.stats
            row.decode_s += st.decode_s
            row.passes += st.passes
            row.nodes += st.nodes
            row.decoded += sum(g.stats.decoded_tokens for g in gens)
            row.latency_s += [ended.get(i, st.prefill_s + st.decode_s) for i in range(len(gens))]
            row.outputs += [list(g.tokens) for g in gens]
            session.save()
            on_group(start + len(group))
        finally:
            for g in gens:
                session.sequence_ended(g)
    cal = session.calibration
    if cal is not None and row.passes:
        n = max(1, round(row.nodes_per_pass))
        row.cost_ratio = cal.cost.cost(n) / cal.cost.cost(1)
    return row


def batch_lines(rows: list[BatchRow], single: dict[str, tuple[float, list[list[int]]]]) -> list[str]:
    """The report's lines: `single` maps a mode to its single-sequence aggregate rate and outputs."""
    lines = []
    plain_rate = single.get("plain", (0.0, []))[0]
    for r in rows:
        alone_rate, alone_out = single.get(r.mode, (0.0, []))
        parts = [f"batch of {r.batch}, {r.mode}: {r.tokens_per_s:.1f} tok/s over all"]
        if plain_rate > 0:
            parts.append(f"{r.tokens_per_s / plain_rate:.2f}x single-sequence plain ({plain_rate:.1f} tok/s)")
        if r.mode != "plain" and alone_rate > 0:
            parts.append(f"{r.tokens_per_s / alone_rate:.2f}x {r.mode} alone ({alone_rate:.1f} tok/s)")
        shape = f"{r.nodes_per_pass:.1f} nodes and {r.tokens_per_pass:.1f} tokens a pass"
        if r.cost_ratio:
            shape += (f"; the cost curve prices such a pass at {r.cost_ratio:.2f}x a one-token pass: "
                      f"{r.tokens_per_pass / r.cost_ratio:.2f}x a plain pass's tokens per second")
        parts.append(shape)
        if r.latency_s:
            parts.append(f"latency per sequence median {statistics.median(r.latency_s):.1f} s, "
                         f"max {max(r.latency_s):.1f} s")
        reference = single.get("plain", (0.0, []))[1]
        same = f"outputs identical to single plain runs: {_same(r.outputs, reference)}/{len(r.outputs)}"
        if r.mode != "plain" and alone_out:
            same += f" (to {r.mode} alone: {_same(r.outputs, alone_out)}/{len(r.outputs)})"
        parts.append(same)
        lines.append("; ".join(parts))
    return lines


def single_rate(rates_and_tokens: list[tuple[float, int]]) -> float:
    """Aggregate rate of single-sequence runs: their decoded tokens over their summed decode time,
    from (tokens per second, tokens generated) per run (the prefill's token is not decoded)."""
    decoded = [max(n - 1, 0) for _, n in rates_and_tokens]
    seconds = sum(d / rate for d, (rate, _) in zip(decoded, rates_and_tokens) if rate > 0)
    return sum(decoded) / seconds if seconds > 0 else 0.0


def _same(outputs: list[list[int]], reference: list[list[int]]) -> int:
    return sum(a == b for a, b in zip(outputs, reference))
