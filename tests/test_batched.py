"""Several sequences sharing every target pass against each generated alone (tiny f32 models).

Greedy and seeded sampling: every sequence's tokens equal its own run, plain and
speculative, on every engine, while the passes are shared.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from specrun import batched
from specrun.batched import BatchGeneration, node_shares
from specrun.engines.base import Engine, Transfer
from specrun.generate import Generation, GenerationConfig
from specrun.sampling import SamplingConfig
from specrun.speculate.planner import CostCurve
from tests.clocks import FakeClock
from tests.test_speculate_generate import NgramSpeculator, RandomSpeculator, _open_target

PROMPTS = ["def fib(n): return fib(n", "hello world hello world hello", "the a the a def", "x"]
MAX_TOKENS = [40, 24, 64, 9]  # sequences leave the batch at different passes
GREEDY = SamplingConfig(temperature=0)


@pytest.fixture(scope="module", params=["llama.cpp", "torch"])
def engine(request: pytest.FixtureRequest, tiny_model: Path):
    e = _open_target(request.param, tiny_model)
    yield e
    e.close()


def _speculator(kind: str, i: int):
    return {"plain": lambda: None, "ngram": lambda: NgramSpeculator(16, 8),
            "random": lambda: RandomSpeculator(7, seed=i)}[kind]()


def _generations(engine: Engine, kind: str, sampling: list[SamplingConfig]) -> list[Generation]:
    return [Generation(engine, engine.new_cache(256), engine.vocab.tokenize(p), GenerationConfig(n, s),
                       _speculator(kind, i))
            for i, (p, n, s) in enumerate(zip(PROMPTS, MAX_TOKENS, sampling))]


def _alone(engine: Engine, kind: str, sampling: list[SamplingConfig]) -> list[Generation]:
    gens = _generations(engine, kind, sampling)
    for g in gens:
        for _ in g:
            pass
        g.cache.close()
    return gens


def _together(engine: Engine, kind: str, sampling: list[SamplingConfig],
              max_nodes: int = 48) -> tuple[BatchGeneration, list[str]]:
    gens = _generations(engine, kind, sampling)
    batch = BatchGeneration(engine, gens, max_nodes)
    texts = ["" for _ in gens]
    for i, step in batch:
        texts[i] += step.text
    for g in gens:
        g.cache.close()
    return batch, texts


@pytest.mark.parametrize("kind", ["plain", "ngram", "random"])
def test_greedy_sequences_sharing_passes_equal_each_alone(engine: Engine, kind: str) -> None:
    sampling = [GREEDY] * len(PROMPTS)
    alone = _alone(engine, kind, sampling)
    batch, texts = _together(engine, kind, sampling)
    for a, b, text in zip(alone, batch.generations.values(), texts):
        assert b.tokens == a.tokens and b.stats.stop_reason == a.stats.stop_reason
        assert text == b.text == a.text
    longest = max(g.stats.target_calls for g in batch.generations.values()) - 1  # the prefill's pass is not shared
    assert batch.stats.passes == longest < sum(g.stats.target_calls - 1 for g in batch.generations.values())


@pytest.mark.parametrize("kind", ["plain", "ngram"])
def test_seeded_sampling_sharing_passes_equals_each_alone(engine: Engine, kind: str) -> None:
    sampling = [SamplingConfig(temperature=0.9, top_p=0.95, seed=10 + i) for i in range(len(PROMPTS))]
    alone = _alone(engine, kind, sampling)
    batch, _ = _together(engine, kind, sampling)
    for a, b in zip(alone, batch.generations.values()):
        assert b.tokens == a.tokens


def test_a_small_budget_shrinks_each_tree_to_its_share(engine: Engine) -> None:
    batch, _ = _together(engine, "random", [GREEDY] * len(PROMPTS), max_nodes=8)
    assert batch.stats.nodes_per_pass <= 8
    assert [node_shares(64, n) for n in (1, 2, 8, 100)] == [64, 32, 8, 1]


def test_a_batch_needs_one_engine_and_a_cache_per_sequence(engine: Engine) -> None:
    cache = engine.new_cache(64)
    gens = [Generation(engine, cache, [5, 6], GenerationConfig(4)) for _ in range(2)]
    with pytest.raises(ValueError, match="cache of its own"):
        list(BatchGeneration(engine, gens, 16))
    with pytest.raises(ValueError, match="no sequences"):
        list(BatchGeneration(engine, [], 16))
    cache.close()


def test_sequences_joining_between_passes_equal_each_alone(engine: Engine) -> None:
    sampling = [GREEDY] * len(PROMPTS)
    alone = _alone(engine, "ngram", sampling)
    gens = _generations(engine, "ngram", sampling)
    batch = BatchGeneration(engine, [], 48)
    for g in gens[:2]:
        batch.join(g)
    for _ in range(4):
        batch.step()
    for g in gens[2:]:  # two more join the passes under way
        batch.join(g)
    while batch.active:
        batch.step()
    for a, b in zip(alone, gens):
        assert b.tokens == a.tokens and b.stats.stop_reason == a.stats.stop_reason
        b.cache.close()
    assert batch.stats.sequences == 4 and batch.stats.passes < sum(g.stats.target_calls - 1 for g in gens)


def test_a_pass_grows_while_its_nodes_pay_for_what_they_cost() -> None:
    from specrun.batched import pass_budget

    flat_then_steep = lambda n: 1.0 if n <= 16 else n / 16  # noqa: E731 - a disk-streamed curve's shape
    assert pass_budget(flat_then_steep, 4, 64, 0.25) == 16  # free up to 16, then a node costs more than it gives
    assert pass_budget(flat_then_steep, 20, 64, 0.25) == 20  # already past the knee: one node each
    assert pass_budget(lambda n: 1.0 + 0.6 * (n - 1), 2, 32, 0.3) == 2  # a CPU in RAM: drafts do not pay
    assert pass_budget(lambda n: 1.0, 2, 32, 0.01) == 32  # a free pass: every node it may carry


def test_a_batch_sized_by_a_cost_curve_keeps_the_output(engine: Engine) -> None:
    from specrun.speculate.planner import CostCurve

    sampling = [GREEDY] * len(PROMPTS)
    alone = _alone(engine, "ngram", sampling)
    gens = _generations(engine, "ngram", sampling)
    batch = BatchGeneration(engine, gens, 48, CostCurve((1, 8, 16), (1.0, 1.0, 2.0)))
    for _ in batch:
        pass
    assert [g.tokens for g in gens] == [a.tokens for a in alone]
    assert batch.stats.nodes_per_pass <= 8 + 1e-9 and 0 < batch.stats.acceptance < 1
    for g in gens:
        g.cache.close()


def test_a_batch_plans_the_free_drafters_candidates_together_and_keeps_the_output(engine: Engine) -> None:
    from specrun.speculate.ngram import NgramDrafter
    from specrun.speculate.planned import PlannedSpeculator, Source
    from specrun.speculate.acceptance import AcceptanceStats
    from specrun.speculate.planner import CostCurve

    curve = CostCurve((1, 8, 32), (1.0, 1.0, 3.0))
    sampling = [GREEDY] * len(PROMPTS)
    alone = _alone(engine, "plain", sampling)
    gens = [Generation(engine, engine.new_cache(256), engine.vocab.tokenize(p), GenerationConfig(n, GREEDY),
                       PlannedSpeculator("free", [Source("ngram", NgramDrafter(), AcceptanceStats())], curve, 32, 8))
            for p, n in zip(PROMPTS, MAX_TOKENS)]
    batch = BatchGeneration(engine, gens, 48, curve)
    for _ in batch:
        pass
    assert [g.tokens for g in gens] == [a.tokens for a in alone]
    assert batch.stats.drafted > 0 and batch.stats.accepted > 0  # trees were planned and verified
    for g in gens:
        g.cache.close()


@pytest.mark.parametrize("kind", ["llama.cpp", "torch"])
@pytest.mark.parametrize("draft_seed", [None, 9])  # the target's own weights (right), or other ones
def test_a_batch_drafts_with_a_draft_model_for_every_sequence_at_once(sharp_model: Path, tmp_path: Path, kind: str,
                                                                      draft_seed: int | None) -> None:
    """Auto's draft model in a batch: every level of every sequence's tree in one draft call
    (its caches share one context), merged with the free drafters' candidates and planned
    together; each output equals its plain run alone, and the draft's nodes were verified."""
    from tests.tiny_model import TinySpec, build_tiny_model
    from specrun.engines.llamacpp import LlamaCppConfig, LlamaCppEngine
    from specrun.speculate.draft_model import DraftModel, ModelDrafter
    from specrun.speculate.ngram import NgramDrafter
    from specrun.speculate.planned import PlannedSpeculator, Source
    from specrun.speculate.acceptance import AcceptanceStats
    from specrun.speculate.planner import CostCurve

    path = sharp_model if draft_seed is None else build_tiny_model(tmp_path / "other.gguf",
                                                                   TinySpec(scale=4.0, seed=draft_seed))
    curve = CostCurve((1, 16, 64), (1.0, 1.0, 3.0))
    sampling = [GREEDY] * len(PROMPTS)
    engine = _open_target(kind, sharp_model)
    alone = _alone(engine, "plain", sampling)
    with LlamaCppEngine(path, LlamaCppConfig(n_threads=1, max_tree_nodes=63, sequences=len(PROMPTS))) as draft:
        calls: list[int] = []
        eval_trees = draft.eval_trees
        draft.eval_trees = lambda requests: calls.append(len(requests)) or eval_trees(requests)  # type: ignore[method-assign]
        gens = [Generation(engine, engine.new_cache(256), engine.vocab.tokenize(p), GenerationConfig(n, GREEDY),
                           PlannedSpeculator("auto", [Source("ngram", NgramDrafter(), AcceptanceStats()),
                                                      Source("model", ModelDrafter(DraftModel(draft, draft.new_cache(256))),
                                                             AcceptanceStats())], curve, 32, 8))
                for p, n in zip(PROMPTS, MAX_TOKENS)]
        batch = BatchGeneration(engine, gens, 64, curve)
        for _ in batch:
            pass
        assert [g.tokens for g in gens] == [a.tokens for a in alone]
        assert max(calls) == len(PROMPTS)  # a level of every sequence's tree in one draft call
        model = [g.stats.sources.get("model") for g in gens]
        verified = sum(m.verified for m in model if m is not None)
        assert verified > 0  # the batch's plan verified the draft's nodes
        if draft_seed is None:  # the target's own weights: every level's likeliest guess comes true
            assert sum(m.accepted for m in model if m is not None) > 0.3 * verified  # (siblings are not)
        for g in gens:
            g.cache.close()
    engine.close()


def test_a_session_hands_out_spare_caches_and_takes_them_back(tiny_model: Path, tmp_path: Path) -> None:
    """Session.sequence: the session's own cache first, then new ones; an ended sequence's cache
    serves the next; a sequence that cannot start (its prompt too long) leaves its cache spare."""
    from specrun.errors import UsageError
    from specrun.session import Session, SessionConfig
    from specrun.speculate.factory import SpecConfig

    with Session(SessionConfig(tiny_model, None, tmp_path, batched=2)) as s:
        own = s.open(64)
        plain, config = SpecConfig(mode="none"), GenerationConfig(4, SamplingConfig(temperature=0.0))
        first, second = s.sequence([1, 2, 3], config, plain, 64), s.sequence([1, 4], config, plain, 64)
        assert first.cache is own and second.cache is not own
        s.sequence_ended(first)
        with pytest.raises(UsageError, match="context holds"):
            s.sequence(list(range(1, 100)), config, plain, 64)
        assert s.sequence([5, 6], config, plain, 64).cache is own  # still spare after the failure


def test_a_batch_sequence_drafts_in_the_draft_cache_kept_with_its_target_cache(tiny_model: Path,
                                                                               tmp_path: Path) -> None:
    """With a draft model, each of a batch's target caches gets a draft cache of its own, in the
    draft engine's one shared context, and keeps it as the cache passes to the next sequence
    (a bench or a server runs many more sequences than the batch holds)."""
    from specrun.session import Session, SessionConfig
    from specrun.speculate.factory import SpecConfig

    with Session(SessionConfig(tiny_model, tiny_model, tmp_path, batched=2)) as s:
        s.open(64)
        chain, config = SpecConfig(mode="chain", budget=4, overlap="off"), GenerationConfig(4, SamplingConfig(temperature=0.0))
        first, second = s.sequence([1, 2, 3], config, chain, 64), s.sequence([1, 4], config, chain, 64)
        drafts = [g.speculator.costly_drafter.cache for g in (first, second)]  # type: ignore[union-attr]
        assert drafts[0] is not drafts[1] and drafts[0].context is drafts[1].context  # type: ignore[attr-defined]
        s.sequence_ended(second)
        third = s.sequence([7, 8], config, chain, 64)
        assert third.cache is second.cache
        assert third.speculator.costly_drafter.cache is drafts[1]  # type: ignore[union-attr]


def test_a_session_that_replaces_its_cache_lends_the_new_one(tiny_model: Path, tmp_path: Path) -> None:
    """open() (and calibrated()) close the session's cache and make another: the pool hands out
    the new one, never the closed one it lent before."""
    from specrun.session import Session, SessionConfig
    from specrun.speculate.factory import SpecConfig

    with Session(SessionConfig(tiny_model, None, tmp_path, batched=2)) as s:
        s.open(64)
        plain, config = SpecConfig(mode="none"), GenerationConfig(4, SamplingConfig(temperature=0.0))
        s.sequence_ended(s.sequence([1, 2, 3], config, plain, 64))
        fresh = s.open(64)
        assert s.sequence([1, 2, 3], config, plain, 64).cache is fresh


class _Streamed:
    """An engine whose weights stream (a Transfer), its shared passes timed on a fake clock:
    0.1 s plus 0.01 s a token; everything else as the engine it wraps."""

    def __init__(self, inner: Engine, clock: FakeClock, streamed: bool) -> None:
        self.inner, self.clock, self.streamed = inner, clock, streamed

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def transfer(self) -> Transfer | None:
        return Transfer() if self.streamed else None

    def sync_many(self, requests):
        self.clock.advance(0.5)
        return self.inner.sync_many(requests)

    def eval_trees(self, requests):
        self.clock.advance(0.1 + 0.01 * sum(len(r.tokens) for r in requests))
        return self.inner.eval_trees(requests)


@pytest.mark.parametrize("streamed", [False, True])
def test_a_batch_learns_only_the_streamed_passes_run_back_to_back(tiny_model: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  streamed: bool) -> None:
    """As for one sequence (test_speculate_overlap): a streamed pass after a larger one (the
    prefills', or a pass before a sequence left) found its first layers read ahead, so the
    batch's cost curve learns only passes no larger than the one before; a resident target's
    every pass."""
    clock, learnt = FakeClock(), []
    monkeypatch.setattr(batched, "learn_pass", lambda cost, n, seconds: learnt.append((n, seconds)))
    inner = _open_target("llama.cpp", tiny_model)
    try:
        engine = _Streamed(inner, clock, streamed)
        gens = [Generation(engine, inner.new_cache(256), inner.vocab.tokenize(p),  # type: ignore[arg-type]
                           GenerationConfig(n, GREEDY)) for p, n in zip(PROMPTS, MAX_TOKENS)]
        batch = BatchGeneration(engine, gens, 48, CostCurve((1, 64), (0.1, 0.74)), clock=clock)  # type: ignore[arg-type]
        sizes: list[int] = []  # nodes of each shared pass
        for _ in batch:
            if batch.stats.passes > len(sizes):
                sizes.append(batch.stats.nodes - sum(sizes))
        for g in gens:
            g.cache.close()
    finally:
        inner.close()
    passes = [n for n, _ in learnt]
    assert all(s == pytest.approx(0.1 + 0.01 * n) for n, s in learnt)
    before = [sum(len(g.prompt) for g in gens)] + sizes[:-1]  # the prefills', then each pass's
    expected = [n for n, previous in zip(sizes, before) if not streamed or previous <= n]
    assert passes == expected
    assert len(expected) < len(sizes) if streamed else expected == sizes  # sequences leave: passes shrink
