"""How far calibration measures: fake engines with known costs and a fake clock, and what the
session opens engines for."""

from __future__ import annotations

import functools
import importlib.util
import itertools

from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Sequence

import pytest

from specrun import calibrate
from specrun.calibrate import ALWAYS, MAX_RATIO, SIZES, context_needed, measure_cost_curve, sizes_up_to
from specrun.engines import Placement
from specrun.engines import tree_limit
from specrun.engines.base import Cache
from specrun.session import SessionConfig
from specrun.speculate.factory import DEFAULT_NODES, SpecConfig, make_speculator
from specrun.speculate.planner import CostCurve


class FakeEngine:
    """A pass over n tokens advances the clock by cost(n)."""

    def __init__(self, cost: Callable[[int], float], max_tree_nodes: int) -> None:
        self.cost, self.max_tree_nodes, self.now = cost, max_tree_nodes, 0.0
        self.vocab = SimpleNamespace(n_vocab=100)
        self.trees: list[int] = []

    def clock(self) -> float:
        return self.now

    def new_cache(self, n_ctx: int = 4096) -> Cache:
        return Cache(n_ctx)

    def rewind(self, cache: Cache, n: int) -> None:
        cache.cut(n)

    def eval(self, cache: Cache, tokens: Sequence[int]) -> None:
        self.now += self.cost(len(tokens))
        cache.appended(tokens)

    def eval_tree(self, cache: Cache, tokens: Sequence[int], parents: Sequence[int], depths: Sequence[int],
                  start: int = 0) -> None:
        assert len(tokens) <= self.max_tree_nodes and cache.kv_len + len(tokens) <= cache.n_ctx
        self.now += self.cost(len(tokens))
        self.trees.append(len(tokens))

    def commit_path(self, cache: Cache, path: Sequence[int]) -> None:
        pass

    def transfer(self) -> object | None:
        return None  # its weights do not stream


class StreamingEngine(FakeEngine):
    """A pass costs its reads or its compute, whichever is longer; once its own reads are done,
    the readers run on into the next pass (up to half of it), so a pass after a longer one
    waits less. The second pass (calibration's warm-up) makes its first-use allocations."""

    def __init__(self, read: float, compute: Callable[[int], float], max_tree_nodes: int) -> None:
        super().__init__(self._cost, max_tree_nodes)
        self.read, self.compute, self.ahead, self.calls = read, compute, 0.0, 0

    def _cost(self, n: int) -> float:
        self.calls += 1
        compute = self.compute(n) + (1.0 if self.calls == 2 else 0.0)
        took = max(self.read - self.ahead, compute)
        self.ahead = min(self.read / 2, took - (self.read - self.ahead))
        return took

    def transfer(self) -> object | None:
        return object()


def measure(cost: Callable[[int], float], limit: int) -> CostCurve:
    engine = FakeEngine(cost, limit)
    cache = engine.new_cache()
    curve = measure_cost_curve(engine, cache, sizes_up_to(limit), max_ratio=MAX_RATIO,  # type: ignore[arg-type]
                               clock=engine.clock)
    assert cache.kv_len == 0  # left empty
    return curve


def test_sizes_stop_at_what_the_engine_verifies() -> None:
    assert sizes_up_to(1024) == SIZES
    assert sizes_up_to(255)[-3:] == (128, 192, 255)  # llama.cpp: 255, measured too
    assert sizes_up_to(32)[-2:] == (24, 32) and sizes_up_to(0) == sizes_up_to(1) == (1,)
    assert context_needed(sizes_up_to(255)) == calibrate.PREFIX + 256


def test_a_steep_curve_is_measured_as_far_as_before() -> None:
    """llama.cpp on a 2-core CPU: a pass over 32 tokens costs 9.6 plain ones, so nothing bigger
    is measured (it would take seconds, and never pay)."""
    curve = measure(lambda n: 0.025 * n ** 0.65, 255)
    assert curve.sizes == tuple(n for n in SIZES if n <= ALWAYS)


def test_a_flat_curve_is_measured_up_to_the_engine_limit() -> None:
    assert measure(lambda n: 1.0 + n / 4000, 1024).sizes == SIZES  # an offloaded target
    assert measure(lambda n: 0.005 + n / 1e5, 255).sizes[-1] == 255  # llama.cpp on a GPU


def test_measuring_stops_after_the_first_size_costing_more_than_max_ratio_plain_passes() -> None:
    curve = measure(lambda n: 1.0 + n / 16, 1024)  # 7x at 96 tokens, 9x at 128
    assert curve.sizes[-2:] == (96, 128)
    assert curve.seconds[-1] == pytest.approx(9.0)
    everything = FakeEngine(lambda n: 1.0 + n / 16, 1024)  # without max_ratio (scripts): every size
    assert measure_cost_curve(everything, everything.new_cache(), SIZES,  # type: ignore[arg-type]
                              clock=everything.clock).sizes == SIZES


def test_a_streamed_pass_is_measured_as_a_run_of_them_costs_not_after_a_longer_one() -> None:
    """On disk a pass after a longer one (the warm-up's) finds its first layers read: the first
    one-token pass took 0.34 s where a run of them took 0.5 s, and calibration keeps the fastest
    repeat. Here the old way measured a token's pass at 0.25 s."""
    engine = StreamingEngine(read=0.5, compute=lambda n: 0.02 * n, max_tree_nodes=64)
    curve = measure_cost_curve(engine, engine.new_cache(), (1, 8, 16, 32, 64),  # type: ignore[arg-type]
                               clock=engine.clock)
    assert curve.seconds == pytest.approx((0.5, 0.5, 0.5, 0.64, 1.28))


def test_engines_are_opened_for_what_their_backend_verifies(tiny_model: Path, tmp_path: Path) -> None:
    """Sessions ask for the trees their modes (and calibration) would verify; the memory plan
    caps them at what the engine verifies in one pass: llama.cpp 255 nodes, torch any."""
    from specrun.session import Session

    directory = tmp_path / "model"  # a safetensors directory: the torch engine, opened by name only
    directory.mkdir()
    assert tree_limit(tiny_model, Placement()) == 255 and tree_limit(directory, Placement()) is None
    planned = SessionConfig(tiny_model, tiny_model, tmp_path)  # auto: calibrated
    assert planned.max_tree_nodes == max(SIZES)
    with Session(planned) as s:
        assert s.plan.tree_nodes == s.draft_tree_nodes == 255
    if importlib.util.find_spec("torch") is not None:
        torch = SessionConfig(tiny_model, tiny_model, tmp_path, (SpecConfig("tree"),), Placement(engine="torch"))
        with Session(torch) as s:
            assert s.plan.tree_nodes == max(SIZES) and s.draft_tree_nodes == 255
    fixed = SessionConfig(tiny_model, None, tmp_path, (SpecConfig("ngram", budget=8), SpecConfig("none")))
    assert fixed.max_tree_nodes == 8
    assert SessionConfig(tiny_model, None, tmp_path, (SpecConfig("none"),)).max_tree_nodes == 0


def test_the_planner_plans_up_to_what_was_measured() -> None:
    flat = CostCurve((1, 512), (1.0, 1.2))
    planned = make_speculator(SpecConfig("ngram"), flat, {})
    assert planned is not None and planned.max_nodes == 512 > DEFAULT_NODES  # type: ignore[union-attr]
    budget = make_speculator(SpecConfig("ngram", budget=24), flat, {})
    assert budget is not None and budget.max_nodes == 24  # type: ignore[union-attr]


def test_a_stored_curve_that_stopped_short_is_measured_again(tiny_model: Path, tmp_path: Path) -> None:
    """Files from when calibration stopped at 32 tokens: a flat curve is measured again (its
    acceptance statistics kept), a steep one is as far as it would go today."""
    from specrun.planner_memory import PlannerMemory, load, memory_path
    from specrun.session import Session
    from specrun.speculate.acceptance import AcceptanceStats

    sizes = tuple(n for n in SIZES if n <= 32)
    for seconds, again in (([0.01] * len(sizes), True), ([0.01 * n for n in sizes], False)):
        with Session(SessionConfig(tiny_model, None, tmp_path)) as s:
            s.open(256)
            file = memory_path(tmp_path, tiny_model, s.target.settings_key())
            stats = AcceptanceStats(counts={("ngram", 1, 1): [3, 4]})
            PlannerMemory(file, CostCurve(sizes, tuple(seconds)), {"ngram": stats}).save()
            assert calibrate.stops_short(CostCurve(sizes, tuple(seconds)), sizes_up_to(255)) == again
            cal = s.calibrated()
            assert (cal.cost.seconds != tuple(seconds)) == again
            assert cal.stats["ngram"].counts == {("ngram", 1, 1): [3, 4]}
            assert load(file) is not None and load(file).cost.curve == cal.cost.curve  # type: ignore[union-attr]


# --- what is learnt survives a bad hour -------------------------------------------------------

class NoisyEngine(FakeEngine):
    """Every `every`-th pass takes `factor` times longer (another process took the cores)."""

    def __init__(self, cost: Callable[[int], float], limit: int, factor: float, every: int = 2,
                 noisy_passes: int = 10_000) -> None:
        super().__init__(cost, limit)
        self.factor, self.every, self.noisy_passes, self.passes = factor, every, noisy_passes, 0
        base = self.cost
        self.cost = lambda n: base(n) * (self._slow() or 1.0)

    def _slow(self) -> float | None:
        self.passes += 1
        return self.factor if self.passes <= self.noisy_passes and self.passes % self.every == 0 else None


def checked(engine: FakeEngine, limit: int) -> tuple[CostCurve, bool, list[str]]:
    """measure_checked on an idle machine: what the fake engine's passes say is all it judges by
    (the real machine's load, say a test suite's other work, must not decide these tests)."""
    notices: list[str] = []
    curve, keep = calibrate.measure_checked(engine, engine.new_cache(), sizes_up_to(limit),  # type: ignore[arg-type]
                                            notices.append, clock=engine.clock, load=_Load(0.0, 0.0))
    return curve, keep, notices


class _Load:
    """Other processes' share of the CPU over each measurement, in turn."""

    def __init__(self, *shares: float | None) -> None:
        self.shares = iter(shares)

    def __call__(self) -> "_Load":
        self.share = next(self.shares)
        return self

    def __enter__(self) -> "_Load":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def test_a_curve_measured_beside_other_processes_is_measured_again_and_refused_if_they_stay() -> None:
    """Repeats agree (nothing looks noisy), but other processes took half the CPU meanwhile."""
    engine = FakeEngine(lambda n: 0.1 + n / 1000, 64)
    notices: list[str] = []
    curve, keep = calibrate.measure_checked(engine, engine.new_cache(), sizes_up_to(64),  # type: ignore[arg-type]
                                            notices.append, clock=engine.clock, load=_Load(0.5, 0.05))
    assert keep and len(notices) == 1 and "other processes took 50% of the CPU" in notices[0]
    notices.clear()
    curve, keep = calibrate.measure_checked(engine, engine.new_cache(), sizes_up_to(64),  # type: ignore[arg-type]
                                            notices.append, clock=engine.clock, load=_Load(0.5, 0.3))
    assert not keep and "too noisy to keep (other processes took 30%" in notices[1]
    curve, keep = calibrate.measure_checked(engine, engine.new_cache(), sizes_up_to(64),  # type: ignore[arg-type]
                                            notices.append, clock=engine.clock, load=_Load(None))
    assert keep  # a machine that does not say is judged by its repeats alone


def test_others_load_is_the_machines_busy_time_less_this_process(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text("cpu  10 2 5 100 3 0 1 0 0 0\ncpu0 5 1 2 50 1 0 0 0 0 0\n")
    assert calibrate.cpu_ticks(str(stat)) == (18, 121)  # idle and iowait are not busy
    assert calibrate.cpu_ticks(str(tmp_path / "none")) is None
    readings = iter([(100, 1000), (250, 1400)])  # 150 busy ticks of 400
    own = iter([1.0, 1.5])  # 0.5 s of them ours: 50 ticks of 10 ms
    with calibrate.OthersLoad(lambda: next(readings), lambda: next(own), tick=0.01) as load:
        pass
    assert load.share == pytest.approx(100 / 400)
    with calibrate.OthersLoad(lambda: None) as unknown:
        pass
    assert unknown.share is None


def test_a_noisy_curve_is_measured_again_and_refused_if_still_noisy(monkeypatch: pytest.MonkeyPatch) -> None:
    quiet = FakeEngine(lambda n: 0.1 + n / 1000, 64)
    curve, keep, notices = checked(quiet, 64)
    assert keep and notices == [] and curve.cost(1) == pytest.approx(0.101)
    busy = NoisyEngine(lambda n: 0.1 + n / 1000, 64, factor=3.0)  # every other pass 3x: a busy machine
    curve, keep, notices = checked(busy, 64)
    assert not keep and len(notices) == 2 and "measuring it again" in notices[0] and "too noisy" in notices[1]
    assert curve.cost(1) == pytest.approx(0.101)  # the minimum of repeats: what the machine can do
    calmed = NoisyEngine(lambda n: 0.1 + n / 1000, 64, factor=3.0, noisy_passes=20)  # busy for a moment
    curve, keep, notices = checked(calmed, 64)
    assert keep and len(notices) == 1


def test_repeats_take_the_minimum_so_one_slow_pass_does_not_stick() -> None:
    engine = NoisyEngine(lambda n: 0.2, 32, factor=5.0, every=3)
    runs = calibrate.measure_runs(engine, engine.new_cache(), (1, 8, 32), clock=engine.clock)  # type: ignore[arg-type]
    assert all(len(r) == 3 for r in runs.values())  # passes under a quarter second: 3 repeats
    assert calibrate.curve_of(runs).seconds == pytest.approx((0.2, 0.2, 0.2))
    slow = FakeEngine(lambda n: 0.5, 32)
    runs = calibrate.measure_runs(slow, slow.new_cache(), (1, 8), clock=slow.clock)  # type: ignore[arg-type]
    assert all(len(r) == 2 for r in runs.values())


def test_a_curve_a_run_found_far_off_is_measured_afresh_by_the_next(tiny_model: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A stored curve a run's passes contradicted by more than 2x is saved as stale; the next
    session measures it again (keeping what was learnt about acceptance). The measurement
    reads a clock that moves 1 ms a reading, so every pass takes 1 ms: whether a busy machine
    makes the real passes look noisy (and the new curve untrusted) is not this test's subject."""
    from specrun.planner_memory import PlannerMemory, load, memory_path
    from specrun.session import Session
    from specrun.speculate.acceptance import AcceptanceStats
    from specrun.speculate.planner import LearntCurve

    ticks = itertools.count()
    monkeypatch.setattr(calibrate, "measure_checked",
                        functools.partial(calibrate.measure_checked, clock=lambda: next(ticks) / 1000))
    with Session(SessionConfig(tiny_model, None, tmp_path)) as s:
        s.open(256)
        file = memory_path(tmp_path, tiny_model, s.target.settings_key())
        far = LearntCurve(CostCurve((1, 2, 4), (1.0, 2.0, 4.0)))  # 1000x what the tiny model takes
        for _ in range(LearntCurve.MIN_PASSES):
            far.observe(2, 0.002)
        assert far.stale and far.replaced
        PlannerMemory(file, far, {"ngram": AcceptanceStats(counts={("ngram", 1, 1): [3, 4]})}).save()
        assert load(file) is not None and not load(file).trusted  # type: ignore[union-attr]
        notices: list[str] = []
        s.notice = notices.append
        cal = s.calibrated()
        assert any("measuring this machine's cost curve" in n for n in notices) and cal.trusted
        assert cal.cost.cost(4) == pytest.approx(0.001) and cal.stats["ngram"].counts == {("ngram", 1, 1): [3, 4]}
