"""Draft-model speculation (chain and SpecExec tree) on tiny f32 models."""

from __future__ import annotations

from pathlib import Path

import pytest

from specrun.engines.llamacpp import LlamaCppConfig, LlamaCppEngine
from specrun.generate import Generation, GenerationConfig
from specrun.sampling import SamplingConfig
from specrun.speculate.draft_model import ModelDraftConfig, ModelDrafter, VocabMismatch, check_vocab_compatible
from specrun.speculate.factory import SpecConfig, make_speculator
from specrun.speculate.planner import AcceptanceStats, CostCurve, PlannedSpeculator
from tests.tiny_model import WORDS, TinySpec, build_tiny_model

GREEDY = SamplingConfig(temperature=0)
FLAT = CostCurve((1, 64), (1.0, 1.2))


@pytest.fixture(scope="module")
def pair(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """Target = the tiny model; drafts: the same model, and a different one (other weights)."""
    other = build_tiny_model(tmp_path_factory.mktemp("draft") / "other.gguf", TinySpec(seed=9))
    cfg = LlamaCppConfig(n_threads=1, max_tree_nodes=63)
    with LlamaCppEngine(tiny_model, cfg) as target, LlamaCppEngine(tiny_model, cfg) as same, \
            LlamaCppEngine(other, cfg) as different:
        for e in (target, same, different):
            e.open(1024)
        yield target, same, different


def generate(target, prompt, sampling, speculator=None, max_tokens=60) -> Generation:
    target.rewind(0)  # every run evaluates its whole prompt
    gen = Generation(target, target.vocab.tokenize(prompt), GenerationConfig(max_tokens, sampling), speculator)
    for _ in gen:
        pass
    return gen


def fixed(drafter: ModelDrafter, nodes: int, depth: int) -> PlannedSpeculator:
    return PlannedSpeculator("model", drafter, None, AcceptanceStats(), nodes, depth)


@pytest.mark.parametrize("config, nodes", [(ModelDraftConfig.chain(4), 5), (ModelDraftConfig(), 16),
                                           (ModelDraftConfig(top_k=2, nodes_per_pass=8, max_passes=3), 40)])
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
    """After each step the draft model's cache holds a prefix of the committed text."""
    target, same, _ = pair
    drafter = ModelDrafter(same, ModelDraftConfig())
    target.rewind(0)
    gen = Generation(target, target.vocab.tokenize("the a the"), GenerationConfig(40, GREEDY), fixed(drafter, 12, 4))
    steps = 0
    for _ in gen:
        committed = gen.prompt + gen.tokens
        assert list(same.tokens) == committed[: same.kv_len] and same.kv_len > len(gen.prompt) - 1
        steps += 1
    assert steps > 1 and gen.stats.accepted_tokens > 0


def test_vocab_compatibility(pair, tmp_path: Path) -> None:
    target, same, different = pair
    check_vocab_compatible(target.vocab, same.vocab)
    check_vocab_compatible(target.vocab, different.vocab)  # other weights, same tokenizer
    renamed = build_tiny_model(tmp_path / "renamed.gguf", TinySpec(words=("▁xyz",) + WORDS[1:]))
    with LlamaCppEngine(renamed, LlamaCppConfig(n_threads=1)) as r:
        with pytest.raises(VocabMismatch, match="token 259"):
            check_vocab_compatible(target.vocab, r.vocab)
