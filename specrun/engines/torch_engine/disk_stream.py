"""Weights read from disk on every pass, into a ring of a few aligned buffers.

Units kept resident are read once at start; the others stream through the
slots of a `ring.SlotRing`, so the reader threads run up to S units ahead of
the compute and wrap around into the next pass (its first layers load while
the draft model works). Reads use O_DIRECT (no page cache: the mode really reads the
disk every pass and its memory stays the buffers', whatever the model's size)
with several threads, each reading a chunk of the unit; where a filesystem
refuses O_DIRECT, buffered reads with posix_fadvise(DONTNEED) stand in, and a
notice says so. Every read is checked: a short read, an I/O error or a model
file that changed on disk becomes a one-line ModelFileError, never a hang.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import replace
from pathlib import Path

import torch

from specrun.engines.torch_engine.layout import ALIGN, Unit, ended_early, read_at, read_error
from specrun.engines.torch_engine.ring import SlotRing, StreamCounters
from specrun.errors import ModelFileError
from specrun.kernels.ggml_matmul import aligned_empty

READ_CHUNK = 8 << 20  # bytes per read call: several per unit, spread over the readers


def file_identity(path: Path) -> tuple[int, int, int, int]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ModelFileError(f"{path.name} disappeared while it was being read",
                             hint="keep the model file in place while specrun runs") from None
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns  # ctime: a rewrite whose mtime was set back


class DiskStream(SlotRing):
    def __init__(self, path: Path, units: list[Unit], resident: set[int], slots: int, readers: int = 4,
                 direct: bool = True) -> None:
        self.path, self.units = path, units
        self.identity = file_identity(path)
        self.streamed = [u for u in units if u.index not in resident]
        self.counters = StreamCounters()
        self.notices: list[str] = []
        self.direct = False
        self._fd = os.open(path, os.O_RDONLY)
        if direct:
            self._open_direct()
        self._lock = threading.Lock()
        self._in_flight, self._busy_since = 0, 0.0
        self._pool = ThreadPoolExecutor(max(1, readers), thread_name_prefix="specrun-read")
        self._reads: dict[int, list[Future]] = {}  # transfer number -> its chunks' reads
        self.resident: dict[int, torch.Tensor] = {}
        self.slots: list[torch.Tensor] = []
        try:
            self.resident = {u.index: self._read_now(u) for u in units if u.index in resident}
            size = max((u.n_bytes for u in self.streamed), default=0)
            self.slots = [aligned_empty(size, ALIGN) for _ in range(min(max(slots, 1), len(self.streamed)))]
            self._start_ring(len(self.slots))
        except BaseException:
            self.close()  # no reader thread or open file outlives a failed start
            raise

    # --- reading ---------------------------------------------------------------------

    def _open_direct(self) -> None:
        """O_DIRECT where the OS and filesystem take it (tmpfs and macOS do not): probed with one read."""
        flag = getattr(os, "O_DIRECT", 0)
        try:
            if not flag:
                raise OSError("O_DIRECT is not available on this system")
            fd = os.open(self.path, os.O_RDONLY | flag)
        except OSError as e:
            self.notices.append(f"direct reads refused for {self.path.name} ({e.strerror or e}): reading "
                                "through the page cache, dropped after each read")
            return
        probe = aligned_empty(ALIGN, ALIGN)
        try:
            os.preadv(fd, [probe.numpy()], 0)
        except OSError as e:
            os.close(fd)
            self.notices.append(f"direct reads refused for {self.path.name} ({e.strerror or e}): reading "
                                "through the page cache, dropped after each read")
            return
        os.close(self._fd)
        self._fd, self.direct = fd, True

    def _read_chunk(self, buf: torch.Tensor, offset: int) -> int:
        """Fill buf (a view of an aligned buffer) from the file at offset; returns the bytes read."""
        with self._lock:
            if self._in_flight == 0:
                self._busy_since = time.perf_counter()
            self._in_flight += 1
        try:
            done = read_at(self._fd, buf.numpy(), offset, self.direct)
            if not self.direct and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(self._fd, offset, len(buf), os.POSIX_FADV_DONTNEED)
            return done
        finally:
            with self._lock:
                self._in_flight -= 1
                if self._in_flight == 0:
                    self.counters.busy_s += time.perf_counter() - self._busy_since

    def _submit(self, unit: Unit, buf: torch.Tensor) -> list[Future]:
        return [self._pool.submit(self._read_chunk, buf[o:min(o + READ_CHUNK, unit.n_bytes)], unit.start + o)
                for o in range(0, unit.n_bytes, READ_CHUNK)]

    def _collect(self, unit: Unit, futures: list[Future]) -> int:
        """Wait for a unit's reads (returns the bytes read); errors become one line."""
        got, end = 0, max(s.offset + s.n_bytes for s in unit.spans)  # got: bytes read without a hole
        try:
            for i, f in enumerate(futures):  # chunk i covers [i * READ_CHUNK, ...) of the unit
                n = f.result()
                if got == i * READ_CHUNK:  # every earlier chunk came back whole
                    got += n
        except (OSError, ValueError) as e:
            raise read_error(self.path, e) from None
        if got < end:
            raise ended_early(self.path, f"a layer (read {got} of {end} bytes)")
        return got

    def _read_now(self, unit: Unit) -> torch.Tensor:
        buf = aligned_empty(unit.n_bytes, ALIGN)
        futures = self._submit(unit, buf)
        try:
            self._collect(unit, futures)
        finally:
            wait(futures)
        return buf

    # --- the ring's transfers -------------------------------------------------------------

    def _issue(self, k: int, unit: Unit, slot: int) -> None:
        self._reads[k] = self._submit(unit, self.slots[slot])

    def _arrive(self, k: int, unit: Unit) -> int:
        return self._collect(unit, self._reads.pop(k))

    def _forget(self) -> None:
        """Cancel the reads ahead, waiting for those already running (they write into the slots)."""
        for futures in self._reads.values():
            for f in futures:
                f.cancel()
        wait([f for fs in self._reads.values() for f in fs])
        self._reads.clear()

    def _check(self) -> None:
        if file_identity(self.path) != self.identity:
            raise ModelFileError(f"{self.path.name} changed on disk while specrun ran", hint="run again")

    def describe(self) -> str:
        """The placement as resolved (part of the calibration key: what a pass costs depends on it)."""
        return (f"offload disk, {'direct' if self.direct else 'buffered'} reads, {len(self.slots)} slots, "
                f"{len(self.resident)} of {len(self.units)} units resident")

    def snapshot(self) -> StreamCounters:
        """The counters now, the reads in flight counted up to this moment."""
        with self._lock:
            now = replace(self.counters)
            if self._in_flight:
                now.busy_s += time.perf_counter() - self._busy_since
        return now

    @property
    def bytes_per_pass(self) -> int:
        """Bytes read per pass: the streamed units' aligned ranges, cut at the end of the file."""
        return sum(min(u.n_bytes, self.identity[1] - u.start) for u in self.streamed)

    def measure_throughput(self) -> float:
        """Bytes per second of a pass read with no compute (the disk's limit for this placement)."""
        saved = replace(self.counters)
        self._restart()
        t = time.perf_counter()
        for _ in self.pass_units():
            pass
        seconds = time.perf_counter() - t
        self.counters = saved
        self._restart()
        self._fill()
        return self.bytes_per_pass / seconds if seconds > 0 else 0.0

    def close(self) -> None:
        self._forget()
        self._pool.shutdown(wait=True)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
