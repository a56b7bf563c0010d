"""The generation loop: prompt tokens in, a stream of steps out.

One loop for every way of decoding. Each step yields the tokens it committed
(one for plain decoding; speculative steps will commit several per target
call) with their text and per-step stats, so `run`, `chat` and `bench` all
consume the same contract. The engine does the forward passes; this module
only decides what to feed it and when to stop.
"""

from __future__ import annotations

import codecs
import time
from dataclasses import dataclass, field
from typing import Iterator

from specrun.engines.base import Engine
from specrun.errors import UsageError
from specrun.sampling import SamplingConfig, sample


@dataclass(frozen=True)
class GenerationConfig:
    max_tokens: int = 256
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


@dataclass(frozen=True)
class Step:
    """What one step committed."""

    tokens: list[int]
    text: str  # their text; '' while a UTF-8 character is still incomplete
    target_calls: int  # forward passes of the target model this step
    seconds: float


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    target_calls: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    stop_reason: str = ""  # "eos", "length", "context" or "interrupted"

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.decode_s if self.decode_s > 0 else 0.0


class Generation:
    """Iterate to generate; read `stats` (filled as it goes) and `text` afterwards."""

    def __init__(self, engine: Engine, prompt: list[int], config: GenerationConfig) -> None:
        if not prompt:
            raise UsageError("the prompt is empty", hint="pass a prompt as an argument or on stdin")
        if len(prompt) >= engine.n_ctx:
            raise UsageError(
                f"the prompt is {len(prompt)} tokens; the context holds {engine.n_ctx}",
                hint="shorten the prompt or raise --ctx",
            )
        self.engine, self.prompt, self.config = engine, prompt, config
        self.stats = GenerationStats(prompt_tokens=len(prompt))
        self.tokens: list[int] = []
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self._text)

    def __iter__(self) -> Iterator[Step]:
        engine, cfg, stats = self.engine, self.config, self.stats
        rng = cfg.sampling.rng()
        stats.stop_reason = "interrupted"  # until the loop ends by itself
        t0 = time.perf_counter()
        engine.rewind(0)
        logits = engine.eval(self.prompt)
        stats.prefill_s = time.perf_counter() - t0
        stats.target_calls += 1
        while True:
            t = time.perf_counter()
            token = sample(logits, cfg.sampling, rng)
            if engine.is_eog(token):
                stats.stop_reason = "eos"
                break
            self.tokens.append(token)
            stats.generated_tokens += 1
            done = self._stop_reason()
            if done is None:
                logits = engine.eval([token])
                stats.target_calls += 1
            dt = time.perf_counter() - t
            stats.decode_s += dt
            yield self._step([token], 0 if done else 1, dt)
            if done is not None:
                stats.stop_reason = done
                break
        tail = self._decoder.decode(b"", final=True)
        if tail:
            self._text.append(tail)
            yield Step([], tail, 0, 0.0)

    def _stop_reason(self) -> str | None:
        if self.stats.generated_tokens >= self.config.max_tokens:
            return "length"
        if self.engine.kv_len + 1 > self.engine.n_ctx:
            return "context"
        return None

    def _step(self, tokens: list[int], calls: int, seconds: float) -> Step:
        text = self._decoder.decode(b"".join(self.engine.piece(t) for t in tokens))
        self._text.append(text)
        return Step(tokens, text, calls, seconds)
