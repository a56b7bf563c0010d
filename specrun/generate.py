"""The generation loop: prompt tokens in, a stream of steps out.

One loop for plain and speculative decoding. Each step feeds the target one
forward pass: the pending token alone (plain), or the pending token as the
root of a draft tree (speculative). The target's draws along the tree decide
how many tokens the step commits (spec/verify.py explains why the output is
unchanged). Every step yields the tokens it committed with their text and its
stats, so `run`, `chat` and `bench` all consume the same contract. The engine
does the forward passes; the speculator proposes trees; this module only
decides what to feed and when to stop.
"""

from __future__ import annotations

import codecs
import time
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Iterator, Protocol, Sequence

import numpy as np

from specrun.engines.base import Engine, common_prefix
from specrun.errors import UsageError
from specrun.sampling import SamplingConfig, sample
from specrun.spec.tree import DraftTree
from specrun.spec.verify import walk

if TYPE_CHECKING:
    from specrun.spec.planner import AcceptanceStats, CostCurve


@dataclass(frozen=True)
class GenerationConfig:
    max_tokens: int = 256
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


class Speculator(Protocol):
    """Proposes a draft tree rooted at the pending token, and learns from what was accepted."""

    name: str

    def propose(self, context: Sequence[int], max_depth: int) -> DraftTree:
        """context ends with the pending token; the tree's root holds it."""
        ...

    def observe(self, tree: DraftTree, path: list[int], seconds: float) -> None:
        """The target accepted `path` (node indices, root first) of `tree` in `seconds`."""
        ...


@dataclass(frozen=True)
class Step:
    """What one target forward pass committed."""

    tokens: list[int]
    text: str  # their text; '' while a UTF-8 character is still incomplete
    target_calls: int  # target forward passes in this step: 1, or 0 when nothing needed one
    drafted: int  # draft nodes verified in this pass
    accepted: int  # of which accepted
    draft_s: float  # time spent drafting
    verify_s: float  # time in the target's forward pass and the walk


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens already in the KV cache (a conversation's earlier turns)
    generated_tokens: int = 0
    target_calls: int = 0  # target forward passes, the prefill included
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    eos_tokens: int = 0  # end-of-generation tokens drawn (produced by a call, not output)
    stop_reason: str = ""  # "eos", "length", "context" or "interrupted"

    def add(self, other: "GenerationStats") -> None:
        """Accumulate another generation's counts and times (a chat session's totals)."""
        for f in fields(self):
            if f.name != "stop_reason":
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def tokens_per_call(self) -> float:
        """Mean tokens produced per target call (1.0 for plain decoding); an end-of-generation
        token counts, since a call produced it."""
        produced = self.generated_tokens + self.eos_tokens
        return produced / self.target_calls if self.target_calls else 0.0


def check_prompt(prompt: list[int], n_ctx: int) -> None:
    """UsageError unless the prompt has tokens and leaves room in the context to generate."""
    if not prompt:
        raise UsageError("the prompt is empty", hint="pass a prompt as an argument or on stdin")
    if len(prompt) >= n_ctx:
        raise UsageError(f"the prompt is {len(prompt)} tokens; the context holds {n_ctx}",
                         hint="shorten the prompt or raise --ctx")


class Generation:
    """Iterate to generate; read `stats` (filled as it goes) and `text` afterwards."""

    def __init__(self, engine: Engine, prompt: list[int], config: GenerationConfig,
                 speculator: Speculator | None = None, max_depth: int = 0,
                 cached: Sequence[int] = ()) -> None:
        """`cached`: the tokens the engine's KV cache holds now (an earlier generation's
        `kv_tokens`); the prompt's common prefix with them is kept instead of re-evaluated."""
        check_prompt(prompt, engine.n_ctx)
        self.engine, self.prompt, self.config = engine, prompt, config
        self.speculator, self.max_depth = speculator, max_depth
        self.stats = GenerationStats(prompt_tokens=len(prompt))
        self.tokens: list[int] = []
        # The tokens in the engine's KV cache, kept in step with it: what a next turn can reuse.
        self.kv_tokens: list[int] = list(cached[: engine.kv_len])
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self._text)

    def __iter__(self) -> Iterator[Step]:
        engine, cfg, stats = self.engine, self.config, self.stats
        rng = cfg.sampling.rng()

        def draw(logits: np.ndarray) -> int:
            return sample(logits, cfg.sampling, rng)

        stats.stop_reason = "interrupted"  # until the loop ends by itself
        t0 = time.perf_counter()
        keep = min(common_prefix(self.kv_tokens, self.prompt), len(self.prompt) - 1)  # >= 1 token for logits
        engine.rewind(keep)
        del self.kv_tokens[keep:]
        stats.reused_tokens = keep
        pending = draw(engine.eval(self.prompt[keep:]))
        self.kv_tokens += self.prompt[keep:]
        stats.prefill_s = time.perf_counter() - t0
        stats.target_calls = 1  # the prefill drew the first token
        while True:
            t_step = time.perf_counter()
            committed, done = self._commit([pending])
            if done is None and engine.kv_len + 1 > engine.n_ctx:
                done = "context"  # no room left to evaluate the pending token
            if done is not None:  # no forward pass needed, or none possible
                stats.stop_reason = done
                if committed:
                    yield self._step(committed, 0, 0, 0, 0.0, 0.0)
                break
            # Room for the root and the draft below it, in the cache and in the token budget.
            room = min(engine.n_ctx - engine.kv_len - 1, cfg.max_tokens - stats.generated_tokens, self.max_depth)
            tree = DraftTree.rooted(pending)
            proposed = self.speculator is not None and room > 0
            if proposed:
                tree = self.speculator.propose(self.prompt + self.tokens, room)
            t_draft = time.perf_counter()
            if len(tree) == 1:
                logits = engine.eval([pending])[None, :]  # [1, vocab]
            else:
                logits = engine.eval_tree(tree.tokens, tree.parents, tree.depths)  # [n, vocab]
            path, pending = walk(tree, logits, draw)
            if len(tree) > 1:
                engine.commit_path(path)
            self.kv_tokens += [tree.tokens[i] for i in path]
            t_end = time.perf_counter()
            if proposed:  # also for a root-only plan: a draft model must drop its draft
                self.speculator.observe(tree, path, t_end - t_draft)
            accepted = [tree.tokens[i] for i in path[1:]]
            more, done = self._commit(accepted)
            committed += more
            stats.target_calls += 1
            stats.drafted_tokens += len(tree) - 1
            stats.accepted_tokens += len(accepted)
            stats.draft_s += t_draft - t_step
            stats.verify_s += t_end - t_draft
            stats.decode_s += time.perf_counter() - t_step
            yield self._step(committed, 1, len(tree) - 1, len(accepted), t_draft - t_step, t_end - t_draft)
            if done is not None:
                stats.stop_reason = done
                break
        tail = self._decoder.decode(b"", final=True)
        if tail:
            self._text.append(tail)
            yield Step([], tail, 0, 0, 0, 0.0, 0.0)

    def _commit(self, tokens: list[int]) -> tuple[list[int], str | None]:
        """Append tokens to the output until a stop condition; (appended, stop reason or None)."""
        out: list[int] = []
        for tok in tokens:
            if self.engine.is_eog(tok):
                self.stats.eos_tokens += 1
                return out, "eos"
            out.append(tok)
            self.tokens.append(tok)
            self.stats.generated_tokens += 1
            if self.stats.generated_tokens >= self.config.max_tokens:
                return out, "length"
        return out, None

    def _step(self, tokens: list[int], calls: int, drafted: int, accepted: int,
              draft_s: float, verify_s: float) -> Step:
        text = self._decoder.decode(b"".join(self.engine.piece(t) for t in tokens))
        self._text.append(text)
        return Step(tokens, text, calls, drafted, accepted, draft_s, verify_s)


SPEC_MODES = ("auto", "none", "ngram", "chain", "tree")
MODEL_MODES = ("chain", "tree")  # need a draft model
DEFAULT_DEPTH = 16


@dataclass(frozen=True)
class SpecConfig:
    """How to speculate. `budget` None lets the planner size each tree from measured costs;
    in auto mode the planner always decides and `budget` only caps the tree size."""

    mode: str = "auto"  # auto | none | ngram | chain | tree
    budget: int | None = None  # nodes per verified tree, root included
    depth: int | None = None  # deepest draft node; None: DEFAULT_DEPTH

    @property
    def needs_costs(self) -> bool:
        return self.mode == "auto" or (self.mode != "none" and self.budget is None)

    @property
    def max_nodes(self) -> int:
        return self.budget or 32


def make_speculator(spec: SpecConfig, cost: "CostCurve | None", stats: "dict[str, AcceptanceStats]",
                    draft: Engine | None = None,
                    memory: dict[str, float] | None = None) -> tuple[Speculator | None, int]:
    """(speculator, or None for plain decoding; max depth) for `spec`. `stats` gains the
    acceptance statistics the speculator learns, keyed by drafter ("ngram", "model");
    `memory` what auto learns about the draft model's speed. Both persist with the calibration."""
    from specrun.spec.draft_model import ModelDraftConfig, ModelDrafter
    from specrun.spec.ngram import NgramDrafter
    from specrun.spec.planner import AcceptanceStats, AutoSpeculator, PlannedSpeculator

    depth = spec.depth or DEFAULT_DEPTH
    if spec.mode == "none" or spec.budget == 1:
        return None, 0
    if spec.needs_costs and cost is None:
        raise ValueError("planned speculation needs a cost curve")
    plan = cost if spec.needs_costs else None

    def planned(name: str, drafter: object) -> PlannedSpeculator:
        key = "ngram" if name == "ngram" else "model"
        return PlannedSpeculator(name, drafter, plan, stats.setdefault(key, AcceptanceStats()),  # type: ignore[arg-type]
                                 spec.max_nodes)

    lookup = planned("ngram", NgramDrafter())
    if spec.mode == "ngram":
        return lookup, depth
    if spec.mode in MODEL_MODES:
        if draft is None:
            raise UsageError(f"--spec {spec.mode} needs a draft model", hint="pass --draft NAME, or use --spec ngram")
        config = ModelDraftConfig.chain(min(depth, 8)) if spec.mode == "chain" else ModelDraftConfig()
        return planned(spec.mode, ModelDrafter(draft, config)), depth
    model = planned("tree", ModelDrafter(draft)) if draft is not None else None
    assert cost is not None
    return AutoSpeculator(lookup, model, cost, memory), depth
