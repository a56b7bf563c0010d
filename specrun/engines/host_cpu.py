"""This machine's CPU, as far as costs depend on it.

A measured cost curve is kept per engine settings; the CPU belongs to them, because a store
can outlive its machine (a home directory on a new laptop, a VM moved to another host) and a
curve measured on another CPU steers every later run wrongly."""

from __future__ import annotations

import os
import platform
from functools import lru_cache
from pathlib import Path

_VECTOR_UNITS = ("amx_tile", "avx512f", "avx2", "asimd")  # widest first
_NAME_KEYS = ("model name", "Model", "Hardware")  # x86, then ARM boards


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    """The first core's model name ('' if none is given) and feature flags."""
    name, flags = "", frozenset[str]()
    for line in text.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key in _NAME_KEYS and value and not name:
            name = value
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
    return name, flags


@lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    try:
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:  # not Linux
        return "", frozenset()


def cpu_flags() -> frozenset[str]:
    """The feature flags Linux reports (empty elsewhere)."""
    return _cpuinfo()[1]


def describe_cpu(name: str, flags: frozenset[str], cores: int | None) -> str:
    """'AMD EPYC, 2 cores, avx512f': model, cores and widest vector unit."""
    name = name or platform.processor() or platform.machine() or "unknown cpu"
    unit = next((u for u in _VECTOR_UNITS if u in flags), "")
    return ", ".join(p for p in (name, f"{cores or 1} cores", unit) if p)


def cpu_identity() -> str:
    """This machine's CPU as `describe_cpu` writes it."""
    name, flags = _cpuinfo()
    return describe_cpu(name, flags, os.cpu_count())
