"""Inside a real memory limit (a child memory cgroup), as a container gives one: a model bigger
than the limit streams and finishes; a limit nothing fits is one line and exit 2, never a kill.

Skipped, saying why, where this machine does not let a test make a child cgroup."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from specrun.memory_cgroup import CgroupUnavailable, ChildCgroup
from tests import processes
from tests.conftest import DEFAULT_TARGET, REAL_STORE

MIB = 1 << 20


def limited(limit: int) -> ChildCgroup:
    try:
        return ChildCgroup(limit)
    except CgroupUnavailable as e:
        pytest.skip(e.message)


def specrun(cg: ChildCgroup, *args: str, home: Path | None = None) -> "os.CompletedProcess[str]":  # type: ignore[name-defined]
    env = {**os.environ, "NO_COLOR": "1", **({"SPECRUN_HOME": str(home)} if home else {})}
    return cg.run([sys.executable, "-m", "specrun", *args], capture_output=True, text=True, timeout=600, env=env)


def test_a_limit_nothing_fits_is_one_line_and_exit_2(tiny_model: Path) -> None:
    """100 MiB: less than the runtime and the least headroom the plan keeps. The plan refuses
    before any model loads (and before importing torch, which alone would be killed)."""
    with limited(100 * MIB) as cg:
        done = specrun(cg, "run", str(tiny_model), "hello", "-n", "4")
        usage = cg.usage()
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[0].startswith("error:") and "cannot run in the memory specrun may use" in lines[0]
    assert "limit 100 MiB" in lines[0] and len(lines) == 2 and lines[1].startswith("hint:")
    assert usage.oom_kills in (0, None)


def test_the_default_target_streams_under_a_limit_below_its_size(real_pair: dict[str, Path]) -> None:
    """1.1 GiB for a 1.04 GiB model file and its 0.46 GiB draft: with no flags, `run` streams the
    target from disk (keeping the draft in RAM) instead of loading it, and finishes."""
    with limited(int(1.1 * (1 << 30))) as cg:
        done = specrun(cg, "run", DEFAULT_TARGET, "def fib(n):", "-t", "0", "-n", "24", "-v", home=REAL_STORE.root)
        usage = cg.usage()
    assert done.returncode == 0, done.stderr
    assert "streaming it from disk" in done.stderr and "return" in done.stdout
    assert usage.oom_kills in (0, None) and usage.peak is not None and usage.peak <= int(1.1 * (1 << 30))


def test_bench_runs_every_mode_inside_the_limit_and_reports_its_peak(tiny_model: Path, tmp_path: Path) -> None:
    import json

    limited(64 * MIB).close()  # skips here where no child cgroup can be made
    out = tmp_path / "bench.json"
    base = [sys.executable, "-m", "specrun", "bench", str(tiny_model), "--draft", str(tiny_model), "--n-prompts", "2",
            "-n", "8"]
    env = {**os.environ, "NO_COLOR": "1"}
    done = processes.run([*base, "--modes", "plain,auto,lcp-plain", "--memory-limit", "600M", "--json", str(out)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    assert data["memory_limit"] == 600 * MIB
    for mode in data["modes"]:
        assert 0 < mode["peak_bytes"] <= 600 * MIB and mode["failed"] == 0 and mode["tokens_per_s"] > 0
    assert "peak memory" in done.stdout and "inside 600 MiB each" in done.stdout
    nothing = processes.run([*base, "--modes", "plain,auto", "--memory-limit", "100M"], capture_output=True, text=True,
                            timeout=600, env=env)
    assert nothing.returncode == 2 and nothing.stdout == ""
    errors = [line for line in nothing.stderr.splitlines() if line.startswith(("error:", "hint:"))]
    assert len(errors) == 2 and "cannot run in the memory specrun may use" in errors[0] and "Traceback" not in nothing.stderr
