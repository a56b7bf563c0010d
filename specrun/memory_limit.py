"""How much memory this process may really use: the tightest of its cgroup limits and the host's.

A container, a systemd slice or a CI runner limits memory with a cgroup, and
the host's MemAvailable knows nothing of it: a process that plans by
MemAvailable inside a 1 GiB cgroup on a 24 GB machine loads a 1.1 GB model
and is killed by the kernel (exit 137), with no error to read. So every
limit is read and the smallest wins:

- cgroup v2: `memory.max` and `memory.high` of this process's cgroup and of
  each ancestor (a parent's limit binds its children), less what each level
  already holds that cannot be reclaimed (`memory.current` less page cache);
- cgroup v1: `memory.limit_in_bytes` up the hierarchy (and memory.stat's
  `hierarchical_memory_limit`), less `memory.usage_in_bytes` less page cache;
- Linux: MemAvailable; macOS: free, inactive and purgeable pages (`vm_stat`).

`detect` takes the filesystem roots as arguments, so tests run it on fake
cgroup trees. A file that cannot be read is skipped: a limit that cannot be
seen cannot be obeyed, but it must not stop specrun either.
"""

from __future__ import annotations

import os
import platform
import resource
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a page-aligned 2^63 - 1; anything above this is none


@dataclass(frozen=True)
class SystemPaths:
    """Where the kernel's files are (tests point these at fake trees)."""

    proc: Path = Path("/proc")
    self_proc: Path = Path("/proc/self")


@dataclass(frozen=True)
class Level:
    """One limit found: how much this process could still take there, and why."""

    source: str  # e.g. "cgroup v1 memory.limit_in_bytes of /user.slice"
    limit: int  # bytes the level allows in all
    available: int  # bytes this process could still take there (page cache counted as free)


@dataclass(frozen=True)
class MemoryLimit:
    """The memory this process may use from now on.

    `available` is what it can still allocate before the tightest level refuses (page cache
    counts as free: the kernel drops it first). `held` is what the process holds already
    and that limit counts (its anonymous memory), so `budget` = available + held is what a
    plan of everything the process will hold must stay under."""

    available: int
    held: int
    source: str  # where the binding figure came from
    limit: int | None  # that level's whole limit (None: the host's free memory binds)
    levels: tuple[Level, ...] = ()

    @property
    def budget(self) -> int:
        return self.available + self.held

    @property
    def cgroup(self) -> bool:
        """Whether a cgroup (a container, a slice) binds rather than the machine's own memory."""
        return self.source.startswith("cgroup")

    def describe(self) -> str:
        """One line for `specrun info` and errors."""
        whole = f"limit {gib(self.limit)}, " if self.limit is not None else ""
        return f"{gib(self.budget)} for specrun ({whole}{self.source})"


def gib(n: int | float | None) -> str:
    """Bytes in binary units, as memory limits are written (1G is 1 GiB)."""
    if n is None:
        return "?"
    if abs(n) >= 1 << 30:
        return f"{n / (1 << 30):.2f} GiB"
    return f"{n / (1 << 20):.0f} MiB"


def detect(paths: SystemPaths = SystemPaths()) -> MemoryLimit:
    """Every limit this process is under, the tightest binding."""
    levels = [*_cgroup_levels(paths), *_host_levels(paths)]
    held = _anon_rss(paths.self_proc)
    if not levels:  # nothing readable: an unknown machine; plan as if memory were plentiful
        return MemoryLimit(available=UNLIMITED, held=held, source="unknown (no limit could be read)", limit=None)
    tight = min(levels, key=lambda lv: lv.available)
    limit = tight.limit if tight.source.startswith("cgroup") else None
    return MemoryLimit(max(tight.available, 0), held, tight.source, limit, tuple(levels))


# --- cgroups ----------------------------------------------------------------------------------


def _cgroup_levels(paths: SystemPaths) -> list[Level]:
    """Limits of this process's cgroup and its ancestors, v2 and v1 (a hybrid system has both)."""
    readers = {1: _v1_level, 2: _v2_level}
    return [level for version, point, directory in memory_cgroups(paths)
            for level in _walk(point, directory, readers[version])]


def memory_cgroups(paths: SystemPaths = SystemPaths()) -> list[tuple[int, Path, Path]]:
    """This process's memory cgroups, v1 first: (version, the hierarchy's mount point, the
    process's directory there). Where the group's path is not under the mount as such (a
    container with its own cgroup namespace sees "/", or the mount shows a subtree), the
    part below the mount's root is used, else the mount's top."""
    mounts = _cgroup_mounts(paths.self_proc / "mountinfo")
    found = []
    for line in (read_file(paths.self_proc / "cgroup") or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, group = parts
        version = 2 if controllers == "" else 1 if "memory" in controllers.split(",") else 0
        if not version or f"v{version}" not in mounts:
            continue
        point, root = mounts[f"v{version}"]
        if root != "/" and (group == root or group.startswith(root.rstrip("/") + "/")):
            group = group[len(root.rstrip("/")):] or "/"
        directory = point / group.lstrip("/")
        found.append((version, point, directory if directory.is_dir() else point))
    return sorted(found)


def _cgroup_mounts(mountinfo: Path) -> dict[str, tuple[Path, str]]:
    """{"v2": (mount point, root), "v1": (the memory controller's mount point, root)}. The
    root is the part of the hierarchy the mount shows (a container sees its own cgroup as /)."""
    found: dict[str, tuple[Path, str]] = {}
    for line in (read_file(mountinfo) or "").splitlines():
        left, _, right = line.partition(" - ")
        fields, after = left.split(), right.split()
        if len(fields) < 5 or len(after) < 3:
            continue
        root, point, fstype, options = fields[3], Path(_unescape(fields[4])), after[0], after[2]
        if fstype == "cgroup2" and "v2" not in found:
            found["v2"] = (point, root)
        elif fstype == "cgroup" and "memory" in options.split(",") and "v1" not in found:
            found["v1"] = (point, root)
    return found


def _unescape(path: str) -> str:
    return path.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def _walk(point: Path, directory: Path, level_of: Callable[[Path, str], Level | None]) -> list[Level]:
    """The limits from `directory` up to the mount's top (`point`)."""
    levels = []
    while True:
        level = level_of(directory, "/" + str(directory.relative_to(point)).lstrip("."))
        if level is not None:
            levels.append(level)
        if directory == point:
            return levels
        directory = directory.parent


def _v2_level(directory: Path, name: str) -> Level | None:
    limits = [(f, v) for f in ("memory.max", "memory.high") if (v := _number(directory / f)) is not None]
    if not limits:
        return None
    file, limit = min(limits, key=lambda fv: fv[1])
    used = _number(directory / "memory.current") or 0
    cache = read_stat(directory / "memory.stat").get("file", 0)
    return Level(f"cgroup v2 {file} of {name}", limit, limit - max(used - cache, 0))


def _v1_level(directory: Path, name: str) -> Level | None:
    limit = _number(directory / "memory.limit_in_bytes")
    stat = read_stat(directory / "memory.stat")
    file = "memory.limit_in_bytes"
    hierarchical = stat.get("hierarchical_memory_limit")
    if hierarchical is not None and hierarchical < UNLIMITED and (limit is None or hierarchical < limit):
        limit, file = hierarchical, "hierarchical_memory_limit"  # a parent's limit, seen from here
    if limit is None:
        return None
    used = _number(directory / "memory.usage_in_bytes") or 0
    cache = stat.get("total_cache", stat.get("cache", 0))
    return Level(f"cgroup v1 {file} of {name}", limit, limit - max(used - cache, 0))


def _number(path: Path) -> int | None:
    """A cgroup file holding one number; None for "max", an unlimited value, or no file."""
    text = read_file(path)
    if text is None:
        return None
    text = text.strip()
    if not text.isdigit():
        return None  # "max", or garbage
    value = int(text)
    return value if value < UNLIMITED else None


def read_stat(path: Path) -> dict[str, int]:
    out = {}
    for line in (read_file(path) or "").splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[key] = int(value)
    return out


def read_file(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


# --- the host -----------------------------------------------------------------------------------


def _host_levels(paths: SystemPaths) -> list[Level]:
    meminfo = _meminfo(paths.proc / "meminfo")
    if "MemAvailable" in meminfo:
        return [Level("MemAvailable (the machine's free memory)", meminfo.get("MemTotal", 0),
                      meminfo["MemAvailable"])]
    if platform.system() == "Darwin" and paths.proc == Path("/proc"):
        return _macos_levels(_run(["sysctl", "-n", "hw.memsize"]), _run(["vm_stat"]))
    return []


def _meminfo(path: Path) -> dict[str, int]:
    out = {}
    for line in (read_file(path) or "").splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if parts and parts[0].isdigit():
            out[key] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    return out


def _macos_levels(memsize: str | None, vm_stat: str | None) -> list[Level]:
    """macOS: free, inactive, speculative and purgeable pages are what the system hands out
    without paging anyone out (what Activity Monitor calls available, roughly)."""
    if not vm_stat:
        return []
    lines = vm_stat.splitlines()
    page = 4096
    if lines and "page size of" in lines[0]:
        digits = [w for w in lines[0].split() if w.isdigit()]
        page = int(digits[0]) if digits else page
    pages = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        value = value.strip().rstrip(".")
        if value.isdigit():
            pages[key.strip()] = int(value)
    free = sum(pages.get(k, 0) for k in ("Pages free", "Pages inactive", "Pages speculative", "Pages purgeable"))
    total = int(memsize.strip()) if memsize and memsize.strip().isdigit() else 0
    return [Level("vm_stat (the machine's free memory)", total, free * page)]


def _run(argv: list[str]) -> str | None:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=5, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def _anon_rss(self_proc: Path) -> int:
    """Anonymous memory this process holds (charged to its cgroup; not reclaimable)."""
    status = _meminfo(self_proc / "status")
    if "RssAnon" in status:
        return status["RssAnon"]
    try:  # macOS: ru_maxrss is bytes there; the peak is the best figure without psutil
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss if platform.system() == "Darwin" else 0
    except (ImportError, OSError):
        return 0


def resident_bytes(self_proc: Path = Path("/proc/self")) -> int:
    """What this process holds in memory now, its mapped code included (VmRSS)."""
    return _meminfo(self_proc / "status").get("VmRSS", 0)


def locked_bytes(self_proc: Path = Path("/proc/self")) -> int:
    """Memory this process has locked (VmLck)."""
    return _meminfo(self_proc / "status").get("VmLck", 0)


def can_lock(n_bytes: int) -> bool:
    """Whether this process may lock `n_bytes` in RAM (mlock): RLIMIT_MEMLOCK allows it, or can be
    raised to, or CAP_IPC_LOCK lifts it (root usually has it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY or soft >= n_bytes or _can_ipc_lock():
        return True
    if hard == resource.RLIM_INFINITY or hard >= n_bytes:
        try:
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (hard, hard))
            return True
        except (ValueError, OSError):
            pass
    return False


def _can_ipc_lock() -> bool:
    """Whether this process has CAP_IPC_LOCK (root usually does), which lifts RLIMIT_MEMLOCK."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> 14 & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def swap_enabled(proc: Path = Path("/proc")) -> bool:
    return _meminfo(proc / "meminfo").get("SwapTotal", 0) > 0


__all__ = ["Level", "MemoryLimit", "SystemPaths", "can_lock", "detect", "gib", "locked_bytes", "memory_cgroups",
           "read_file", "read_stat", "resident_bytes", "swap_enabled"]


if __name__ == "__main__":  # python -m specrun.memory_limit: what this process sees
    found = detect()
    print(found.describe())
    for lv in found.levels:
        print(f"  {lv.source}: limit {gib(lv.limit)}, available {gib(lv.available)}")
    print(f"  held already {gib(found.held)}, pid {os.getpid()}")
