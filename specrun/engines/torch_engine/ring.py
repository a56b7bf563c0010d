"""The order every streamed placement keeps: a ring of slots running ahead of the compute.

A pass walks the units (layers, output slices) in order. Resident units are
handed out as they are; the others stream: the k-th transfer of the run goes
to slot k mod S and is issued once the slot's previous unit is done with, so
transfers run up to S units ahead and wrap around into the next pass. A pass
cut short (an error, Ctrl-C) or a failed transfer sends the ring back to the
first streamed unit. `DiskStream` (reads) and `RamStream` (host-to-device
copies) supply the transfers; the ordering lives here once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import torch

from specrun.engines.torch_engine.layout import Unit


@dataclass
class StreamCounters:
    """What streaming cost so far (all passes)."""

    passes: int = 0
    bytes_read: int = 0  # bytes read (or copied) by the ring (resident units not counted)
    wait_s: float = 0.0  # time the forward pass waited for a unit's bytes
    busy_s: float = 0.0  # wall time with at least one transfer in flight (where timed)


class SlotRing:
    """Subclasses call `_start_ring` once their slots exist, and supply the transfers."""

    units: list[Unit]  # a pass, in order
    streamed: list[Unit]  # the units that are not resident, in order
    resident: dict[int, torch.Tensor]  # unit index -> its bytes, kept where the compute reads them
    slots: list[torch.Tensor]  # buffers of the largest streamed unit, which transfers fill in turn
    counters: StreamCounters

    def _start_ring(self, n_slots: int) -> None:
        self._n_slots = n_slots
        self._issued = self._next = 0  # transfers issued; transfers consumed (and released)
        self._fill()

    @property
    def buffer_bytes(self) -> int:
        """Memory the stream holds: its slots and the resident units."""
        return sum(s.numel() for s in self.slots) + sum(b.numel() for b in self.resident.values())

    # --- what a stream supplies ---------------------------------------------------------

    def _issue(self, k: int, unit: Unit, slot: int) -> None:
        """Start transfer k: `unit` into `slot` (after the slot's previous use)."""
        raise NotImplementedError

    def _arrive(self, k: int, unit: Unit) -> int:
        """Wait until transfer k may be used; the bytes it moved."""
        raise NotImplementedError

    def _release(self, slot: int) -> None:
        """The compute is done with `slot`."""

    def _forget(self) -> None:
        """Drop the transfers ahead (the ring goes back to its first unit)."""
        raise NotImplementedError

    def _check(self) -> None:
        """Before each pass: what must still hold (the file unchanged)."""

    # --- the ring ------------------------------------------------------------------------

    def _fill(self) -> None:
        """Issue transfers until every slot holds or awaits a unit not yet consumed."""
        n = len(self.streamed)
        while n and self._issued < self._next + self._n_slots:
            k = self._issued
            self._issue(k, self.streamed[k % n], k % self._n_slots)
            self._issued += 1

    def _restart(self) -> None:
        self._forget()
        self._issued = self._next = 0

    def pass_units(self) -> Iterator[tuple[Unit, torch.Tensor]]:
        """One pass: each unit with its bytes (uint8 [unit.n_bytes]), valid until the next is asked for."""
        self._check()
        if self.streamed and self._next % len(self.streamed):
            self._restart()  # a pass was abandoned part-way
        self._fill()  # (after a failed transfer the ring was left empty: transfers start again only now)
        self.counters.passes += 1
        for unit in self.units:
            resident = self.resident.get(unit.index)
            if resident is not None:
                yield unit, resident
                continue
            k = self._next
            assert self.streamed[k % len(self.streamed)] is unit, "the ring lost its place"
            t = time.perf_counter()
            try:
                self.counters.bytes_read += self._arrive(k, unit)
            except BaseException:
                self._restart()  # the next pass starts from a clean ring, its transfers issued then
                raise
            self.counters.wait_s += time.perf_counter() - t
            slot = k % self._n_slots
            try:
                yield unit, self.slots[slot][:unit.n_bytes]
            finally:  # the slot is free once its unit is done with: refill it
                self._release(slot)
                self._next += 1
                self._fill()
