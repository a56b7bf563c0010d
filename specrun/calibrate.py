"""Measuring what a target pass costs on this machine (and only measuring).

The planner needs c(n): seconds for one target pass over n tokens (a draft tree
of n nodes). It depends on the model, the build, the threads and the GPU
layers, so it is measured once per such combination, on first use (from 1
token up to the engine's limit, stopping where passes grow too costly to ever
pay: see SIZES), as the minimum of repeats, and measured again when it looks
noisy. The planner's memory (planner_memory.py) keeps it, with what runs learn.
"""

from __future__ import annotations

import os
import time
from typing import Callable

from specrun.engines.base import Cache, Engine
from specrun.speculate.planner import JITTER, CostCurve


SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
ALWAYS = 32  # about 1.5 s for a 1.5B model on 2 CPU cores with llama.cpp
# A pass costing more than this many plain passes must accept more tokens than that to pay,
# and trees of the draft model get about 6-11 accepted (HumanEval, depth 16): beyond, the
# curve is steep (llama.cpp on a CPU: 9.6x at 32 tokens) and measuring it only takes time.
# A flat curve (an offloaded target, a GPU) is measured up to the engine's limit.
MAX_RATIO = 8.0
PREFIX = 64  # tokens in the cache while measuring, as after a short prompt


def sizes_up_to(max_nodes: int) -> tuple[int, ...]:
    """The sizes an engine verifying at most `max_nodes` tokens a pass can be measured at:
    SIZES below it, and `max_nodes` itself."""
    return tuple(n for n in SIZES if n < max_nodes) + (max(max_nodes, 1),)


def stops_short(curve: CostCurve, sizes: tuple[int, ...]) -> bool:
    """Whether a stored curve ends before the largest of `sizes` at a cost that would have
    measured on (it was measured with fewer sizes, or for smaller trees): measure again."""
    return curve.max_size < max(sizes) and curve.seconds[-1] <= MAX_RATIO * curve.seconds[0]


def context_needed(sizes: tuple[int, ...] = SIZES) -> int:
    """KV cells the measurement takes: the prefix, then a tree of the largest size."""
    return PREFIX + max(sizes) + 1


def measurement_tokens(n_vocab: int) -> list[int]:
    """The PREFIX tokens measurements evaluate: varied (what a pass costs must not depend on
    a repeated token) and within the vocabulary."""
    return [(7 * i + 11) % max(n_vocab - 1, 2) + 1 for i in range(PREFIX)]


NOISY = 1.5  # repeats of one size further apart than this: something else was running
DROP = 0.8  # a size costing less than this share of a smaller one: not a curve, noise
BUSY = 0.2  # of the machine's CPU time, taken by other processes while measuring: it was not idle


def cpu_ticks(stat: str = "/proc/stat") -> tuple[int, int] | None:
    """(busy, total) CPU time of the whole machine so far, in clock ticks; None where the
    machine does not say (not Linux)."""
    try:
        with open(stat) as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]  # user .. steal (guest is inside user)
    except (OSError, ValueError):
        return None
    if len(ticks) < 5:
        return None
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)  # less idle and iowait


class OthersLoad:
    """The share of the machine's CPU time that other processes took over a span (`share`;
    None where the machine does not say). A curve measured beside them measured them too:
    a curve taken while a test suite ran made 4 tokens cost 1.6x one on a streamed target
    whose passes cost the same to 16, it was kept, and every later run planned small trees
    from it. Repeats of each size agreed, so the noise check did not catch it."""

    def __init__(self, read: Callable[[], tuple[int, int] | None] = cpu_ticks,
                 own: Callable[[], float] = time.process_time, tick: float | None = None) -> None:
        self.read, self.own = read, own
        self.tick = tick if tick is not None else 1.0 / os.sysconf("SC_CLK_TCK")  # seconds per tick
        self.share: float | None = None

    def __enter__(self) -> "OthersLoad":
        self._start, self._own = self.read(), self.own()
        return self

    def __exit__(self, *exc: object) -> None:
        end, own = self.read(), self.own() - self._own
        if self._start is None or end is None or end[1] <= self._start[1]:
            return
        busy, total = end[0] - self._start[0], end[1] - self._start[1]
        self.share = max(0.0, busy - own / self.tick) / total


def measure_cost_curve(engine: Engine, cache: Cache, sizes: tuple[int, ...] = SIZES, reps: int | None = None,
                       on_size: Callable[[int], None] | None = None, max_ratio: float | None = None,
                       clock: Callable[[], float] = time.perf_counter) -> CostCurve:
    """Time chains of n nodes after a 64-token prefix, the minimum of repeats (after one
    warm-up): what the machine can do, not how busy it happened to be (see `measure_runs`).
    The cache is left empty; cost never decreases with size."""
    return curve_of(measure_runs(engine, cache, sizes, reps, on_size, max_ratio, clock))


def measure_runs(engine: Engine, cache: Cache, sizes: tuple[int, ...] = SIZES, reps: int | None = None,
                 on_size: Callable[[int], None] | None = None, max_ratio: float | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> dict[int, list[float]]:
    """Seconds of each repeat per size: `reps` each, or (None) 3 while a pass takes under a
    quarter second and 2 beyond (the large sizes of a streamed target take seconds). With
    `max_ratio`, sizes above ALWAYS are measured only while the last one cost at most
    `max_ratio` times one token. `cache` (of at least `context_needed(sizes)` tokens) is left empty."""
    engine.rewind(cache, 0)
    prefix = measurement_tokens(engine.vocab.n_vocab)
    engine.eval(cache, prefix)
    warm = min(4, max(sizes))
    if warm > 1:  # warm-up: first-use allocations
        engine.eval_tree(cache, prefix[:warm], [-1] + list(range(warm - 1)), list(range(warm)))
        engine.commit_path(cache, [])
    runs: dict[int, list[float]] = {}
    one: float | None = None
    # A streamed pass after a longer one finds more of its weights read ahead: each size's first
    # pass is not what a run of them costs (on disk, the first token's pass took 0.34 s, later ones 0.5 s).
    streamed = engine.transfer() is not None

    def once(n: int) -> float:
        t = clock()
        if n == 1:
            engine.eval(cache, [prefix[len(runs.get(n, ())) % PREFIX]])
            engine.rewind(cache, len(prefix))
        else:
            chain = [prefix[i % PREFIX] for i in range(n)]  # sizes beyond the prefix repeat it
            engine.eval_tree(cache, chain, [-1] + list(range(n - 1)), list(range(n)))
            engine.commit_path(cache, [])
        return clock() - t

    for n in sizes:
        if max_ratio is not None and n > ALWAYS and runs and one is not None and min(runs[max(runs)]) > max_ratio * one:
            break
        if streamed:
            once(n)
        times: list[float] = runs.setdefault(n, [])
        while len(times) < (reps or (3 if not times or min(times) < 0.25 else 2)):
            times.append(once(n))
        one = min(runs[min(runs)])
        if on_size:
            on_size(n)
    engine.rewind(cache, 0)
    return runs


def curve_of(runs: dict[int, list[float]]) -> CostCurve:
    """The curve of each size's fastest repeat, made monotone: a later, cheaper size bounds earlier ones."""
    sizes = sorted(runs)
    times = [min(runs[n]) for n in sizes]
    for i in range(len(times) - 2, -1, -1):
        times[i] = min(times[i], times[i + 1])
    return CostCurve(tuple(sizes), tuple(times))


def curve_problem(runs: dict[int, list[float]]) -> str | None:
    """Why a measurement should not be kept: repeats of two or more sizes further apart than
    NOISY, or a size much cheaper than a smaller one. None: it looks like the machine's."""
    noisy = [n for n, times in runs.items()
             if len(times) > 1 and max(times) > NOISY * min(times) and max(times) - min(times) > JITTER]
    if len(noisy) >= 2:
        return f"repeats of {len(noisy)} sizes differed by more than {NOISY:.1f}x"
    fastest = {n: min(t) for n, t in sorted(runs.items())}
    for small, big in zip(fastest, list(fastest)[1:]):
        before = max(fastest[n] for n in fastest if n <= small)
        if fastest[big] < DROP * before and before - fastest[big] > JITTER:
            return f"a pass over {big} tokens measured faster than one over {small}"
    return None


def measure_checked(engine: Engine, cache: Cache, sizes: tuple[int, ...], notice: Callable[[str], None],
                    max_ratio: float | None = MAX_RATIO, clock: Callable[[], float] = time.perf_counter,
                    load: Callable[[], OthersLoad] = OthersLoad) -> tuple[CostCurve, bool]:
    """(the cost curve, whether to keep it): measured, and measured again when noisy, not
    monotonic, or taken while other processes used the CPU (`load`): such a curve, stored,
    steered every later run. When the second measurement is no better, it is used for this
    run only, with a notice."""

    def measured() -> tuple[dict[int, list[float]], str | None]:
        with load() as others:
            runs = measure_runs(engine, cache, sizes, max_ratio=max_ratio, clock=clock)
        if others.share is not None and others.share > BUSY:
            return runs, f"other processes took {others.share:.0%} of the CPU meanwhile"
        return runs, curve_problem(runs)

    runs, problem = measured()
    if problem is None:
        return curve_of(runs), True
    notice(f"the cost curve looked noisy ({problem}): measuring it again…")
    runs, problem = measured()
    if problem is None:
        return curve_of(runs), True
    notice(f"the cost curve is too noisy to keep ({problem}; is something else running?): this run plans "
           "from it, and the next one measures again")
    return curve_of(runs), False


