"""The generation loop: prompt tokens in, a stream of steps out.

One loop for plain and speculative decoding. Each step feeds the target one
forward pass: the pending token alone (plain), or the pending token as the
root of a draft tree (speculative). The target's draws along the tree decide
how many tokens the step commits (speculate/verify.py explains why the output
is unchanged). Every step yields the tokens it committed with their text and
its stats, so `run`, `chat` and `bench` all consume the same contract. The
engine does the forward passes in a cache the caller hands over (which
remembers what it holds, so a conversation's next turn evaluates only its new
tokens); the speculator proposes trees; this module only decides what to feed
and when to stop.
"""

from __future__ import annotations

import codecs
import time
from dataclasses import dataclass, field, fields, replace
from typing import Callable, Iterator, Mapping

from specrun.engines.base import Cache, Engine, Logits, Transfer, common_prefix
from specrun.errors import UsageError
from specrun.sampling import SamplingConfig, sample
from specrun.speculate.allowance import Allowance
from specrun.speculate.base import Proposal, Speculator
from specrun.speculate.merge import counts
from specrun.speculate.planned import Candidates
from specrun.speculate.tree import DraftTree
from specrun.speculate.verify import Draw, walk


# A streamed target's readers fill its buffers whenever the pass in hand leaves them room: while
# the CPU drafts, and while a larger pass computes. A pass after an idle gap longer than this
# share of it, or after a larger pass, found its first layers read ahead (on disk a token's
# pass took 0.18-0.21 s after either, 0.30-0.34 s back to back). It says what came before it
# was worth, not what a pass costs in a run of them, so the cost curve does not learn from it.
READ_AHEAD_GAP = 0.1


class PassHistory:
    """A target's previous pass (when it ended, over how many tokens): whether a streamed pass's
    time is what such passes cost back to back, and so worth learning (see READ_AHEAD_GAP)."""

    def __init__(self, engine: Engine) -> None:
        self.streamed = engine.transfer() is not None
        self.ended, self.tokens = 0.0, 0

    def passed(self, tokens: int, ended: float) -> None:
        self.ended, self.tokens = ended, tokens

    def back_to_back(self, tokens: int, started: float, seconds: float) -> bool:
        """Whether a pass over `tokens`, begun at `started` and `seconds` long, found nothing
        read ahead: no idle gap over READ_AHEAD_GAP of it, no larger pass, before it."""
        return not self.streamed or (started - self.ended <= READ_AHEAD_GAP * seconds and self.tokens <= tokens)


@dataclass(frozen=True)
class GenerationConfig:
    max_tokens: int = 256
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    overlap: bool = False  # the speculator prepares the next tree while the target verifies this one
    allowance: bool = True  # trees only as far as the generation can afford to lose (speculate/allowance.py)


@dataclass(frozen=True)
class SourceCount:
    """What one drafter did: nodes it proposed (candidates), of them verified, and accepted.
    Two drafters proposing one node both count it."""

    proposed: int = 0
    verified: int = 0
    accepted: int = 0

    def __add__(self, other: "SourceCount") -> "SourceCount":
        return SourceCount(self.proposed + other.proposed, self.verified + other.verified,
                           self.accepted + other.accepted)


@dataclass(frozen=True)
class Step:
    """What one target forward pass committed: the tokens it accepted and drew. The first step
    (target_calls 0) is the prefill's token, shown before any decoding pass."""

    tokens: list[int]
    text: str = ""  # their text; '' while a UTF-8 character is still incomplete
    target_calls: int = 1  # target forward passes in this step: 1, or 0 when nothing needed one
    drafted: int = 0  # draft nodes verified in this pass
    accepted: int = 0  # of which accepted
    draft_s: float = 0.0  # time spent drafting
    verify_s: float = 0.0  # time in the target's forward pass and the walk
    wall_s: float = 0.0  # the whole step, as a clock on the wall sees it (drafting may overlap verifying)
    depth: int = 0  # the verified tree's depth (0: plain decoding)
    parallel_s: float = 0.0  # drafting done while the target verified (inside verify_s)
    reused: bool | None = None  # the tree grew from work prepared during the last pass (None: none was)
    sources: Mapping[str, SourceCount] = field(default_factory=dict)  # per drafter: what it did this step


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens already in the KV cache (a conversation's earlier turns)
    generated_tokens: int = 0
    target_calls: int = 0  # target forward passes, the prefill included
    drafted_tokens: int = 0
    depth_sum: int = 0  # verified trees' depths, summed over decode passes
    accepted_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    parallel_s: float = 0.0  # drafting done during target passes (overlap)
    prepared_used: int = 0  # trees grown from what was prepared during the previous pass
    prepared_dropped: int = 0  # prepared trees the target's outcome missed
    eos_tokens: int = 0  # end-of-generation tokens drawn (produced by a call, not output)
    streamed_passes: int = 0  # offloaded targets: passes that streamed weights, the prefill's included
    streamed_bytes: int = 0  # weight bytes read (or copied) in them
    stream_wait_s: float = 0.0  # time they waited for weights
    stream_busy_s: float = 0.0  # wall time with a read or copy in flight
    stop_reason: str = ""  # "eos", "length", "context" or "interrupted"
    generations: int = 0  # generations counted here: 1, or a chat's replies summed
    sources: dict[str, SourceCount] = field(default_factory=dict)  # per drafter, summed over the steps

    def add(self, other: "GenerationStats") -> None:
        """Accumulate another generation's counts and times (a chat session's totals)."""
        for f in fields(self):
            if f.name not in ("stop_reason", "sources"):
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        self.count(other.sources)

    def count(self, sources: Mapping[str, SourceCount]) -> None:
        for name, c in sources.items():
            self.sources[name] = self.sources.get(name, SourceCount()) + c

    @property
    def decoded_tokens(self) -> int:
        """Tokens the passes after each prefill produced (an end-of-generation token counts): the
        prefill draws the first token, and its time is the prefill's, not decoding's."""
        return max(self.generated_tokens + self.eos_tokens - self.generations, 0)

    @property
    def tokens_per_s(self) -> float:
        """Decoding's rate, as llama.cpp gives its eval rate: the tokens after the first over the
        time from the first to the last (bench times the peers so as well)."""
        return self.decoded_tokens / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def wall_s_per_token(self) -> float | None:
        return self.decode_s / self.decoded_tokens if self.decoded_tokens else None

    @property
    def tree_shape(self) -> tuple[float, float]:
        """(nodes, depth) of the trees verified per decode pass, on average (1, 0: plain decoding)."""
        calls = self.target_calls - 1  # the prefill's pass verified no tree
        if calls <= 0:
            return 1.0, 0.0
        return 1 + self.drafted_tokens / calls, self.depth_sum / calls

    @property
    def prepared_share(self) -> float | None:
        """The share of prepared trees that were used (None: nothing was prepared)."""
        total = self.prepared_used + self.prepared_dropped
        return self.prepared_used / total if total else None

    @property
    def bytes_per_pass(self) -> float:
        return self.streamed_bytes / self.streamed_passes if self.streamed_passes else 0.0

    @property
    def link_bps(self) -> float:
        """Bytes per second while reads were in flight: what the disk (or link) delivered."""
        return self.streamed_bytes / self.stream_busy_s if self.stream_busy_s > 0 else 0.0

    @property
    def tokens_per_call(self) -> float:
        """Mean tokens produced per target call (1.0 for plain decoding); an end-of-generation
        token counts, since a call produced it."""
        produced = self.generated_tokens + self.eos_tokens
        return produced / self.target_calls if self.target_calls else 0.0


def source_counts(proposal: Proposal, path: list[int]) -> dict[str, SourceCount]:
    """Per drafter: what it proposed for this step, verified of it, and accepted."""
    found = counts(proposal.keys, path) if len(proposal.keys) == len(proposal.tree) else {}
    return {name: SourceCount(proposal.proposed.get(name, 0), *found.get(name, (0, 0)))
            for name in {*proposal.proposed, *found}}


def check_prompt(prompt: list[int], n_ctx: int) -> None:
    """UsageError unless the prompt has tokens and leaves room in the context to generate."""
    if not prompt:
        raise UsageError("the prompt is empty", hint="pass a prompt as an argument or on stdin")
    if len(prompt) >= n_ctx:
        raise UsageError(f"the prompt is {len(prompt)} tokens; the context holds {n_ctx}",
                         hint="shorten the prompt or raise --ctx")


def drawer(sampling: SamplingConfig) -> Draw:
    """How the loop draws a token from a row of logits: argmax where the engine keeps the
    logits when greedy, else the sampler on the row, from one random stream per generation."""
    if sampling.greedy:
        return lambda logits, i: logits.argmax(i)
    rng = sampling.rng()
    return lambda logits, i: sample(logits.row(i), sampling, rng)


@dataclass(frozen=True)
class Plan:
    """One step's tree, before its pass: what was proposed and when (`Generation.plan`)."""

    tree: DraftTree
    proposal: Proposal | None
    t_step: float  # the step began
    t_draft: float  # drafting ended


class Generation:
    """Iterate to generate; read `stats` (filled as it goes) and `text` afterwards.

    `cache` (one of the engine's) is brought to the prompt first, keeping what it already
    holds of it (an earlier turn of a conversation), so a chat re-evaluates only its new tokens.
    `clock` times the steps (tests pass a fake one)."""

    def __init__(self, engine: Engine, cache: Cache, prompt: list[int], config: GenerationConfig,
                 speculator: Speculator | None = None, *, clock: Callable[[], float] = time.perf_counter) -> None:
        check_prompt(prompt, cache.n_ctx)
        self.engine, self.cache, self.prompt, self.config, self.speculator = engine, cache, prompt, config, speculator
        self.clock = clock
        self.stats = GenerationStats(prompt_tokens=len(prompt), generations=1)
        self.tokens: list[int] = []
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text: list[str] = []
        self.done: str | None = None  # why generation stopped, once it has
        self._pending = -1  # the token drawn last, not yet evaluated
        self._transfer_start: Transfer | None = None
        self._draw: Draw = drawer(config.sampling)
        self._t_candidates = 0.0  # when `candidates` began the step a batch plans
        self._history = PassHistory(engine)  # the pass before this step's: the prefill's, or a step's
        self._allowance = Allowance() if config.allowance else None  # what its plans may risk

    @property
    def text(self) -> str:
        return "".join(self._text)

    def __iter__(self) -> Iterator[Step]:
        yield from self.start()
        while (plan := self.plan()) is not None:
            yield self.finish(plan, *self._verify(plan))
        yield from self.end()

    # A step in three parts, so that a batch (batched.py) can verify several sequences' plans in
    # one target pass: plan() proposes the tree, a pass evaluates it, finish() walks and commits.

    def start(self) -> Iterator[Step]:
        """The prefill: the prompt into the cache, and the first token drawn (shown at once)."""
        engine, cache, cfg, stats = self.engine, self.cache, self.config, self.stats
        t0 = self.clock()
        self.prefill_request()
        if cfg.overlap and self.speculator is not None:  # the draft's prefill during the target's
            job = engine.submit_sync(cache, self.prompt)
            stats.parallel_s += self.speculator.warm(self.prompt)
            prefilled = job.result()
        else:
            prefilled = engine.sync(cache, self.prompt)
        yield from self.prefilled(prefilled, self.clock() - t0)

    def prefill_request(self) -> tuple[Cache, list[int]]:
        """What the prefill evaluates: (cache, prompt). A batch prefills its joining sequences
        together (`Engine.sync_many`) and hands each its row (`prefilled`)."""
        stats = self.stats
        stats.stop_reason = "interrupted"  # until the loop ends by itself
        self._transfer_start = self.engine.transfer()
        stats.reused_tokens = min(common_prefix(self.cache.tokens, self.prompt), len(self.prompt) - 1)
        return self.cache, self.prompt

    def prefilled(self, logits: Logits, seconds: float) -> Iterator[Step]:
        """The prefill's row is in: the first token drawn from it (shown at once)."""
        stats = self.stats
        self._pending = self._draw(logits, 0)
        self._history.passed(len(self.prompt) - stats.reused_tokens, self.clock())  # the tokens it evaluated
        stats.prefill_s = seconds
        stats.target_calls = 1  # the prefill drew the first token
        committed, self.done = self._commit([self._pending])
        if committed:  # shown now, not after the next pass
            yield self._shown(Step(committed, target_calls=0))

    def _room(self, max_nodes: int | None) -> tuple[int, int] | None:
        """(deepest node, most nodes) the next tree may have below and with its root: room in the
        cache (a node per cell) and in the token budget; None once generation has stopped."""
        cache = self.cache
        if self.done is None and cache.kv_len + 1 > cache.n_ctx:
            self.done = "context"  # no room left to evaluate the pending token
        if self.done is not None:
            return None
        cells = cache.n_ctx - cache.kv_len
        return (min(cells - 1, self.config.max_tokens - self.stats.generated_tokens),
                min(cells, self.engine.max_tree_nodes, cells if max_nodes is None else max_nodes))

    def plan(self, max_nodes: int | None = None) -> Plan | None:
        """The next pass's tree (the pending token alone, or a draft rooted at it, of at most
        `max_nodes` nodes); None once generation has stopped (`done` says why)."""
        t_step = self.clock()
        if (room := self._room(max_nodes)) is None:
            return None
        max_depth, max_nodes = room
        proposal = None
        if self.speculator is not None and max_depth > 0 and max_nodes > 1:
            proposal = self.speculator.propose(self.prompt + self.tokens, max_depth, max_nodes, self._allowance)
        return self._planned(proposal, t_step)

    def candidates(self, max_nodes: int) -> Candidates | None:
        """The speculator's uncut candidates for the next pass, where it offers them (a batch
        plans them together with the other sequences', then calls `plan_of`); None where it
        plans alone, drafts nothing, or generation has stopped (`plan` then says which)."""
        self._t_candidates = self.clock()
        room = self._room(max_nodes)
        make = getattr(self.speculator, "candidates", None)
        if room is None or make is None or room[0] <= 0 or room[1] <= 1:
            return None
        return make(self.prompt + self.tokens, *room)

    def plan_of(self, candidates: Candidates, keep: list[int]) -> Plan:
        """The plan of the candidates' nodes `keep` (root first, connected)."""
        return self._planned(self.speculator.proposal(candidates, keep), self._t_candidates)  # type: ignore[union-attr]

    def _planned(self, proposal: Proposal | None, t_step: float) -> Plan:
        tree = DraftTree.rooted(self._pending) if proposal is None else proposal.tree
        if tree.tokens[0] != self._pending:  # verifying another root would change the output
            name = self.speculator.name if self.speculator is not None else "?"
            raise RuntimeError(f"{name} proposed a tree rooted at {tree.tokens[0]}, not at the pending token "
                               f"{self._pending}")
        return Plan(tree, proposal, t_step, self.clock())

    def _verify(self, plan: Plan) -> tuple[Logits, float]:
        """This sequence's own pass over the plan's tree: (logits, drafting done meanwhile)."""
        engine, cache, tree, proposal = self.engine, self.cache, plan.tree, plan.proposal
        if len(tree) == 1:
            return engine.eval(cache, [self._pending]), 0.0  # [1, vocab]
        if self.config.overlap and self.speculator is not None and proposal is not None:
            job = engine.submit_tree(cache, tree.tokens, tree.parents, tree.depths)
            parallel = self.speculator.prepare(proposal, job.done)  # the draft works while the target does
            return job.result(), parallel  # [n, vocab]
        return engine.eval_tree(cache, tree.tokens, tree.parents, tree.depths), 0.0  # [n, vocab]

    def finish(self, plan: Plan, logits: Logits, parallel: float = 0.0, shared: bool = False) -> Step:
        """Walk the plan's tree with the pass's logits, keep the accepted path in the cache, and
        count the step. `shared`: the pass verified other sequences too (its time is theirs as
        well, so the speculator learns no cost from it)."""
        engine, cache, stats, tree, proposal = self.engine, self.cache, self.stats, plan.tree, plan.proposal
        path, self._pending = walk(tree, logits, self._draw)
        if len(tree) > 1 or shared:
            engine.commit_path(cache, path)
        t_end = self.clock()
        if self.speculator is not None and proposal is not None:  # also for a root-only plan: a draft
            alone = not shared and (len(tree) == 1 or not self.config.overlap)  # model must drop its draft
            pass_s = t_end - plan.t_draft
            alone = alone and self._history.back_to_back(len(tree), plan.t_draft, pass_s)
            self.speculator.observe(proposal, path, None if shared else t_end - plan.t_step,
                                    pass_s if alone else None, logits)
        self._history.passed(len(tree), t_end)
        accepted = [tree.tokens[i] for i in path[1:]]
        committed, self.done = self._commit(accepted + [self._pending])  # the pass's own token too: shown now
        stats.target_calls += 1
        stats.drafted_tokens += len(tree) - 1
        stats.depth_sum += max(tree.depths)
        stats.accepted_tokens += len(accepted)
        stats.draft_s += plan.t_draft - plan.t_step
        stats.verify_s += t_end - plan.t_draft
        stats.parallel_s += parallel
        stats.prepared_used += proposal is not None and proposal.reused is True
        stats.prepared_dropped += proposal is not None and proposal.reused is False
        sources = source_counts(proposal, path) if proposal is not None else {}
        stats.count(sources)
        wall = self.clock() - plan.t_step
        stats.decode_s += wall
        if self._allowance is not None and not shared:
            self._allowance.step(len(path), wall, len(tree) > 1)
        self._count_transfer(self._transfer_start)
        return self._shown(Step(committed, target_calls=1, drafted=len(tree) - 1, accepted=len(accepted),
                                draft_s=plan.t_draft - plan.t_step, verify_s=t_end - plan.t_draft, wall_s=wall,
                                depth=max(tree.depths), parallel_s=parallel,
                                reused=proposal.reused if proposal is not None else None, sources=sources))

    def end(self) -> Iterator[Step]:
        """Record why generation stopped, and show the end of an incomplete UTF-8 character."""
        self.stats.stop_reason = self.done or "interrupted"
        tail = self._decoder.decode(b"", final=True)
        if tail:
            self._text.append(tail)
            yield Step([], tail, target_calls=0)

    def _count_transfer(self, start: Transfer | None) -> None:
        """The weights streamed since the generation began (offloaded targets)."""
        now = self.engine.transfer()
        if now is None or start is None:
            return
        done = now.minus(start)
        s = self.stats
        s.streamed_passes, s.streamed_bytes, s.stream_wait_s, s.stream_busy_s = (
            done.passes, done.bytes, done.wait_s, done.busy_s)

    def _commit(self, tokens: list[int]) -> tuple[list[int], str | None]:
        """Append tokens to the output until a stop condition; (appended, stop reason or None)."""
        out: list[int] = []
        for tok in tokens:
            if self.engine.vocab.is_eog(tok):
                self.stats.eos_tokens += 1
                return out, "eos"
            out.append(tok)
            self.tokens.append(tok)
            self.stats.generated_tokens += 1
            if self.stats.generated_tokens >= self.config.max_tokens:
                return out, "length"
        return out, None

    def _shown(self, step: Step) -> Step:
        """The step with its tokens' text: what they complete of the UTF-8 output so far."""
        text = self._decoder.decode(b"".join(self.engine.vocab.piece(t) for t in step.tokens))
        self._text.append(text)
        return replace(step, text=text)
