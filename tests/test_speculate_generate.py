"""Speculative generation against plain generation on tiny f32 models.

Greedy: token-identical for every speculator and budget. Sampling: the same
seed gives the same tokens (verification draws from the target exactly as
plain decoding does), and the next-token distribution matches plain sampling.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pytest

from specrun.engines.base import Cache
from specrun.engines.llamacpp import LlamaCppConfig, LlamaCppEngine
from specrun.generate import Generation, GenerationConfig
from specrun.sampling import SamplingConfig
from specrun.speculate.ngram import NgramConfig, NgramDrafter, match_bucket
from specrun.speculate.planned import PlannedSpeculator, Source
from specrun.speculate.acceptance import AcceptanceStats
from specrun.speculate.base import Proposal
from specrun.speculate.tree import DraftTree
from tests.fakes import add_path, path_to

GREEDY = SamplingConfig(temperature=0)


def NgramSpeculator(nodes: int, depth: int = 16) -> PlannedSpeculator:  # noqa: N802 - reads like a class
    """Prompt lookup with a fixed budget: every drafted node verified."""
    return PlannedSpeculator("ngram", [Source("ngram", NgramDrafter(), AcceptanceStats())], None, nodes, depth)
PROMPTS = ["def fib(n): return fib(n", "hello world hello world hello", "the a the a def"]


@pytest.fixture(scope="module")
def engine(tiny_model: Path):
    with LlamaCppEngine(tiny_model, LlamaCppConfig(n_threads=1, max_tree_nodes=63)) as e:
        yield e


@pytest.fixture(scope="module")
def cache(engine: LlamaCppEngine) -> Cache:
    return engine.new_cache(1024)


def generate(engine: LlamaCppEngine, cache: Cache, prompt: str, sampling: SamplingConfig, speculator=None,
             max_tokens: int = 64) -> Generation:
    engine.rewind(cache, 0)  # every run evaluates its whole prompt
    gen = Generation(engine, cache, engine.vocab.tokenize(prompt),
                     GenerationConfig(max_tokens=max_tokens, sampling=sampling), speculator)
    for _ in gen:
        pass
    return gen


class RandomSpeculator:
    """Proposes random trees: wrong almost always, so it tests rejection paths."""

    name = "random"

    def __init__(self, nodes: int, seed: int = 0, max_depth: int = 6) -> None:
        self.nodes, self.rng, self.max_depth = nodes, np.random.default_rng(seed), max_depth

    def propose(self, context: Sequence[int], max_depth: int, max_nodes: int, allowance=None) -> Proposal:
        tree = DraftTree.rooted(context[-1])
        for _ in range(min(self.nodes, max_nodes) - 1):
            parent = int(self.rng.integers(len(tree)))
            if tree.depths[parent] < min(max_depth, self.max_depth):
                tree.add(int(self.rng.integers(3, 272)), parent)
        return Proposal(tree)

    def observe(self, proposal: Proposal, path: list[int], wall_s: float, pass_s: float | None = None,
                logits=None) -> None:
        pass


class OracleSpeculator:
    """Knows the plain output, so every drafted token is right: a chain along it."""

    name = "oracle"

    def __init__(self, prompt: list[int], output: list[int], max_depth: int) -> None:
        self.full, self.max_depth = prompt + output, max_depth

    def propose(self, context: Sequence[int], max_depth: int, max_nodes: int, allowance=None) -> Proposal:
        tree = DraftTree.rooted(context[-1])
        add_path(tree, self.full[len(context):len(context) + min(max_depth, self.max_depth)])
        return Proposal(tree)

    def observe(self, proposal: Proposal, path: list[int], wall_s: float, pass_s: float | None = None,
                logits=None) -> None:
        pass


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("nodes, depth", [(2, 1), (4, 3), (16, 8), (48, 16)])
def test_greedy_ngram_equals_plain(engine: LlamaCppEngine, cache: Cache, prompt: str, nodes: int, depth: int) -> None:
    plain = generate(engine, cache, prompt, GREEDY)
    spec = generate(engine, cache, prompt, GREEDY, NgramSpeculator(nodes, depth))
    assert spec.tokens == plain.tokens and spec.text == plain.text
    assert spec.stats.stop_reason == plain.stats.stop_reason
    assert 0 < spec.stats.accepted_tokens <= spec.stats.drafted_tokens  # it drafted, and drafts were right


@pytest.mark.parametrize("nodes", [2, 7, 30])
def test_greedy_with_random_trees_equals_plain(engine: LlamaCppEngine, cache: Cache, nodes: int) -> None:
    plain = generate(engine, cache, PROMPTS[0], GREEDY)
    spec = generate(engine, cache, PROMPTS[0], GREEDY, RandomSpeculator(nodes))
    assert spec.tokens == plain.tokens
    assert spec.stats.drafted_tokens > 0


def test_a_perfect_draft_is_always_accepted(engine: LlamaCppEngine, cache: Cache) -> None:
    plain = generate(engine, cache, PROMPTS[1], GREEDY, max_tokens=60)
    oracle = OracleSpeculator(engine.vocab.tokenize(PROMPTS[1]), plain.tokens, 5)
    spec = generate(engine, cache, PROMPTS[1], GREEDY, oracle, max_tokens=60)
    assert spec.tokens == plain.tokens
    assert spec.stats.accepted_tokens == spec.stats.drafted_tokens > 0
    assert spec.stats.target_calls == 1 + 10  # prefill, then 6 tokens per pass: 1 + 5 accepted


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_seeded_sampling_equals_plain_sampling(engine: LlamaCppEngine, cache: Cache, seed: int) -> None:
    sampling = SamplingConfig(temperature=0.9, top_p=0.95, seed=seed)
    plain = generate(engine, cache, PROMPTS[1], sampling)
    for speculator in (NgramSpeculator(12, 6), RandomSpeculator(12, seed)):
        spec = generate(engine, cache, PROMPTS[1], sampling, speculator)
        assert spec.tokens == plain.tokens
        assert spec.stats.drafted_tokens > 0
    other = generate(engine, cache, PROMPTS[1], SamplingConfig(temperature=0.9, top_p=0.95, seed=seed + 100))
    assert other.tokens != plain.tokens  # the seed matters: equal outputs are not an accident


class LikelySpeculator(RandomSpeculator):
    """Random trees whose children come from the target's likely tokens after the root,
    so drafts are often (not always) accepted."""

    def __init__(self, nodes: int, seed: int, likely: dict[int, list[int]]) -> None:
        super().__init__(nodes, seed, max_depth=2)
        self.likely = likely

    def propose(self, context: Sequence[int], max_depth: int, max_nodes: int, allowance=None) -> Proposal:
        tree = DraftTree.rooted(context[-1])
        choices = self.likely.get(context[-1], [3])
        for _ in range(min(self.nodes, max_nodes) - 1):
            parent = int(self.rng.integers(len(tree)))
            if tree.depths[parent] < min(max_depth, self.max_depth):
                add_path(tree, [int(self.rng.choice(choices))], parent)
        return Proposal(tree)


def _open_target(kind: str, path: Path):
    if kind == "torch":
        from specrun.engines.torch_engine import TorchConfig, TorchEngine

        return TorchEngine(path, TorchConfig(dtype="float32", threads=1, max_tree_nodes=63))
    return LlamaCppEngine(path, LlamaCppConfig(n_threads=1, max_tree_nodes=63))


@pytest.mark.parametrize("kind", ["llama.cpp", "torch"])
def test_next_tokens_follow_the_target_distribution(sharp_model: Path, kind: str) -> None:
    """Independent seeds: the first 3 generated tokens over 2000 runs each, speculative
    against plain, compared with a two-sample chi-square test (p = 0.001), on each engine."""
    counts: dict[str, dict[tuple[int, ...], int]] = {"plain": {}, "spec": {}}
    accepted = 0
    with _open_target(kind, sharp_model) as e:
        c = e.new_cache(128)
        prompt = e.vocab.tokenize("hello")
        likely = {}
        for first in np.argsort(-e.eval(c, prompt).row(0))[:8]:
            e.rewind(c, len(prompt))
            likely[int(first)] = [int(t) for t in np.argsort(-e.eval(c, [int(first)]).row(0))[:4]]
        for kind in counts:
            for seed in range(2000):
                spec = LikelySpeculator(12, seed, likely) if kind == "spec" else None
                cfg = SamplingConfig(temperature=1.0, top_p=0.95, seed=seed + (10_000 if spec else 0))
                gen = Generation(e, c, prompt, GenerationConfig(max_tokens=3, sampling=cfg), spec)
                for _ in gen:
                    pass
                accepted += gen.stats.accepted_tokens
                key = tuple(gen.tokens)
                counts[kind][key] = counts[kind].get(key, 0) + 1
    assert accepted > 500  # the speculative runs really did accept drafts
    chi2, dof, critical = two_sample_chi_square(counts["plain"], counts["spec"])
    assert dof >= 5
    assert chi2 < critical, (chi2, dof, critical)


def two_sample_chi_square(first: dict, second: dict) -> tuple[float, int, float]:
    """(chi-square, degrees of freedom, critical value at p = 0.001) for two samples of outcome
    counts; outcomes seen fewer than 20 times in both are pooled into one cell."""
    keys = sorted(set(first) | set(second))
    a = np.array([first.get(k, 0) for k in keys], dtype=float)
    b = np.array([second.get(k, 0) for k in keys], dtype=float)
    big = (a + b) >= 20  # pool rare outcomes into one cell
    a = np.append(a[big], a[~big].sum())
    b = np.append(b[big], b[~big].sum())
    total = a + b
    ea, eb = total * a.sum() / total.sum(), total * b.sum() / total.sum()
    ok = total > 0
    chi2 = float((((a - ea) ** 2 / ea) + ((b - eb) ** 2 / eb))[ok].sum())
    dof = int(ok.sum()) - 1
    critical = dof * (1 - 2 / (9 * dof) + 3.09 * np.sqrt(2 / (9 * dof))) ** 3  # Wilson-Hilferty, p = 0.001
    return chi2, dof, critical


def _reference_match(ctx: list[int], end: int, cap: int) -> int:
    """How many tokens before position `end` equal the context's last ones (slow and plain)."""
    n = 0
    while n < cap and n < end and ctx[end - 1 - n] == ctx[len(ctx) - 1 - n] and end - 1 - n != len(ctx) - 1 - n:
        n += 1
    return n


@pytest.mark.parametrize("seed", range(20))
def test_ngram_matches_agree_with_a_brute_force_search(seed: int) -> None:
    rng = np.random.default_rng(seed)
    config = NgramConfig(max_ngram=3, min_ngram=1, max_matches=100, max_match=12)
    ctx = [int(t) for t in rng.integers(0, 3, size=int(rng.integers(5, 80)))]  # 3 symbols: many repeats
    found = NgramDrafter(config).matches(ctx)
    expected = {end: _reference_match(ctx, end, config.max_match) for end in range(1, len(ctx))}
    expected = {end: n for end, n in expected.items() if n >= config.min_ngram}
    assert dict((end, n) for n, end in found) == expected
    assert [n for n, _ in found] == sorted((n for n, _ in found), reverse=True)  # longest first
    for (n1, e1), (n2, e2) in zip(found, found[1:]):
        assert n1 > n2 or e1 > e2  # most recent first among equals


def test_long_matches_get_their_own_planner_keys() -> None:
    line = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    ctx = line + [1] + line[:9]  # the line again, 9 tokens so far: the earlier line predicts 14
    draft = NgramDrafter().draft(ctx, max_nodes=4, max_depth=3)
    tree = draft.tree
    assert [tree.tokens[i] for i in path_to(tree, len(tree) - 1)] == [13, 14, 1, 5]
    assert draft.keys[1:] == [("ngram", 8, 1), ("ngram", 8, 2), ("ngram", 8, 3)]
    assert [match_bucket(n) for n in (1, 3, 4, 7, 8, 15, 16, 40)] == [1, 3, 4, 4, 8, 8, 16, 16]


def test_ngram_drafter_proposes_earlier_continuations() -> None:
    d = NgramDrafter(NgramConfig(max_ngram=3))
    ctx = [1, 2, 3, 4, 5, 9, 1, 2, 3, 4, 6, 9, 1, 2]
    draft = d.draft(ctx, max_nodes=10, max_depth=3)
    tree, keys = draft.tree, draft.keys
    assert tree.tokens[0] == 2
    assert keys[1] == ("ngram", 3, 1) and keys[3] == ("ngram", 3, 3) and len(keys) == len(tree)
    # suffix (9, 1, 2) matched twice before: continuations 3 4 6 (recent) and 3 4 5
    assert path_to(tree, 3) == [0, 1, 2, 3] and [tree.tokens[i] for i in (1, 2, 3)] == [3, 4, 6]
    assert 5 in tree.tokens and tree.parents[tree.tokens.index(5)] == 2
    assert len(d.draft(ctx + [7], max_nodes=10, max_depth=3).tree) == 1  # nothing follows 7 before
    assert len(d.draft(ctx, max_nodes=3, max_depth=5).tree) == 3
    assert max(d.draft(ctx, max_nodes=30, max_depth=2).tree.depths) == 2
    shorter = [5, 5, 5]  # a context that is not an extension resets the index
    assert d.draft(shorter, max_nodes=4, max_depth=2).tree.tokens == [5, 5, 5]
