"""Drafting while the target verifies (`GenerationConfig.overlap`): output, reuse, timing, faults.

The tiny f32 pair checks that overlap changes nothing in the output (greedy and seeded
sampling, against sequential speculation and plain decoding), with the target's passes on
its worker thread; fake latencies on a fake clock check what overlap is for: a step costs
about the longer of drafting and verifying, not their sum. On the fake clock a submitted
pass is evaluated at once and counts as running until the clock reaches its end, while the
draft's calls move the clock: two cores working side by side, timed exactly however busy
the machine running the tests is.
"""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import pytest

from specrun.engines.base import Cache, EngineMixin, Logits, Transfer, common_prefix
from specrun.engines.llamacpp import LlamaCppConfig, LlamaCppEngine
from specrun.errors import EngineError
from specrun.generate import Generation, GenerationConfig
from specrun.sampling import SamplingConfig
from specrun.speculate.draft_model import DraftModel, ModelDraftConfig, ModelDrafter
from specrun.speculate.factory import SpecConfig, make_speculator
from specrun.speculate.planned import PlannedSpeculator, Source
from specrun.speculate.acceptance import AcceptanceStats
from specrun.speculate.planner import CostCurve
from tests.clocks import FakeClock
from tests.test_speculate_generate import two_sample_chi_square

GREEDY = SamplingConfig(temperature=0)
FLAT = CostCurve((1, 64), (1.0, 1.05))  # an offloaded target: a pass over 64 costs what one does
Clock = Callable[[], float]


class Slow(EngineMixin):
    """An engine with controlled latencies: each pass takes `per_call` plus `per_token` per
    token evaluated, then runs the wrapped engine (in the caches it made); `fail_at` raises
    `fail` from the n-th tree pass. Without `clock` a pass sleeps (releasing the GIL, as
    llama.cpp's and torch's calls do) and submitted passes run on the engine's worker thread;
    with one, the latency passes on the fake clock and a submitted pass is a `_Pass`."""

    def __init__(self, inner: LlamaCppEngine, per_call: float = 0.0, per_token: float = 0.0,
                 fail_at: int | None = None, fail: BaseException | None = None, clock: FakeClock | None = None) -> None:
        self.inner, self.per_call, self.per_token = inner, per_call, per_token
        self.fail_at, self.fail, self.trees, self.clock = fail_at, fail, 0, clock

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _take(self, seconds: float) -> None:
        if self.clock is None:
            time.sleep(seconds)
        else:
            self.clock.advance(seconds)

    def eval(self, cache: Cache, tokens: Sequence[int]):
        self.settle()
        self._take(self.per_call + self.per_token * len(tokens))
        return self.inner.eval(cache, tokens)

    def eval_tree(self, cache: Cache, tokens: Sequence[int], parents: Sequence[int], depths: Sequence[int],
                  start: int = 0):
        self.settle()
        self._take(self.per_call + self.per_token * (len(tokens) - start))
        return self._tree(cache, tokens, parents, depths, start)

    def _tree(self, cache: Cache, tokens: Sequence[int], parents: Sequence[int], depths: Sequence[int],
              start: int) -> Logits:
        self.trees += 1
        logits = self.inner.eval_tree(cache, tokens, parents, depths, start)
        if self.trees == self.fail_at:
            raise self.fail  # after the pass: the engine holds an uncommitted tree, as a real fault leaves it
        return logits

    def submit_tree(self, cache: Cache, tokens: Sequence[int], parents: Sequence[int], depths: Sequence[int],
                    start: int = 0):
        if self.clock is None:
            return super().submit_tree(cache, tokens, parents, depths, start)
        seconds = self.per_call + self.per_token * (len(tokens) - start)
        return _Pass(self.clock, seconds, lambda: self._tree(cache, tokens, parents, depths, start))

    def submit_sync(self, cache: Cache, tokens: Sequence[int]):
        if self.clock is None:
            return super().submit_sync(cache, tokens)
        new = len(tokens) - min(common_prefix(cache.tokens, tokens), len(tokens) - 1)
        return _Pass(self.clock, self.per_call + self.per_token * new, lambda: self.inner.sync(cache, tokens))

    def rewind(self, cache: Cache, n_tokens: int) -> None:
        self.settle()
        self.inner.rewind(cache, n_tokens)

    def commit_path(self, cache: Cache, path: Sequence[int], keep: Sequence[int] = ()) -> None:
        self.settle()
        self.inner.commit_path(cache, path, keep)

    def close(self) -> None:
        self.close_worker()


class _Pass:
    """A target pass submitted on a fake clock, as the generation loop uses a worker's Future:
    evaluated at once, `done` once the clock reaches its end (the draft's calls move it
    meanwhile), and `result` waits for that end (moves the clock there)."""

    def __init__(self, clock: FakeClock, seconds: float, run: Callable[[], Logits]) -> None:
        self.clock, self.end = clock, clock() + seconds
        self._error: BaseException | None = None
        try:
            self._logits = run()
        except BaseException as e:  # raised from result(), as a Future does
            self._error = e

    def done(self) -> bool:
        return self.clock() >= self.end

    def result(self) -> Logits:
        self.clock.advance(max(0.0, self.end - self.clock()))
        if self._error is not None:
            raise self._error
        return self._logits


def slowed(model: DraftModel, **latencies: Any) -> DraftModel:
    """The model's engine behind `Slow`, with the same cache."""
    return DraftModel(Slow(model.engine, **latencies), model.cache)


def generate(target: DraftModel, prompt: str, sampling: SamplingConfig, speculator=None, overlap: bool = False,
             max_tokens: int = 60, clock: Clock = time.perf_counter) -> Generation:
    engine, cache = target.engine, target.cache
    engine.rewind(cache, 0)
    gen = Generation(engine, cache, engine.vocab.tokenize(prompt), GenerationConfig(max_tokens, sampling, overlap),
                     speculator, clock=clock)
    for _ in gen:
        pass
    return gen


def tree_speculator(draft, nodes: int = 24, depth: int = 6, clock: Clock = time.perf_counter) -> PlannedSpeculator:
    return PlannedSpeculator("tree", [Source("model", ModelDrafter(draft, ModelDraftConfig(min_prob=0.0), clock=clock), AcceptanceStats())], None, nodes, depth, clock=clock)


@pytest.mark.parametrize("sampling", [GREEDY, SamplingConfig(temperature=0.8, top_p=0.9, seed=5),
                                      SamplingConfig(temperature=1.0, top_p=1.0, seed=11)])
@pytest.mark.parametrize("which", ["same", "different"])
def test_overlap_gives_the_plain_output(pair, sampling, which) -> None:
    target, same, different = pair
    draft = same if which == "same" else different
    plain = generate(target, "def fib(n):", sampling)
    sequential = generate(target, "def fib(n):", sampling, tree_speculator(draft))
    slow = slowed(target, per_call=0.005)  # a pass long enough for the draft to prepare something
    try:
        overlapped = generate(slow, "def fib(n):", sampling, tree_speculator(draft), overlap=True)
    finally:
        slow.engine.close()
    assert overlapped.tokens == sequential.tokens == plain.tokens
    s = overlapped.stats
    assert s.drafted_tokens > 0 and s.prepared_used + s.prepared_dropped > 0
    if which == "same" and sampling.greedy:
        assert s.prepared_used > 0  # the draft is the target: its guesses come true


@pytest.mark.parametrize("mode", ["tree", "auto"])
def test_planned_modes_with_overlap_give_the_plain_output(pair, mode) -> None:
    target, same, different = pair
    for draft in (same, different):
        for sampling in (GREEDY, SamplingConfig(temperature=0.7, top_p=0.95, seed=3)):
            plain = generate(target, "hello world", sampling)
            spec = generate(target, "hello world", sampling, make_speculator(SpecConfig(mode), FLAT, {}, draft),
                            overlap=True)
            assert spec.tokens == plain.tokens


def chain_speculator(draft, depth: int = 4, clock: Clock = time.perf_counter) -> PlannedSpeculator:
    return PlannedSpeculator("chain", [Source("model", ModelDrafter(draft, ModelDraftConfig.chain(depth), clock=clock), AcceptanceStats())], None, depth + 2, depth + 2, clock=clock)


def test_a_step_costs_the_longer_of_drafting_and_verifying(pair) -> None:
    """An 80 ms target pass and 10 ms draft calls, with a draft that is the target (its guesses
    come true): sequentially a step drafts 5 calls, then verifies; overlapped, the calls for
    the next tree happen during the pass, so a step costs about the pass."""
    target, same, _ = pair
    clock = FakeClock()
    slow_target, slow_draft = slowed(target, per_call=0.08, clock=clock), slowed(same, per_call=0.01, clock=clock)
    sequential = generate(slow_target, "def fib(n):", GREEDY, chain_speculator(slow_draft, clock=clock), max_tokens=40,
                          clock=clock)
    overlapped = generate(slow_target, "def fib(n):", GREEDY, chain_speculator(slow_draft, clock=clock), overlap=True,
                          max_tokens=40, clock=clock)
    assert overlapped.tokens == sequential.tokens
    seq, ovl = sequential.stats, overlapped.stats
    steps = ovl.target_calls - 1
    assert ovl.prepared_used >= steps - 2  # all but the first draft (and maybe one more) came prepared
    assert seq.decode_s / (seq.target_calls - 1) > 0.08 + 4 * 0.01  # the sum: draft calls, then the pass
    assert ovl.decode_s / steps < 0.08 + 2.5 * 0.01  # about the pass, plus a draft call it overran
    assert ovl.parallel_s > 0.5 * steps * 0.08  # the draft worked through most of every pass


def test_the_draft_prefills_the_prompt_while_the_target_does(pair) -> None:
    """The prefill is a target pass too: 30 ms a token for both models, so each prefills the
    prompt in about the same time. Sequentially the first draft waits for the draft's own
    prefill; overlapped, the draft prefilled during the target's and the first draft evaluates
    its root alone."""
    target, same, _ = pair
    prompt = "def fib(n):"
    clock = FakeClock()
    slow_target, slow_draft = slowed(target, per_token=0.03, clock=clock), slowed(same, per_token=0.03, clock=clock)
    tokens = target.engine.vocab.tokenize(prompt)
    n = len(tokens)
    firsts = []
    for overlap in (False, True):
        same.engine.rewind(same.cache, 0)
        slow_target.engine.rewind(target.cache, 0)
        gen = Generation(slow_target.engine, target.cache, tokens, GenerationConfig(8, GREEDY, overlap),
                         chain_speculator(slow_draft, clock=clock), clock=clock)
        firsts.append((next(step for step in gen if step.target_calls), gen.stats))
        assert list(same.cache.tokens)[:n] == tokens
    (seq_step, seq), (ovl_step, ovl) = firsts
    assert seq_step.draft_s > 0.03 * n  # the draft's prefill, then its calls
    assert ovl_step.draft_s < seq_step.draft_s - 0.03 * (n - 2)
    assert ovl.prefill_s == pytest.approx(0.03 * n)  # the two prefills side by side, not one after the other
    assert ovl.parallel_s >= 0.03 * n - 1e-9  # the draft's whole prefill, and its calls during the first pass


def test_a_draft_call_that_would_outlast_the_pass_is_not_started(pair) -> None:
    """A 100 ms pass and 70 ms draft calls: a second call during the pass would end 40 ms
    after it, and the step would wait for it. Knowing the pass's cost (its calibrated curve)
    and its calls' (measured), the draft stops after one."""
    target, same, _ = pair
    clock = FakeClock()
    slow_target, slow_draft = slowed(target, per_call=0.1, clock=clock), slowed(same, per_call=0.07, clock=clock)
    stats = AcceptanceStats()  # (its nodes proposed alone: merge.mark_company)
    stats.counts.update({k: [99, 100] for k in itertools.product(["model"], range(5), range(5), ["alone"])})
    spec = PlannedSpeculator("tree", [Source("model", ModelDrafter(slow_draft, ModelDraftConfig(min_prob=0.0), clock=clock), stats)], CostCurve((1, 64), (0.1, 0.1)), 8, 4, clock=clock)
    target.engine.rewind(target.cache, 0)
    gen = Generation(slow_target.engine, target.cache, target.engine.vocab.tokenize("def fib(n):"),
                     GenerationConfig(40, GREEDY, True), spec, clock=clock)
    overlapped = [step.verify_s for step in gen if step.parallel_s > 0]
    assert len(overlapped) >= 5
    # Each waited for its pass, and for the first calls of a width (not measured yet) their overrun.
    assert sorted(overlapped)[len(overlapped) // 2] < 0.1 + 0.02  # the median: not the pass and 40 ms


def test_a_draft_says_which_of_its_nodes_were_found_during_the_pass(pair) -> None:
    """The planner charges drafting only to the nodes drafted after the pass returned
    (`Draft.prepared`): a tree grown entirely during the pass is marked whole, a fresh one not at all."""
    target, same, _ = pair
    clock = FakeClock()
    slow_target = slowed(target, per_call=0.02, clock=clock)
    # The target's own guesses (they come true), 2 ms a call: ten calls during a pass.
    drafter = ModelDrafter(slowed(same, per_call=0.002, clock=clock), ModelDraftConfig.chain(4), clock=clock)
    drafts: list[tuple[bool | None, list[bool], int]] = []
    draft = drafter.draft

    def recording(context, max_nodes, max_depth):
        made = draft(context, max_nodes, max_depth)
        assert len(made.prepared) == len(made.tree)
        drafts.append((made.reused, list(made.prepared), made.calls))
        return made

    drafter.draft = recording  # type: ignore[method-assign]
    spec = PlannedSpeculator("chain", [Source("model", drafter, AcceptanceStats())], None, 6, 6, clock=clock)
    generate(slow_target, "def fib(n):", GREEDY, spec, overlap=True, max_tokens=40, clock=clock)
    assert all(not any(marks) for reused, marks, _ in drafts if not reused)
    whole = [marks for reused, marks, calls in drafts if reused and calls == 0]  # nothing drafted after the pass
    assert whole and all(not marks[0] and all(marks[1:]) for marks in whole)


def test_prepared_trees_are_dropped_when_the_outcome_differs(pair) -> None:
    target, _, different = pair
    clock = FakeClock()
    slow_target, slow_draft = slowed(target, per_call=0.02, clock=clock), slowed(different, per_call=0.002, clock=clock)
    gen = generate(slow_target, "hello world", GREEDY, tree_speculator(slow_draft, clock=clock), overlap=True,
                   max_tokens=30, clock=clock)
    assert gen.tokens == generate(target, "hello world", GREEDY, max_tokens=30).tokens
    assert gen.stats.prepared_dropped > 0  # other weights guess wrong...
    assert gen.stats.prepared_share is not None and gen.stats.prepared_share < 1


@pytest.mark.parametrize("where", ["target", "draft"])
@pytest.mark.parametrize("fault", [KeyboardInterrupt(), EngineError("disk gone")])
def test_a_fault_mid_pass_leaves_both_caches_consistent(pair, where, fault) -> None:
    """Ctrl-C or an error in the target's pass, or in a draft call made during it: the next
    generation with the same engines and speculator (a chat's next turn) answers as a fresh one."""
    target, same, _ = pair
    slow_target, slow_draft = slowed(target, per_call=0.01), slowed(same, per_call=0.002)
    faulty = (slow_target if where == "target" else slow_draft).engine
    faulty.fail_at, faulty.fail = 3, fault
    speculator = tree_speculator(slow_draft)
    before = set(threading.enumerate())
    try:
        with pytest.raises(type(fault)):
            generate(slow_target, "def fib(n):", GREEDY, speculator, overlap=True)
        faulty.fail_at = None
        again = generate(slow_target, "def fib(n): return", GREEDY, speculator, overlap=True)
    finally:
        slow_target.engine.close()
    fresh = generate(target, "def fib(n): return", GREEDY)
    assert again.tokens == fresh.tokens
    # the draft's cache: committed text
    assert list(same.cache.tokens) == (again.prompt + again.tokens)[:same.cache.kv_len]
    assert not [t for t in set(threading.enumerate()) - before if t.name.startswith("specrun-engine")]


def test_a_fault_in_the_drafts_prefill_leaves_both_caches_consistent(pair) -> None:
    """Ctrl-C while the draft prefills beside the target's prefill: the target's pass finishes
    on its worker before anything else touches its cache, and the next turn answers as fresh."""
    target, same, _ = pair
    slow_target, slow_draft = slowed(target, per_call=0.05), slowed(same)
    speculator = tree_speculator(slow_draft)
    before = set(threading.enumerate())

    def interrupted(cache: Cache, tokens: Sequence[int]):
        raise KeyboardInterrupt

    try:
        slow_draft.engine.eval = interrupted  # type: ignore[method-assign]
        with pytest.raises(KeyboardInterrupt):
            generate(slow_target, "def fib(n):", GREEDY, speculator, overlap=True)
        del slow_draft.engine.eval
        again = generate(slow_target, "def fib(n): return", GREEDY, speculator, overlap=True)
    finally:
        slow_target.engine.close()
    assert again.tokens == generate(target, "def fib(n): return", GREEDY).tokens
    assert list(same.cache.tokens) == (again.prompt + again.tokens)[:same.cache.kv_len]
    assert not [t for t in set(threading.enumerate()) - before if t.name.startswith("specrun-engine")]


def test_sampled_tokens_follow_the_target_distribution_with_overlap(sharp_model: Path) -> None:
    """As the sequential test in test_speculate_generate: the first tokens over 1500 seeds,
    plain against overlapped speculation with a draft model (the target itself: prepared trees
    are used), compared with a two-sample chi-square test (p = 0.001). On the fake clock a pass
    has room for five draft calls, however busy the machine is."""
    cfg = LlamaCppConfig(n_threads=1, max_tree_nodes=31)
    counts: dict[str, dict[tuple[int, ...], int]] = {"plain": {}, "spec": {}}
    used = 0
    clock = FakeClock()
    with LlamaCppEngine(sharp_model, cfg) as e, LlamaCppEngine(sharp_model, cfg) as d:
        cache = e.new_cache(128)
        slow = Slow(e, per_call=0.0005, clock=clock)
        prompt = e.vocab.tokenize("hello")
        # Its calls take no time on the clock.
        speculator = tree_speculator(DraftModel(d, d.new_cache(128)), nodes=12, depth=3, clock=clock)
        for kind in counts:
            for seed in range(1500):
                sampling = SamplingConfig(temperature=1.0, top_p=0.95, seed=seed + (10_000 if kind == "spec" else 0))
                gen = Generation(slow, cache, prompt, GenerationConfig(4, sampling, overlap=True),
                                 speculator if kind == "spec" else None, clock=clock)
                for _ in gen:
                    pass
                used += gen.stats.prepared_used
                counts[kind][tuple(gen.tokens)] = counts[kind].get(tuple(gen.tokens), 0) + 1
    assert used > 100  # prepared trees really were verified
    chi2, dof, critical = two_sample_chi_square(counts["plain"], counts["spec"])
    assert dof >= 5 and chi2 < critical, (chi2, dof, critical)


class Streamed(Slow):
    """`Slow` with its weights streamed in each pass (a Transfer, as an offloaded engine has)."""

    def transfer(self) -> Transfer:
        return Transfer()


@pytest.mark.parametrize("streamed, draft_s", [(False, 0.01), (True, 0.01), (True, 0.0)])
def test_a_streamed_pass_after_drafting_does_not_teach_the_cost_curve(pair, streamed, draft_s) -> None:
    """A streamed target's readers fill its buffers while the draft model drafts, so the pass
    after 40 ms of drafting is cheaper than one back to back: learnt as the curve's pass, it made
    plain decoding look faster than it is (on disk a draft model was judged not to pay). Such a
    pass is passed on as None, as is one after a larger pass (the prompt's): its compute left the
    readers time too. A resident target's pass is learnt, as is a streamed one after drafting
    that took no time (the free drafters) and a pass no larger."""
    target, same, _ = pair
    clock = FakeClock()
    engine = (Streamed if streamed else Slow)(target.engine, per_call=0.08, clock=clock)
    spec = chain_speculator(slowed(same, per_call=draft_s, clock=clock), clock=clock)
    seen: list[tuple[int, float | None]] = []
    observe = spec.observe

    def recording(proposal, path, wall_s, pass_s=None, logits=None):
        seen.append((len(proposal.tree), pass_s))
        observe(proposal, path, wall_s, pass_s, logits)

    spec.observe = recording  # type: ignore[method-assign]
    gen = generate(DraftModel(engine, target.cache), "def fib(n):", GREEDY, spec, max_tokens=20, clock=clock)
    assert len([n for n, _ in seen if n > 1]) >= 3
    before = [len(gen.prompt)] + [n for n, _ in seen[:-1]]  # the pass before each step's
    for (n, s), previous in zip(seen, before):
        if streamed and (draft_s and n > 1 or previous > n):
            assert s is None, (n, previous)
        else:
            assert s == pytest.approx(0.08), (n, previous)
