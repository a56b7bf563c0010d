"""Draft-model speculation (chain and SpecExec tree) on tiny f32 models."""

from __future__ import annotations

from pathlib import Path

import pytest

from specrun.engines.llamacpp import LlamaCppConfig, LlamaCppEngine
from specrun.generate import Generation, GenerationConfig
from specrun.sampling import SamplingConfig
from specrun.speculate.draft_model import (DraftModel, ModelDraftConfig, ModelDrafter, VocabMismatch,
                                           check_vocab_compatible)
from specrun.speculate.factory import SpecConfig, make_speculator
from specrun.speculate.base import Verified
from specrun.speculate.planned import PlannedSpeculator, Source
from specrun.speculate.acceptance import AcceptanceStats
from specrun.speculate.planner import CostCurve
from tests.tiny_model import WORDS, TinySpec, build_tiny_model

GREEDY = SamplingConfig(temperature=0)
FLAT = CostCurve((1, 64), (1.0, 1.2))


def generate(target: DraftModel, prompt, sampling, speculator=None, max_tokens=60) -> Generation:
    engine, cache = target.engine, target.cache
    engine.rewind(cache, 0)  # every run evaluates its whole prompt
    gen = Generation(engine, cache, engine.vocab.tokenize(prompt), GenerationConfig(max_tokens, sampling), speculator)
    for _ in gen:
        pass
    return gen


def fixed(drafter: ModelDrafter, nodes: int, depth: int) -> PlannedSpeculator:
    return PlannedSpeculator("model", [Source("model", drafter, AcceptanceStats())], None, nodes, depth)


# The tiny model gives its likeliest token about 2%: min_prob 0 lets trees grow all the same.
@pytest.mark.parametrize("config, nodes", [(ModelDraftConfig.chain(4), 5), (ModelDraftConfig(min_prob=0.0), 16),
                                           (ModelDraftConfig(top_k=2, nodes_per_pass=8, max_passes=3, min_prob=0.0), 40),
                                           (ModelDraftConfig(min_prob=0.0), 200)])
def test_draft_equal_to_target_is_accepted_along_the_greedy_path(pair, config, nodes) -> None:
    target, same, _ = pair
    plain = generate(target, "def fib(n):", GREEDY)
    spec = generate(target, "def fib(n):", GREEDY, fixed(ModelDrafter(same, config), nodes, depth=6))
    assert spec.tokens == plain.tokens
    # every pass commits a whole root-to-leaf path of the draft's top-1 choices
    assert spec.stats.tokens_per_call > 2.5
    if config.top_k == 1:
        assert spec.stats.accepted_tokens == spec.stats.drafted_tokens


@pytest.mark.parametrize("mode", ["chain", "tree", "auto"])
def test_a_different_draft_still_gives_the_plain_output(pair, mode) -> None:
    target, _, different = pair
    for sampling in (GREEDY, SamplingConfig(temperature=0.8, top_p=0.9, seed=4)):
        plain = generate(target, "hello world", sampling)
        spec = generate(target, "hello world", sampling, make_speculator(SpecConfig(mode), FLAT, {}, different))
        assert spec.tokens == plain.tokens
        assert spec.stats.drafted_tokens > 0


def test_draft_cache_follows_the_committed_text(pair) -> None:
    """After each step the draft model's cache holds a prefix of the committed text (the
    prefill's token comes out before any draft: the draft's cache is filled by the first)."""
    target, same, _ = pair
    drafter = ModelDrafter(same, ModelDraftConfig())
    engine, cache = target.engine, target.cache
    engine.rewind(cache, 0)
    gen = Generation(engine, cache, engine.vocab.tokenize("the a the"), GenerationConfig(40, GREEDY),
                     fixed(drafter, 12, 4))
    steps = 0
    for step in gen:
        if not step.target_calls:
            continue
        committed = gen.prompt + gen.tokens
        kv_len = same.cache.kv_len
        assert list(same.cache.tokens) == committed[:kv_len] and kv_len > len(gen.prompt) - 1
        steps += 1
    assert steps > 1 and gen.stats.accepted_tokens > 0


def test_vocab_compatibility(pair, tmp_path: Path) -> None:
    target, same, different = pair
    check_vocab_compatible(target.engine.vocab, same.engine.vocab)
    check_vocab_compatible(target.engine.vocab, different.engine.vocab)  # other weights, same tokenizer
    renamed = build_tiny_model(tmp_path / "renamed.gguf", TinySpec(words=("▁xyz",) + WORDS[1:]))
    with LlamaCppEngine(renamed, LlamaCppConfig(n_threads=1)) as r:
        with pytest.raises(VocabMismatch, match="token 259"):
            check_vocab_compatible(target.engine.vocab, r.vocab)


def test_trees_are_sized_from_the_nodes_asked_for() -> None:
    small, large = ModelDraftConfig().sized(16, 16), ModelDraftConfig().sized(256, 16)
    assert small == ModelDraftConfig(top_k=4, nodes_per_pass=1, max_passes=15, min_prob=0.25)
    assert large == ModelDraftConfig(top_k=32, nodes_per_pass=31, max_passes=15, min_prob=1 / 64)
    assert ModelDraftConfig().sized(1024, 16).nodes_per_pass == 64  # a call over more costs about its nodes
    assert ModelDraftConfig.chain(4).sized(256, 16) == ModelDraftConfig.chain(4)  # a chain stays one
    assert ModelDraftConfig(top_k=2).sized(256, 3) == ModelDraftConfig(2, 31, 2, 1 / 64)  # a level a call


def test_a_tree_bigger_than_the_draft_engine_takes_grows_over_several_calls(pair, tiny_model: Path) -> None:
    """The draft engine evaluates 15 nodes at most; leaves need no evaluation, so it still
    drafts 60-node trees, and the target accepts along them as from a tree it drafted itself."""
    target, _, _ = pair
    with LlamaCppEngine(tiny_model, LlamaCppConfig(n_threads=1, max_tree_nodes=15)) as small:
        widths: list[int] = []  # new nodes per draft model call on a tree
        counted = CountingTrees(small, widths)
        drafter = ModelDrafter(DraftModel(counted, small.new_cache(1024)), ModelDraftConfig(min_prob=0.0))
        draft = drafter.draft(target.engine.vocab.tokenize("def fib(n):"), 60, 8)
        tree = draft.tree
        assert len(tree) == len(draft.keys) == 60 and 1 <= draft.evaluated <= 15
        assert draft.calls >= 3 and draft.calls == 1 + len(widths) and max(widths) <= 7 and max(tree.depths) >= 3
        assert all(tree.depths[i] == tree.depths[tree.parents[i]] + 1 for i in range(1, len(tree)))
        drafter.accepted(Verified([0]))
        plain = generate(target, "def fib(n):", GREEDY)
        spec = generate(target, "def fib(n):", GREEDY,
                        fixed(ModelDrafter(DraftModel(small, small.new_cache(1024)), ModelDraftConfig(min_prob=0.0)),
                              60, 8))
    assert spec.tokens == plain.tokens
    assert spec.stats.tokens_per_call > 2.5


class CountingTrees:
    """An engine that records how many new nodes each of its `eval_tree` calls evaluates."""

    def __init__(self, inner, widths: list[int]) -> None:
        self.inner, self.widths = inner, widths

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def eval_tree(self, cache, tokens, parents, depths, start: int = 0):
        self.widths.append(len(tokens) - start)
        return self.inner.eval_tree(cache, tokens, parents, depths, start)


def test_a_chain_stays_a_chain_and_ends_in_an_unevaluated_leaf(pair) -> None:
    _, same, _ = pair
    drafter = ModelDrafter(same, ModelDraftConfig.chain(4))
    draft = drafter.draft(same.engine.vocab.tokenize("the a the"), 20, 8)
    assert draft.tree.parents == [-1, 0, 1, 2, 3, 4]
    assert (draft.evaluated, draft.calls, max(draft.tree.depths)) == (4, 5, 5)
    drafter.accepted(Verified([0]))


def test_unlikely_candidates_are_not_evaluated(pair) -> None:
    """The tiny model is near uniform (its likeliest token about 2%): a 16-node tree expands only
    candidates of 25% and more, so it drafts the root's continuations in the context's call."""
    _, same, _ = pair
    drafter = ModelDrafter(same)
    draft = drafter.draft(same.engine.vocab.tokenize("the a the"), 16, 8)
    assert (draft.calls, draft.evaluated) == (1, 0)
    assert len(draft.tree) == 5 and set(draft.tree.parents[1:]) == {0}
    drafter.accepted(Verified([0]))
    looser = ModelDrafter(same, ModelDraftConfig(min_prob=0.01))
    draft = looser.draft(same.engine.vocab.tokenize("the a the"), 16, 8)
    assert draft.evaluated >= 1  # continuations of 1% and more are...
    assert max(draft.tree.depths) == 2  # ...and theirs, of about 0.02%, are leaves
    looser.accepted(Verified([0]))


def test_only_a_new_prompts_prefill_counts_as_the_drafts_catch_up(pair) -> None:
    """The planner leaves a draft's prefill out of what drafting a tree costs; the one or two
    tokens a step accepted are part of the step."""
    _, same, _ = pair
    same.engine.rewind(same.cache, 0)
    drafter = ModelDrafter(same, ModelDraftConfig(min_prob=0.0))
    context = same.engine.vocab.tokenize("def fib(n): return n if n < 2 else fib(n - 1) + fib(n - 2)")
    draft = drafter.draft(context, 8, 4)
    assert draft.catch_up_s > 0  # the whole prompt
    drafter.accepted(Verified(draft.tree.tokens[:2]))
    assert drafter.draft(context + [draft.tree.tokens[1], 7], 8, 4).catch_up_s == 0.0
