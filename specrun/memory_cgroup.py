"""Running a command inside a memory limit: a child memory cgroup, as a container or a slice gives.

`specrun bench --memory-limit` runs every mode (and llama.cpp's peer) in one, so
a user sees on their own machine what a model bigger than their RAM does; the
tests use one to check that a streamed run finishes under a limit below the
model's size. A child cgroup can be made where this process may write under
its own cgroup (root, or a delegated subtree): cgroup v1's memory controller
(`memory.limit_in_bytes`, peak `memory.max_usage_in_bytes`) or cgroup v2
(`memory.max`, peak `memory.peak`, kills in `memory.events`). Where it cannot,
`ChildCgroup` raises `CgroupUnavailable` with one line saying why.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specrun.errors import UsageError
from specrun.memory_limit import SystemPaths, memory_cgroups, read_file, read_stat

_count = itertools.count()


class CgroupUnavailable(UsageError):
    """This system does not let specrun make a child memory cgroup."""


@dataclass(frozen=True)
class Usage:
    """What a run inside the cgroup used: its peak (page cache included, as the kernel counts
    it against the limit) and how often the limit was hit or a process was killed there."""

    peak: int | None
    hits: int | None  # times usage hit the limit (v1 failcnt, v2 memory.events max)
    oom_kills: int | None


class ChildCgroup:
    """A fresh child memory cgroup of this process's own, limited to `limit` bytes; `popen`
    starts processes inside it. Removed on `close` (its page cache moves to the parent)."""

    def __init__(self, limit: int, paths: SystemPaths = SystemPaths()) -> None:
        self.limit = limit
        self.dir, self.version = _make(paths, f"specrun-{os.getpid()}-{next(_count)}")
        try:
            self._write("memory.limit_in_bytes" if self.version == 1 else "memory.max", str(limit))
            if self.version == 1 and (self.dir / "memory.memsw.limit_in_bytes").exists():
                self._write("memory.memsw.limit_in_bytes", str(limit))  # no escape into swap either
            elif self.version == 2 and (self.dir / "memory.swap.max").exists():
                self._write("memory.swap.max", "0")
        except OSError as e:
            self.close()
            raise CgroupUnavailable(f"cannot set a memory limit on {self.dir} ({e.strerror or e})") from None

    def _write(self, name: str, value: str) -> None:
        (self.dir / name).write_text(value)

    def popen(self, argv: list[str], **kwargs: Any) -> subprocess.Popen:  # type: ignore[type-arg]
        """Start `argv` inside the cgroup: the child joins it before it runs anything, so all it
        allocates is charged there."""
        procs = str(self.dir / "cgroup.procs")

        def join() -> None:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        return subprocess.Popen(argv, preexec_fn=join, **kwargs)

    def run(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
        """`subprocess.run` inside the cgroup (capture_output, text, timeout, input as there)."""
        timeout, data = kwargs.pop("timeout", None), kwargs.pop("input", None)
        if kwargs.pop("capture_output", False):
            kwargs["stdout"] = kwargs["stderr"] = subprocess.PIPE
        if data is not None:
            kwargs["stdin"] = subprocess.PIPE
        with self.popen(argv, **kwargs) as p:
            try:
                out, err = p.communicate(data, timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()
                raise
        return subprocess.CompletedProcess(argv, p.returncode, out, err)

    def usage(self) -> Usage:
        if self.version == 1:
            return Usage(_int(self.dir / "memory.max_usage_in_bytes"), _int(self.dir / "memory.failcnt"),
                         read_stat(self.dir / "memory.oom_control").get("oom_kill"))
        events = read_stat(self.dir / "memory.events")
        return Usage(_int(self.dir / "memory.peak"), events.get("max"), events.get("oom_kill"))

    def close(self) -> None:
        for _ in range(20):  # the last process may still be leaving
            try:
                self.dir.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.05)

    def __enter__(self) -> "ChildCgroup":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _make(paths: SystemPaths, name: str) -> tuple[Path, int]:
    """A new directory under this process's own memory cgroup: (path, cgroup version)."""
    tried = []
    for version, _, parent in memory_cgroups(paths):
        if version == 2 and "memory" not in (read_file(parent / "cgroup.controllers") or "").split():
            tried.append(f"cgroup v2 at {parent} has no memory controller")
            continue
        try:
            child = parent / name
            child.mkdir()
        except OSError as e:
            tried.append(f"cannot make a cgroup under {parent} ({e.strerror or e})")
            continue
        if version == 2:
            try:
                (parent / "cgroup.subtree_control").write_text("+memory")
            except OSError:
                pass  # already on, or not ours to turn on: memory.max tells
            if not (child / "memory.max").exists():
                child.rmdir()
                tried.append(f"the memory controller is not enabled for children of {parent}")
                continue
        return child, version
    raise CgroupUnavailable("cannot make a child memory cgroup here: " + ("; ".join(tried) or
                            "no cgroup memory controller is mounted"),
                            hint="run as root, or inside a cgroup delegated to you (systemd-run --user --scope)")


def _int(path: Path) -> int | None:
    text = (read_file(path) or "").strip()
    return int(text) if text.isdigit() else None


def evict_from_page_cache(*files: Path) -> None:
    """Drop these files' pages from the page cache (those no process maps), so the next reader
    pays for its reads and has them charged to its own cgroup, as on a machine where the file
    was not just read. posix_fadvise needs no root; pages mapped elsewhere stay."""
    for path in files:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
