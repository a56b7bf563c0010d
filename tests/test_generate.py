"""The generation loop against a scripted engine (stop rules, UTF-8 streaming) and a tiny real one."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pytest

from specrun.engines import EngineConfig
from specrun.engines.llamacpp import LlamaCppEngine
from specrun.errors import UsageError
from specrun.generate import Generation, GenerationConfig
from specrun.sampling import SamplingConfig

GREEDY = SamplingConfig(temperature=0)


class ScriptedEngine:
    """Emits a fixed token script, whatever it is fed; tracks the cache like a real engine."""

    n_vocab = 8
    n_ctx_train = 64
    EOS = 7
    PIECES = {0: b"a", 1: b"\xc3", 2: b"\xa9", 3: b" ", 4: b"\xe2\x82", 5: b"\xac", 6: b"", 7: b""}

    def __init__(self, script: list[int], n_ctx: int = 64) -> None:
        self.script, self._n_ctx, self._kv, self.fed = script, n_ctx, 0, []

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return [0] * len(text)

    def piece(self, token: int) -> bytes:
        return self.PIECES[token]

    def is_eog(self, token: int) -> bool:
        return token == self.EOS

    def open(self, n_ctx: int) -> None:
        self._n_ctx = n_ctx

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    @property
    def kv_len(self) -> int:
        return self._kv

    def eval(self, tokens: Sequence[int]) -> np.ndarray:
        self._kv += len(tokens)
        self.fed.extend(tokens)
        nxt = self.script[min(len(self.fed) - 2, len(self.script) - 1)]  # the prompt is 2 tokens
        logits = np.zeros(self.n_vocab, dtype=np.float32)
        logits[nxt] = 1.0
        return logits

    def rewind(self, n_tokens: int) -> None:
        self._kv = min(self._kv, n_tokens)

    def close(self) -> None:
        pass


def run(engine: ScriptedEngine, max_tokens: int = 100) -> Generation:
    gen = Generation(engine, [0, 0], GenerationConfig(max_tokens=max_tokens, sampling=GREEDY))
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


def test_full_context_stops_with_its_own_reason() -> None:
    gen = run(ScriptedEngine([0] * 50, n_ctx=10))
    assert gen.stats.stop_reason == "context" and len(gen.tokens) == 9  # 2 + 8 cached, the 9th never fed


def test_incomplete_character_at_the_end_is_replaced_not_dropped() -> None:
    gen = run(ScriptedEngine([0, 1, 7]))
    assert gen.text == "a\ufffd"


def test_prompt_checks() -> None:
    with pytest.raises(UsageError, match="empty"):
        Generation(ScriptedEngine([7]), [], GenerationConfig())
    with pytest.raises(UsageError, match="context holds 4"):
        Generation(ScriptedEngine([7], n_ctx=4), [0] * 4, GenerationConfig())


def test_greedy_generation_equals_a_hand_written_argmax_loop(tiny_model: Path) -> None:
    with LlamaCppEngine(tiny_model, EngineConfig(n_threads=1)) as e:
        e.open(512)
        prompt = e.tokenize("def fib(n):")
        gen = Generation(e, prompt, GenerationConfig(max_tokens=40, sampling=GREEDY))
        list(gen)
        e.rewind(0)
        logits, expected = e.eval(prompt), []
        for _ in range(40):
            t = int(np.argmax(logits))
            if e.is_eog(t):
                break
            expected.append(t)
            logits = e.eval([t])
    assert gen.tokens == expected


def test_seeded_sampling_is_reproducible(tiny_model: Path) -> None:
    cfg = GenerationConfig(max_tokens=30, sampling=SamplingConfig(temperature=1.0, top_p=0.9, seed=5))
    outs = []
    with LlamaCppEngine(tiny_model, EngineConfig(n_threads=1)) as e:
        e.open(512)
        for _ in range(2):
            gen = Generation(e, e.tokenize("hello"), cfg)
            list(gen)
            outs.append(gen.tokens)
    assert outs[0] == outs[1] and len(outs[0]) > 0
