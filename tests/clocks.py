"""A clock for tests that time things: it moves only when the test moves it.

Code that measures durations takes a `clock` (time.perf_counter by default). Given this
one, and fake engines or drafters that `advance` it by what their work is meant to cost
instead of sleeping, a test knows every duration exactly: its assertions hold however
busy the machine is, and it takes no wall time to wait for.
"""

from __future__ import annotations


class FakeClock:
    """Seconds since an arbitrary start; `advance` is the only way they pass."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        assert seconds >= 0, seconds
        self.now += seconds
