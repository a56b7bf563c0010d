"""tests/processes.py: children get Ctrl-C's default meaning and never outlive their test."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from tests import processes

# Prints how the child's Python treats SIGINT: "default" (KeyboardInterrupt) or "ignored".
SHOW = ("import signal; h = signal.getsignal(signal.SIGINT); "
        "print('default' if h is signal.default_int_handler else 'ignored' if h == signal.SIG_IGN else h)")
SLEEP = [sys.executable, "-c", "import time; time.sleep(600)"]


def test_children_get_the_default_sigint_from_a_runner_that_ignores_it() -> None:
    with processes.ignoring_sigint():
        plain = subprocess.run([sys.executable, "-c", SHOW], capture_output=True, text=True, timeout=60)
        ran = processes.run([sys.executable, "-c", SHOW], capture_output=True, text=True)
        with processes.spawned([sys.executable, "-c", SHOW], stdout=subprocess.PIPE, text=True) as proc:
            spawned, _ = proc.communicate(timeout=60)
        with processes.in_terminal([sys.executable, "-c", SHOW], encoding="utf-8", timeout=60) as child:
            child.expect(r"default|ignored")
            terminal = child.after
    assert plain.stdout.strip() == "ignored"  # what this guards against: inherited unless reset
    assert (ran.stdout.strip(), spawned.strip(), terminal) == ("default", "default", "default")


def test_a_child_is_killed_and_reaped_when_its_test_fails_or_times_out() -> None:
    with pytest.raises(RuntimeError):
        with processes.spawned(SLEEP) as failed:
            raise RuntimeError("the test failed")
    with pytest.raises(subprocess.TimeoutExpired):
        with processes.spawned(SLEEP) as timed_out:
            timed_out.wait(timeout=0.1)
    with processes.in_terminal(SLEEP) as child:
        pass
    # A return code means waited for: no zombie, nothing running on.
    assert failed.returncode == timed_out.returncode == -signal.SIGKILL
    assert not child.isalive() and child.signalstatus is not None

