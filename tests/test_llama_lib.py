"""llama-cpp-python is loaded with libgomp's idle workers spinning between passes, the
settings kept from everything else, and a user's own settings left alone (llama_lib.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from specrun.engines.llama_lib import SPIN, uses_libgomp


def _libgomp_settings(env: dict[str, str]) -> tuple[dict[str, str], str]:
    """(what libgomp read when llama-cpp-python loaded it, what the process's environment
    held afterwards), from a fresh interpreter: libgomp prints its settings as it loads."""
    code = ("import os, specrun.engines.llamacpp; "
            "print(os.environ.get('OMP_WAIT_POLICY', '-'), os.environ.get('GOMP_SPINCOUNT', '-'))")
    clean = {k: v for k, v in os.environ.items() if k not in SPIN}
    done = subprocess.run([sys.executable, "-c", code], env={**clean, "OMP_DISPLAY_ENV": "VERBOSE", **env},
                          capture_output=True, text=True, check=True)
    read = {}
    for line in done.stderr.splitlines():
        name, _, value = line.strip().partition(" = ")
        if name in SPIN:
            read[name] = value.strip("'")
    return read, done.stdout.strip()


@pytest.mark.skipif(not uses_libgomp(), reason="this llama.cpp build does not use libgomp")
def test_libgomp_keeps_spinning_and_nothing_else_sees_the_settings() -> None:
    read, after = _libgomp_settings({})
    assert read == SPIN
    assert after == "- -"  # child processes (and a torch loading its own libgomp later) keep their defaults


@pytest.mark.skipif(not uses_libgomp(), reason="this llama.cpp build does not use libgomp")
def test_a_users_own_wait_policy_is_left_alone() -> None:
    read, after = _libgomp_settings({"OMP_WAIT_POLICY": "PASSIVE"})
    assert read["OMP_WAIT_POLICY"] == "PASSIVE" and read["GOMP_SPINCOUNT"] == "0"
    assert after == "PASSIVE -"
