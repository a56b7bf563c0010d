"""Weights streamed from pinned host memory to a few GPU slots on every pass.

Each streamed unit (a layer, an output slice) is packed once into its own
pinned host buffer, in its quantized form. A dedicated copy stream fills the
K device slots of a `ring.SlotRing` ahead of the compute: a copy into a slot
waits for the event marking the compute's last use of it, and the compute
stream waits for the copy's event before using it. Nothing
synchronizes the host per layer (Sequoia and UMbreLLa call
`torch.cuda.synchronize()` after every layer, which serializes copy and
compute); the ring wraps around, so the next pass's first layers are copied
while this pass ends and while the draft model works. Units that fit the GPU
budget stay resident and are never copied.

The events go through a `CopyEngine`: CUDA streams and events in use, a
recording fake in the tests (the same logic, checked on a CPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from specrun.engines.torch_engine.layout import Unit
from specrun.engines.torch_engine.ring import SlotRing, StreamCounters


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
class RamStream(SlotRing):
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
        if self.streamed and not self.slots:
            raise ValueError("streamed units need at least one slot")
        self._start_ring(len(self.slots))

    def _issue(self, k: int, unit: Unit, slot: int) -> None:
        src = self.host[unit.index]
        self._ready[k] = self.copier.copy(self.slots[slot][:src.numel()], src, self._free[slot])

    def _arrive(self, k: int, unit: Unit) -> int:
        self.copier.wait(self._ready.pop(k))
        return self.host[unit.index].numel()

    def _release(self, slot: int) -> None:
        self._free[slot] = self.copier.record()

    def _forget(self) -> None:
        self._ready.clear()  # copies in flight are ordered before re-issued ones on the same copy stream

    def describe(self) -> str:
        return f"offload ram, {len(self.slots)} slots, {len(self.resident)} of {len(self.units)} units resident"

    def snapshot(self) -> StreamCounters:
        return replace(self.counters)  # copies are not timed on the host (that would sync)

    @property
    def bytes_per_pass(self) -> int:
        return sum(self.host[u.index].numel() for u in self.streamed)

    def close(self) -> None:
        """Wait for copies in flight: their slots are freed next, and memory still being written
        must not go back to the allocator."""
        sync = getattr(self.copier, "synchronize", None)
        if sync is not None:
            sync()
        self._ready.clear()
