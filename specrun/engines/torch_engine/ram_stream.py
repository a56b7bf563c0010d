"""Weights streamed from pinned host memory to a few GPU slots on every pass.

Each streamed unit (a layer, an output slice) is packed once into its own
pinned host buffer, in its quantized form. A dedicated copy stream fills K
device slots ahead of the compute: the k-th copy of the run goes to slot
k mod K once the compute has finished with that slot's previous unit, and
the compute stream waits for the copy's event before using it. Nothing
synchronizes the host per layer (Sequoia and UMbreLLa call
`torch.cuda.synchronize()` after every layer, which serializes copy and
compute); the ring wraps around, so the next pass's first layers are copied
while this pass ends and while the draft model works. Units that fit the GPU
budget stay resident and are never copied.

The ordering lives here once, over a `CopyEngine`: CUDA streams and events
in use, a recording fake in the tests (the same logic, checked on a CPU).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Protocol

import torch

from specrun.engines.torch_engine.disk_stream import StreamCounters
from specrun.engines.torch_engine.layout import Unit


class CopyEngine(Protocol):
    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: Any | None) -> Any:
        """On the copy stream: wait for event `after` (the slot's last use), copy src into dst;
        returns an event marking the copy done."""
        ...

    def wait(self, event: Any) -> None:
        """Make the compute stream wait for `event` (no host synchronization)."""
        ...

    def record(self) -> Any:
        """An event on the compute stream after everything issued so far."""
        ...


class CudaCopyEngine:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.stream.wait_stream(torch.cuda.current_stream(device))  # the slots' allocation comes first

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: Any | None) -> Any:
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return done

    def wait(self, event: Any) -> None:
        torch.cuda.current_stream(self.device).wait_event(event)

    def synchronize(self) -> None:
        self.stream.synchronize()

    def record(self) -> Any:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event


@dataclass
class RamStream:
    """units: every unit of a pass, in order; host: pinned bytes of each streamed unit (by index);
    resident: device bytes of each resident unit; slots: device buffers of the largest streamed unit."""

    units: list[Unit]
    host: dict[int, torch.Tensor]
    resident: dict[int, torch.Tensor]
    slots: list[torch.Tensor]
    copier: CopyEngine
    counters: StreamCounters = field(default_factory=StreamCounters)
    notices: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.streamed = [u for u in self.units if u.index in self.host]
        self._ready: dict[int, Any] = {}  # copy number -> event marking its copy done
        self._free: list[Any | None] = [None] * len(self.slots)  # slot -> event marking its last use
        self._issued = self._next = 0
        if self.streamed and not self.slots:
            raise ValueError("streamed units need at least one slot")
        self._fill()

    def _fill(self) -> None:
        n = len(self.streamed)
        while n and self._issued < self._next + len(self.slots):
            k = self._issued
            unit, slot = self.streamed[k % n], k % len(self.slots)
            src = self.host[unit.index]
            self._ready[k] = self.copier.copy(self.slots[slot][:src.numel()], src, self._free[slot])
            self._issued += 1

    def pass_units(self) -> Iterator[tuple[Unit, torch.Tensor]]:
        if self.streamed and self._next % len(self.streamed):
            self._issued = self._next = 0  # a pass was abandoned part-way: copies in flight are
            self._ready.clear()  # ordered before the re-issued ones on the same copy stream
            self._fill()
        self.counters.passes += 1
        for unit in self.units:
            if unit.index in self.resident:
                yield unit, self.resident[unit.index]
                continue
            k = self._next
            t = time.perf_counter()
            self.copier.wait(self._ready.pop(k))
            self.counters.wait_s += time.perf_counter() - t
            self.counters.bytes_read += self.host[unit.index].numel()
            slot = k % len(self.slots)
            try:
                yield unit, self.slots[slot][:unit.n_bytes]
            finally:
                self._free[slot] = self.copier.record()
                self._next += 1
                self._fill()

    def describe(self) -> str:
        return f"offload ram, {len(self.slots)} slots, {len(self.resident)} of {len(self.units)} units resident"

    def snapshot(self) -> StreamCounters:
        return replace(self.counters)  # copies are not timed on the host (that would sync)

    @property
    def bytes_per_pass(self) -> int:
        return sum(self.host[u.index].numel() for u in self.streamed)

    @property
    def buffer_bytes(self) -> int:
        return sum(s.numel() for s in self.slots) + sum(b.numel() for b in self.resident.values())

    def close(self) -> None:
        """Wait for copies in flight: their slots are freed next, and memory still being written
        must not go back to the allocator."""
        sync = getattr(self.copier, "synchronize", None)
        if sync is not None:
            sync()
        self._ready.clear()
