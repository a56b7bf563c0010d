"""Offloaded placements: the model's weights come to the compute unit by unit, every pass.

`open_streamed` cuts the GGUF file into units (layout.py), decides which stay
resident within the budgets, and builds the stream: `DiskStream` (the file,
read each pass) or `RamStream` (pinned RAM, copied to the GPU each pass). The
forward pass sees a `StreamedSource`: decoder layers and the output matrix
built as views of each unit's bytes while they are in their slot. Token
embeddings are read row by row from the file: a pass needs only its tokens'.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from specrun.engines.torch_engine.arch import ModelArgs
from specrun.engines.torch_engine.config import OffloadConfig
from specrun.engines.torch_engine.disk_stream import DiskStream
from specrun.engines.torch_engine.layout import (ALIGN, Unit, ended_early, layer_weights, linear, plan_units, read_at,
                                                  read_error)
from specrun.engines.torch_engine.ram_stream import CopyEngine, CudaCopyEngine, RamStream
from specrun.engines.torch_engine.ring import StreamCounters
from specrun.engines.torch_engine.weights import GgufTensors, LayerWeights
from specrun.errors import UsageError
from specrun.gguf_file import GGUFInfo
from specrun.kernels import dequant

MIN_SLOTS = 2  # one unit computing while the next one arrives
READ_AHEAD = 512 << 20  # disk: bytes the readers may run ahead of the compute, into the next pass
RAM_SLOTS = 3  # ram: device slots (host-to-device copies keep up with a layer's compute)


class Stream:
    """What the source needs of a stream (DiskStream and RamStream both are one)."""

    notices: list[str]
    bytes_per_pass: int
    buffer_bytes: int

    def pass_units(self) -> Iterator[tuple[Unit, torch.Tensor]]: ...

    def snapshot(self) -> StreamCounters: ...

    def describe(self) -> str: ...

    def close(self) -> None: ...


class FileRowEmbedding:
    """Token embeddings read from the file a row at a time: a pass needs a few of 150k rows."""

    nbytes = 0

    def __init__(self, path: Path, offset: int, qtype: int, shape: tuple[int, ...], device: torch.device) -> None:
        self._fd, self.path = os.open(path, os.O_RDONLY), path
        self.offset, self.qtype, self.device = offset, qtype, device
        self.n_embd = shape[1]
        self.row_bytes = dequant.row_bytes(qtype, shape[1])

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        try:
            rows = [os.pread(self._fd, self.row_bytes, self.offset + int(i) * self.row_bytes) for i in ids.tolist()]
        except OSError as e:
            raise read_error(self.path, e) from None
        if any(len(r) != self.row_bytes for r in rows):
            raise ended_early(self.path, "an embedding row")
        raw = torch.frombuffer(bytearray(b"".join(rows)), dtype=torch.uint8).view(len(rows), self.row_bytes)
        return dequant.dequantize(raw, self.qtype, (len(rows), self.n_embd), torch.float32).to(self.device)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@dataclass
class StreamedSource:
    """Layers and logits for the forward pass, from a stream (see model.Transformer)."""

    stream: Stream
    args: ModelArgs
    dtype: torch.dtype
    device: torch.device

    def __post_init__(self) -> None:
        self._pass: Iterator[tuple[Unit, torch.Tensor]] | None = None

    def layers(self) -> Iterator[LayerWeights]:
        if self._pass is not None:
            self._pass.close()  # a pass cut short (an error, Ctrl-C): its slot is released now
        self._pass = self.stream.pass_units()
        for _ in range(self.args.n_layer):
            unit, buf = next(self._pass)
            yield layer_weights(unit, buf, self.args, self.dtype)

    def output(self, x: torch.Tensor) -> torch.Tensor:
        """x [m, n_embd] -> float32 logits [m, n_vocab], slice by slice (read even when m is 0:
        the stream's order is fixed)."""
        assert self._pass is not None
        y = torch.empty(x.shape[0], self.args.n_vocab, dtype=torch.float32, device=x.device)
        for unit, buf in self._pass:
            r0, r1 = unit.rows
            if x.shape[0]:
                y[:, r0:r1] = linear(buf, unit.spans[0], None, torch.float32)(x)
        self._pass = None
        return y

    def close(self) -> None:
        """End a pass cut short, before the stream under it closes."""
        if self._pass is not None:
            self._pass.close()
            self._pass = None


def plan_residency(units: list[Unit], budget: int, slots: int, what: str) -> tuple[set[int], int]:
    """(resident unit indices, slots) for a budget in bytes: the slots first, then whole units in
    pass order while they fit. UsageError when not even MIN_SLOTS slots fit."""
    biggest = max(u.n_bytes for u in units)
    if budget < MIN_SLOTS * biggest:
        raise UsageError(f"{what} {_gb(budget)} is too small to stream this model: its layers need "
                         f"{MIN_SLOTS} x {_gb(biggest)} of buffers", hint=f"raise {what} to {_gb(MIN_SLOTS * biggest)} or more")
    if budget >= sum(u.n_bytes for u in units):
        return {u.index for u in units}, 0
    slots = max(MIN_SLOTS, min(slots, budget // biggest))
    left, resident = budget - slots * biggest, set()
    for u in units:
        if u.n_bytes <= left:
            resident.add(u.index)
            left -= u.n_bytes
    return resident, slots


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def open_streamed(path: Path, info: GGUFInfo, tensors: GgufTensors, args: ModelArgs, device: torch.device,
                  dtype: torch.dtype, offload: OffloadConfig,
                  copier: CopyEngine | None = None) -> tuple[Stream, StreamedSource, FileRowEmbedding]:
    units = plan_units(info, args)
    if offload.mode == "disk":
        resident, slots = disk_plan(units, offload)
        stream: Stream = DiskStream(path, units, resident, slots, offload.readers)
    elif offload.mode == "ram":
        stream = _ram_stream(path, units, device, offload, copier)
    else:
        raise ValueError(f"not a streamed placement: {offload.mode}")
    embd = tensors.info["token_embd.weight"]  # opened last: nothing is left open when the stream fails
    embed = FileRowEmbedding(path, embd.offset, embd.type, embd.shape, device)
    return stream, StreamedSource(stream, args, dtype, device), embed


def disk_plan(units: list[Unit], offload: OffloadConfig) -> tuple[set[int], int]:
    """(resident units, slots) of the disk placement: without --ram every unit streams through
    READ_AHEAD bytes of slots; with it, the slots come first and resident units fill the rest."""
    biggest = max(u.n_bytes for u in units)
    wanted = offload.slots or max(3, min(len(units) - 1, -(-READ_AHEAD // biggest)))
    if offload.ram is None:
        return set(), min(wanted, len(units))
    return plan_residency(units, offload.ram, wanted, "--ram")


def file_units(path: Path) -> list[Unit]:
    """The units a GGUF file streams in (from its header; nothing is read)."""
    from specrun.gguf_file import read_gguf

    info = read_gguf(path)
    return plan_units(info, ModelArgs.of_gguf_file(path.name, info.metadata, GgufTensors(path, info)))


def _ram_stream(path: Path, units: list[Unit], device: torch.device, offload: OffloadConfig,
                copier: CopyEngine | None) -> RamStream:
    """Resident units on the device within --gpu-memory; the rest in pinned RAM, within --ram."""
    n_slots = offload.slots or RAM_SLOTS
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = offload.gpu_memory if offload.gpu_memory is not None else int(free * 0.8)
        if budget > free:
            raise UsageError(f"--gpu-memory {_gb(budget)} is more than the GPU has free ({_gb(free)})")
    else:  # the slot logic on a CPU, for tests (with a fake copy engine)
        default = n_slots * max(u.n_bytes for u in units)
        budget = offload.gpu_memory if offload.gpu_memory is not None else default
    resident, slots = plan_residency(units, budget, n_slots, "--gpu-memory")
    host_bytes = sum(u.n_bytes for u in units if u.index not in resident)
    ram = offload.ram if offload.ram is not None else host_bytes  # the memory plan sets it; tests may not
    if host_bytes > ram:
        raise UsageError(f"the layers streamed from RAM need {_gb(host_bytes)}, and only {_gb(ram)} of RAM "
                         "is allowed or free", hint="use --offload disk, or raise --ram / --gpu-memory")
    pin, size = device.type == "cuda", path.stat().st_size
    with open(path, "rb", buffering=0) as f:
        def read(u: Unit) -> torch.Tensor:
            buf = torch.empty(min(u.n_bytes, size - u.start), dtype=torch.uint8, pin_memory=pin)
            try:
                got = read_at(f.fileno(), buf.numpy(), u.start)
            except OSError as e:
                raise read_error(path, e) from None
            if got < max(s.offset + s.n_bytes for s in u.spans):
                raise ended_early(path, "a layer")
            return buf
        host = {u.index: read(u) for u in units if u.index not in resident}
        resident_bufs = {u.index: read(u).to(device) for u in units if u.index in resident}
    biggest = max((u.n_bytes for u in units if u.index in host), default=ALIGN)
    slot_bufs = [torch.empty(biggest, dtype=torch.uint8, device=device) for _ in range(slots if host else 0)]
    return RamStream(units, host, resident_bufs, slot_bufs, copier or CudaCopyEngine(device))
