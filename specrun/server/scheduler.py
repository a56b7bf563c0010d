"""Continuous batching for `specrun serve`: one thread owns the target and runs the passes.

Requests arrive from the HTTP side on any thread (`submit`); between passes the
scheduler lets waiting requests join (up to `parallel` decoding at once, each in a
cache of its own, reused when a sequence ends) and drops those whose client went
away. Every pass is one `BatchGeneration.step`: the sequences' trees verified
together. Each step's text goes back to its request through a callback the HTTP
side gives (it hands it to its event loop).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from specrun.batched import BatchGeneration
from specrun.generate import Generation, GenerationConfig
from specrun.sampling import SamplingConfig
from specrun.session import Session
from specrun.speculate.factory import SpecConfig


@dataclass
class Event:
    """What a request hears: text as it comes, then once `done` (with the stop reason and counts),
    or an `error`."""

    text: str = ""
    done: bool = False
    stop_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int
    sampling: SamplingConfig
    send: Callable[[Event], None]  # called on the scheduler's thread
    cancelled: threading.Event = field(default_factory=threading.Event)
    received: float = field(default_factory=time.perf_counter)


@dataclass
class Counters:
    """What `/metrics` shows."""

    requests: int = 0  # finished, by any reason
    tokens: int = 0  # generated, over all requests
    passes: int = 0
    nodes: int = 0
    active: int = 0
    waiting: int = 0
    latency_s: list[float] = field(default_factory=list)  # the last 100 requests', received to done


class Scheduler:
    """The target's passes on one thread, shared by up to `parallel` requests at once."""

    def __init__(self, session: Session, spec: SpecConfig, n_ctx: int, parallel: int,
                 log: Callable[[str], None] = lambda _: None) -> None:
        self.session, self.spec, self.n_ctx, self.parallel, self.log = session, spec, n_ctx, parallel, log
        self.engine = session.target
        self._waiting: queue.Queue[Request] = queue.Queue()
        self._stop = threading.Event()
        self.counters = Counters()
        cost = session.calibration.cost if session.calibration is not None else None
        self.batch = BatchGeneration(self.engine, [], max(self.engine.max_tree_nodes, 1), cost)
        self._owner: dict[int, Request] = {}
        self._thread = threading.Thread(target=self._run, name="specrun-scheduler", daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> None:
        self.counters.waiting += 1
        self._waiting.put(request)

    def close(self) -> None:
        """Stop after the pass under way; requests still running hear an error."""
        self._stop.set()
        self._thread.join()
        for request in self._owner.values():
            request.send(Event(error="the server is shutting down"))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._admit()
                if not self.batch.active:
                    continue
                self._pass()
            except Exception as e:  # a failed pass fails its requests, not the server
                self.log(f"error in a pass: {e}")
                for index, request in list(self._owner.items()):
                    request.send(Event(error=f"generation failed: {e}"))
                    self.batch.leave(index)
                    self._end(index)

    def _admit(self) -> None:
        """Let waiting requests join while there is room, their prefills sharing passes; wait
        briefly when nothing runs."""
        joining: list[tuple[Request, Generation]] = []
        while len(self.batch.active) + len(joining) < self.parallel:
            try:
                request = self._waiting.get(timeout=0.05 if not self.batch.active and not joining else 0)
            except queue.Empty:
                break
            self.counters.waiting -= 1
            if request.cancelled.is_set():
                continue
            try:
                joining.append((request, self.session.sequence(
                    request.prompt, GenerationConfig(request.max_tokens, request.sampling), self.spec, self.n_ctx)))
            except Exception as e:  # this request's alone (its prompt, say): it hears why, the others go on
                request.send(Event(error=f"generation failed: {e}"))
        if not joining:
            return
        try:
            joined = self.batch.join_many([g for _, g in joining])
        except Exception as e:  # the prefill failed: none of them joined
            for request, g in joining:
                request.send(Event(error=f"generation failed: {e}"))
                self.session.sequence_ended(g)
            raise  # (_run tells the requests in flight)
        for (request, _), (index, steps) in zip(joining, joined):
            self._owner[index] = request
            self.counters.active = len(self.batch.active)
            self._send(index, "".join(s.text for s in steps))

    def _pass(self) -> None:
        for index, request in list(self._owner.items()):
            if request.cancelled.is_set():  # its client went away: it leaves now
                self.batch.leave(index)
                self.log(f"request cancelled after {self.batch.generations[index].stats.generated_tokens} tokens "
                         f"(the client went away or a stop string ended it)")
                self._end(index)
        before = self.batch.stats.nodes
        texts: dict[int, str] = {}
        for index, step in self.batch.step():
            texts[index] = texts.get(index, "") + step.text
        self.counters.passes += 1
        self.counters.nodes += self.batch.stats.nodes - before
        for index in list(self._owner):  # a sequence may end without a step of its own (the context is full)
            if index in texts or index not in self.batch.active:
                self._send(index, texts.get(index, ""))

    def _send(self, index: int, text: str) -> None:
        request = self._owner[index]
        if text:
            request.send(Event(text=text))
        g = self.batch.generations[index]
        if index not in self.batch.active:
            s = g.stats
            request.send(Event(done=True, stop_reason=s.stop_reason, prompt_tokens=s.prompt_tokens,
                               completion_tokens=s.generated_tokens))
            self.counters.tokens += s.generated_tokens
            self.counters.latency_s = (self.counters.latency_s + [time.perf_counter() - request.received])[-100:]
            self.log(f"request done: {s.prompt_tokens} prompt tokens, {s.generated_tokens} generated, stopped by "
                     f"{s.stop_reason}, {s.tokens_per_call:.2f} tokens a pass, "
                     f"{time.perf_counter() - request.received:.2f} s")
            self._end(index)

    def _end(self, index: int) -> None:
        """The request is over: its cache serves the next one, its generation is forgotten."""
        self._owner.pop(index, None)
        self.session.sequence_ended(self.batch.generations[index])
        self.batch.release(index)
        self.counters.requests += 1
        self.counters.active = len(self.batch.active)
