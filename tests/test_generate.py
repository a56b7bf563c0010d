"""The generation loop against a scripted engine (stop rules, UTF-8 streaming) and a tiny real one."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pytest

from specrun.engines.base import Cache, EngineMixin
from specrun.engines.llamacpp import LlamaCppConfig, LlamaCppEngine
from specrun.errors import UsageError
from specrun.generate import Generation, GenerationConfig
from specrun.sampling import SamplingConfig
from tests.fakes import ArrayLogits

GREEDY = SamplingConfig(temperature=0)


class ScriptedVocab:
    n_vocab = 8
    EOS = 7
    PIECES = {0: b"a", 1: b"\xc3", 2: b"\xa9", 3: b" ", 4: b"\xe2\x82", 5: b"\xac", 6: b"", 7: b""}

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return [0] * len(text)

    def piece(self, token: int) -> bytes:
        return self.PIECES[token]

    def is_eog(self, token: int) -> bool:
        return token == self.EOS


class ScriptedEngine(EngineMixin):
    """Emits a fixed token script, whatever it is fed; its caches keep their tokens like a real engine's."""

    n_ctx_train = 64
    max_tree_nodes = 0

    def __init__(self, script: list[int]) -> None:
        self.script, self.fed, self.vocab = script, [], ScriptedVocab()

    def new_cache(self, n_ctx: int) -> Cache:
        return self._made(Cache(n_ctx))

    def eval(self, cache: Cache, tokens: Sequence[int]) -> ArrayLogits:
        self._own(cache)
        cache.appended(tokens)
        self.fed.extend(tokens)
        nxt = self.script[min(len(self.fed) - 2, len(self.script) - 1)]  # the prompt is 2 tokens
        logits = np.zeros((1, self.vocab.n_vocab), dtype=np.float32)
        logits[0, nxt] = 1.0
        return ArrayLogits(logits)

    def rewind(self, cache: Cache, n_tokens: int) -> None:
        self._own(cache)
        cache.cut(n_tokens)

    def close(self) -> None:
        self.close_caches()


def run(engine: ScriptedEngine, max_tokens: int = 100, n_ctx: int = 64) -> Generation:
    gen = Generation(engine, engine.new_cache(n_ctx), [0, 0], GenerationConfig(max_tokens=max_tokens, sampling=GREEDY))
    steps = list(gen)
    assert "".join(s.text for s in steps) == gen.text
    return gen


def test_multibyte_characters_split_across_tokens_stream_whole() -> None:
    gen = run(ScriptedEngine([0, 1, 2, 3, 4, 5, 7]))
    assert gen.text == "aé €"
    assert gen.stats.stop_reason == "eos" and gen.stats.generated_tokens == 6
    assert gen.tokens == [0, 1, 2, 3, 4, 5]


def test_max_tokens_stops_without_an_extra_forward_pass() -> None:
    engine = ScriptedEngine([0] * 50)
    gen = run(engine, max_tokens=5)
    assert gen.stats.stop_reason == "length" and gen.tokens == [0] * 5
    assert engine.fed == [0, 0] + [0] * 4  # the 5th token is never evaluated
    assert gen.stats.target_calls == 5


def test_each_token_is_shown_as_soon_as_it_is_drawn() -> None:
    """The prefill's token comes out before any decoding pass, and each pass's token with that
    pass, not one pass later (a streamed 70B takes a second or more a pass)."""
    engine = ScriptedEngine([0, 3, 0, 3, 7])
    gen = Generation(engine, engine.new_cache(64), [0, 0], GenerationConfig(max_tokens=100, sampling=GREEDY))
    seen = []
    for step in gen:
        seen.append((step.tokens, step.target_calls, len(engine.fed)))
    assert seen[0] == ([0], 0, 2)  # only the prompt was evaluated
    # every later step: the pass fed the previous token and drew the one it shows
    assert seen[1:] == [([3], 1, 3), ([0], 1, 4), ([3], 1, 5), ([], 1, 6)]  # the last pass drew EOS
    assert gen.tokens == [0, 3, 0, 3] and gen.stats.stop_reason == "eos"


def test_the_rate_counts_what_decoding_passes_produced_over_their_time() -> None:
    """As llama.cpp's eval rate: the prefill draws the first token (its time is the prefill's),
    each later pass one more, the end-of-generation token included; a chat's totals likewise."""
    from specrun.generate import GenerationStats

    with_eos, at_length = run(ScriptedEngine([0, 1, 2, 3, 4, 5, 7])), run(ScriptedEngine([0] * 50), max_tokens=5)
    assert with_eos.stats.target_calls == 7 and with_eos.stats.decoded_tokens == 6  # 6 tokens + EOS, less the first
    assert at_length.stats.target_calls == 5 and at_length.stats.decoded_tokens == 4
    for gen in (with_eos, at_length):
        s = gen.stats
        assert s.tokens_per_s == pytest.approx((s.target_calls - 1) / s.decode_s)  # a token a decoding pass
    totals = GenerationStats()
    totals.add(with_eos.stats)
    totals.add(at_length.stats)
    assert totals.generations == 2 and totals.decoded_tokens == 10


def test_full_context_stops_with_its_own_reason() -> None:
    gen = run(ScriptedEngine([0] * 50), n_ctx=10)
    assert gen.stats.stop_reason == "context" and len(gen.tokens) == 9  # 2 + 8 cached, the 9th never fed


def test_incomplete_character_at_the_end_is_replaced_not_dropped() -> None:
    gen = run(ScriptedEngine([0, 1, 7]))
    assert gen.text == "a\ufffd"


def test_prompt_checks() -> None:
    engine = ScriptedEngine([7])
    with pytest.raises(UsageError, match="empty"):
        Generation(engine, engine.new_cache(64), [], GenerationConfig())
    with pytest.raises(UsageError, match="context holds 4"):
        Generation(engine, engine.new_cache(4), [0] * 4, GenerationConfig())


def test_greedy_generation_equals_a_hand_written_argmax_loop(tiny_model: Path) -> None:
    with LlamaCppEngine(tiny_model, LlamaCppConfig(n_threads=1)) as e:
        cache = e.new_cache(512)
        prompt = e.vocab.tokenize("def fib(n):")
        gen = Generation(e, cache, prompt, GenerationConfig(max_tokens=40, sampling=GREEDY))
        list(gen)
        e.rewind(cache, 0)
        logits, expected = e.eval(cache, prompt).row(0), []
        for _ in range(40):
            t = int(np.argmax(logits))
            if e.vocab.is_eog(t):
                break
            expected.append(t)
            logits = e.eval(cache, [t]).row(0)
    assert gen.tokens == expected


def test_seeded_sampling_is_reproducible_and_the_seed_matters(tiny_model: Path) -> None:
    outs = []
    with LlamaCppEngine(tiny_model, LlamaCppConfig(n_threads=1)) as e:
        cache = e.new_cache(512)
        for seed in (5, 5, 6):
            cfg = GenerationConfig(max_tokens=30, sampling=SamplingConfig(temperature=1.0, top_p=0.9, seed=seed))
            gen = Generation(e, cache, e.vocab.tokenize("hello"), cfg)
            list(gen)
            outs.append(gen.tokens)
    assert outs[0] == outs[1] and len(outs[0]) > 0
    assert outs[2] != outs[0]  # a different seed draws differently


def test_a_second_generation_reuses_the_cached_prompt(tiny_model: Path) -> None:
    """The cache remembers its tokens: a longer prompt re-evaluates only its new tokens."""
    with LlamaCppEngine(tiny_model, LlamaCppConfig(n_threads=1)) as e:
        cache = e.new_cache(512)
        first = Generation(e, cache, e.vocab.tokenize("hello world"), GenerationConfig(max_tokens=5, sampling=GREEDY))
        list(first)
        prompt = first.prompt + first.tokens + e.vocab.tokenize(" the a", add_special=False)
        second = Generation(e, cache, prompt, GenerationConfig(max_tokens=5, sampling=GREEDY))
        list(second)
        assert second.stats.reused_tokens == len(first.prompt) + len(first.tokens) - 1  # the last was never fed
        e.rewind(cache, 0)
        fresh = Generation(e, cache, prompt, GenerationConfig(max_tokens=5, sampling=GREEDY))
        list(fresh)
    assert fresh.stats.reused_tokens == 0 and fresh.tokens == second.tokens
