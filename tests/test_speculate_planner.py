"""The budget planner on synthetic cost curves, and calibration on a tiny model."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from specrun.calibrate import measure_cost_curve
from specrun.engines.base import Cache
from specrun.engines.llamacpp import LlamaCppConfig, LlamaCppEngine
from specrun.generate import Generation, GenerationConfig
from specrun.planner_memory import PlannerMemory, load, memory_path
from specrun.sampling import SamplingConfig
from specrun.session import Session, SessionConfig
from specrun.speculate import auto
from specrun.speculate.auto import DraftSpeed, ModelGate
from specrun.speculate.factory import SpecConfig
from specrun.speculate.ngram import MATCH_PRIORS, NgramDrafter, match_priors
from specrun.speculate.base import Draft, Proposal
from specrun.speculate.merge import chances
from specrun.speculate.planned import PlannedSpeculator, Source
from specrun.speculate.acceptance import AcceptanceStats
from specrun.speculate.planner import CostCurve, LearntCurve, StepCost, best_subtree
from specrun.speculate.tree import DraftTree
from tests.clocks import FakeClock
from tests.fakes import ArrayLogits, CountingEngine, FixedDrafter, NextTokenDrafter, add_path

SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 255)
THIS_CPU = CostCurve((1, 2, 3, 4, 6, 8, 12, 16, 24, 32),  # measured here: 1.5B target, 2 threads (ms)
                     (0.055, 0.090, 0.124, 0.133, 0.206, 0.346, 0.440, 0.470, 0.704, 0.704))
OFFLOADED = CostCurve(SIZES, (1.0, 1.0, 1.0, 1.01, 1.02, 1.04, 1.08, 1.15, 1.3))  # weights streamed: flat


def wide_tree(depth: int, width: int) -> tuple[DraftTree, list[float]]:
    """A full tree; each node's chance is 0.8 ** depth / rank (a typical draft-model tree)."""
    tree, chances = DraftTree.rooted(0), [1.0]
    frontier = [0]
    for _ in range(depth):
        nxt = []
        for parent in frontier:
            for rank in range(width):
                node = tree.add(rank, parent)
                chances.append(chances[parent] * 0.8 / (rank + 1))
                nxt.append(node)
        frontier = nxt
        if len(tree) > 400:
            break
    return tree, chances


def test_cost_curve_interpolates_and_extrapolates() -> None:
    c = CostCurve((1, 2, 4), (1.0, 1.5, 2.5))
    assert c.cost(3) == pytest.approx(2.0) and c.cost(6) == pytest.approx(3.5)
    flat_tail = CostCurve((1, 2, 3), (1.0, 3.0, 3.0))
    assert flat_tail.cost(5) == pytest.approx(5.0)  # the average slope, not the flat last segment
    with pytest.raises(ValueError):
        CostCurve((2, 4), (1.0, 2.0))


def test_cost_curve_interpolation_matches_numpys() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        sizes = tuple(sorted({1, *(int(x) for x in rng.integers(2, 300, size=int(rng.integers(0, 12))))}))
        seconds = tuple(np.cumsum(rng.uniform(0.0, 1.0, size=len(sizes))) + 0.01)
        c = CostCurve(sizes, seconds)
        for n in range(0, sizes[-1] + 1):
            assert c.cost(n) == pytest.approx(float(np.interp(n, sizes, seconds)), rel=1e-12)


def test_flat_costs_choose_large_trees_and_steep_costs_small_ones() -> None:
    tree, chances = wide_tree(depth=6, width=3)
    offloaded = best_subtree(chances, OFFLOADED)
    cpu = best_subtree(chances, THIS_CPU)
    assert len(offloaded) >= 100
    assert 1 <= len(cpu) <= 8
    # expected tokens per second of verifying the plan, relative to plain decoding
    speedup = sum(chances[i] for i in offloaded) / OFFLOADED.cost(len(offloaded)) * OFFLOADED.cost(1)
    assert speedup > 3
    for keep in (offloaded, cpu):  # connected: every kept node's parent is kept
        assert keep[0] == 0 and all(tree.parents[i] in keep for i in keep[1:])


def test_unlikely_drafts_are_not_verified_at_all() -> None:
    chances = [1.0, 0.3, 0.1, 0.05]
    assert best_subtree(chances, THIS_CPU) == [0]  # 1.3 tokens for 1.6x the cost: plain wins
    assert len(best_subtree(chances, OFFLOADED)) == 4


def test_likely_drafts_are_verified_on_this_cpu() -> None:
    assert best_subtree([1.0, 0.95, 0.9, 0.85], THIS_CPU) == [0, 1, 2, 3]


def test_acceptance_stats_explore_then_learn() -> None:
    s = AcceptanceStats(explore=3)
    assert s.rate("k") == s.optimistic
    for _ in range(3):
        s.update("k", False)
    assert s.rate("k") < 0.4
    for _ in range(50):
        s.update("k", True)
    assert s.rate("k") > 0.9


def test_an_unlucky_start_does_not_rule_a_key_out() -> None:
    """Two early failures of a key that is right 80% of the time: the optimism of the bound
    keeps it worth verifying on this CPU (a 2-token pass at 1.6x needs > 0.6), and with
    more data the rate settles near the truth."""
    s = AcceptanceStats()
    s.counts["k"] = [0, 2]
    assert s.rate("k") > 0.2
    s.counts["k"] = [1, 3]
    assert s.rate("k") > 0.6
    s.counts["k"] = [800, 1000]
    assert 0.79 < s.rate("k") < 0.81
    s.counts["k"] = [30, 100]
    assert s.rate("k") < 0.4


def test_a_rarely_accepted_keys_rate_stays_near_the_truth() -> None:
    """A recycled rank right 5% of the time, tested four times a step for hundreds of steps:
    its rate is what plans buy nodes by, so it must not stay inflated. With the bound kept on
    windowed counts and halves rounded up it read 0.10-0.12, and plans verified twice the
    nodes that paid."""
    rng = np.random.default_rng(0)
    s, rates = AcceptanceStats(), []
    for step in range(400):
        if step >= 100:
            rates.append(s.rate("k"))
        for _ in range(4):
            s.update("k", bool(rng.random() < 0.05))
    assert 0.03 < float(np.mean(rates)) < 0.075


def test_a_keys_few_tests_are_drawn_towards_its_coarser_keys_rate() -> None:
    """A key with few tests of its own starts from what its coarser keys measured, not from a
    half: a recycled rank right once in 50 at depth 1 prices a new depth low at once."""
    s = AcceptanceStats()
    for i in range(50):
        s.update(("recycle", 4, 1), i == 0)
    for _ in range(3):
        s.update(("recycle", 4, 2), False)
    assert s.rate(("recycle", 4, 2)) < 0.1  # drawn towards a half, with the bound: 0.36


def test_a_new_key_takes_the_rate_of_the_coarser_keys_tested() -> None:
    """A depth or a suffix share not seen yet is priced by what its source measured at that
    match length, not as optimistic: each new key priced at 0.8 cost a 16-node pass in RAM."""
    s = AcceptanceStats()
    for _ in range(20):
        s.update(("ngram", 1, 1), False)
        s.update(("suffix", 16, 4, 1), True)
    assert s.rate(("ngram", 1, 2)) < 0.2 and s.rate(("ngram", 1, 1)) < 0.2  # pooled over depths
    assert s.rate(("suffix", 16, 2, 3)) > 0.9 and s.rate(("suffix", 16, 4, 1)) > 0.9  # over shares too
    assert s.rate(("ngram", 16, 1)) == s.optimistic  # another match length: nothing coarser known
    assert s.rate("k") == s.optimistic
    s.update(("ngram", 1, 2), True)  # once is not enough to price a key by its own tests
    assert s.rate(("ngram", 1, 2)) < 0.3


def test_an_untested_match_length_starts_from_its_measured_prior() -> None:
    """Long matches start where HumanEval measured them (a 16-node chain of them pays in RAM even
    on a steep curve), short ones low; tests then take over, per key and pooled."""
    s = AcceptanceStats(priors=match_priors("suffix"))
    assert s.rate(("suffix", 16, 4, 1)) == MATCH_PRIORS[16] > 0.9
    assert s.rate(("suffix", 1, 2, 3)) == MATCH_PRIORS[1] < 0.3
    assert s.rate(("ngram", 16, 1)) == s.optimistic  # no prior for another source's keys
    for _ in range(3):
        s.update(("suffix", 16, 4, 1), False)
    assert s.rate(("suffix", 16, 4, 1)) < 0.5 and s.rate(("suffix", 16, 2, 2)) < 0.5
    assert s.rate(("suffix", 8, 4, 1)) == MATCH_PRIORS[8]


def test_pooled_rates_are_rebuilt_from_saved_counts_and_windowed() -> None:
    s = AcceptanceStats()
    for i in range(300):
        s.update(("recycle", i % 5, 1 + i % 3), i % 4 == 0)
    again = AcceptanceStats(counts={k: list(v) for k, v in s.counts.items()})
    assert again.pooled.keys() == s.pooled.keys() == set(s.counts) | {("recycle", r) for r in range(5)}
    assert all(t <= AcceptanceStats.WINDOW for _, t in again.pooled.values())
    assert again.rate(("recycle", 2, 4)) == pytest.approx(s.rate(("recycle", 2, 4)), abs=0.05)


def test_node_chances_multiply_along_paths() -> None:
    tree = DraftTree.rooted(0)
    add_path(tree, [1, 2])
    s = AcceptanceStats(explore=0, prior_accept=1, prior_reject=1, confidence=0)
    s.counts["a"] = [8, 8]  # (8 + 1) / (8 + 2) = 0.9
    assert chances(tree, [(), (("s", "a"),), (("s", "a"),)], {"s": s}) == pytest.approx([1.0, 0.9, 0.81])


class RecordingSpeculator(PlannedSpeculator):
    """Keeps every verified tree and accepted path, to count the tests exactly."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[DraftTree, list[int]]] = []

    def observe(self, proposal: Proposal, path: list[int], wall_s: float, pass_s: float | None = None,
                logits=None) -> None:
        self.seen.append((proposal.tree, path))
        super().observe(proposal, path, wall_s, pass_s, logits)


def test_planned_speculation_is_exact_and_learns(tiny_model: Path) -> None:
    with LlamaCppEngine(tiny_model, LlamaCppConfig(n_threads=1, max_tree_nodes=64)) as e:
        cache = e.new_cache(512)
        prompt = e.vocab.tokenize("hello world hello world hello world")
        cfg = GenerationConfig(max_tokens=80, sampling=SamplingConfig(temperature=0))
        plain = Generation(e, cache, prompt, cfg)
        list(plain)
        stats = AcceptanceStats()
        spec = RecordingSpeculator("ngram", [Source("ngram", NgramDrafter(), stats)], OFFLOADED, max_depth=8)
        gen = Generation(e, cache, prompt, cfg, spec)
        list(gen)
    assert gen.tokens == plain.tokens
    assert gen.stats.accepted_tokens > 0
    # A node is tested when its parent was accepted; each test counts once, under its key.
    tested = sum(sum(tree.parents[i] in path for i in range(1, len(tree))) for tree, path in spec.seen)
    accepted = sum(len(path) - 1 for _, path in spec.seen)
    assert sum(t for _, t in stats.counts.values()) == tested > 0
    assert sum(a for a, _ in stats.counts.values()) == accepted == gen.stats.accepted_tokens


def test_calibration_measures_saves_and_loads(tiny_model: Path, tmp_path: Path) -> None:
    with LlamaCppEngine(tiny_model, LlamaCppConfig(n_threads=1, max_tree_nodes=39)) as e:
        cache = e.new_cache(256)
        seen: list[int] = []
        curve = measure_cost_curve(e, cache, sizes=(1, 2, 4, 8), reps=1, on_size=seen.append)
        assert cache.kv_len == 0
    assert seen == [1, 2, 4, 8] and curve.sizes == (1, 2, 4, 8)
    assert all(a <= b for a, b in zip(curve.seconds, curve.seconds[1:]))
    path = memory_path(tmp_path, tiny_model, "threads=1")
    stats = AcceptanceStats()
    stats.update(("ngram", 3, 1), True)
    stats.update(("model", 2, 4), False)
    steps = {"tree": StepCost(curve, per_node=0.02, hidden=0.15, steps=7, kept=12.5)}
    PlannerMemory(path, curve, {"ngram": stats}, {"draft.gguf": DraftSpeed(12.5, 4, 1)}, "threads=1", {}, steps).save()
    loaded = load(path)
    assert loaded is not None and loaded.cost == curve and loaded.settings == "threads=1"
    assert loaded.steps == steps
    assert loaded.stats["ngram"].counts == {("ngram", 3, 1): [1, 1], ("model", 2, 4): [0, 1]}
    assert loaded.speeds == {"draft.gguf": DraftSpeed(12.5, 4, 1)}
    assert load(tmp_path / "missing.json") is None


def test_first_format_calibration_files_are_still_read(tmp_path: Path) -> None:
    path = tmp_path / "old.json"
    path.write_text(json.dumps({
        "settings": "llama-cpp-python 0.3.36, threads 2", "sizes": [1, 2, 4], "seconds": [0.03, 0.05, 0.07],
        "memory": {"draft.gguf": {"rate": 9.1, "steps": 12.0, "runs_without": 3.0}},
        "acceptance": {"ngram": {"ngram|8|1": [5, 6]}, "model": {"model|3|-1": [1, 2]}}}))
    loaded = load(path)
    assert loaded is not None and loaded.cost == CostCurve((1, 2, 4), (0.03, 0.05, 0.07))
    assert loaded.stats["ngram"].counts == {("ngram", 8, 1): [5, 6]}
    assert loaded.stats["model"].counts == {("model", 3, -1): [1, 2]}
    assert loaded.speeds["draft.gguf"] == DraftSpeed(9.1, 12, 3)
    loaded.save()  # rewritten in the current format, and read back the same
    again = load(path)
    assert json.loads(path.read_text())["version"] == 2 and again is not None
    assert again.stats["ngram"].counts == loaded.stats["ngram"].counts and again.speeds == loaded.speeds
    path.write_text(json.dumps({"version": 99}))  # from a later specrun: measured again
    assert load(path) is None


class _CountingDrafter:
    """A costly drafter whose one candidate is never accepted."""

    costly = True

    def __init__(self) -> None:
        self.calls = 0

    def draft(self, context, max_nodes, max_depth) -> Draft:
        self.calls += 1
        tree = DraftTree.rooted(context[-1])
        tree.add(7, 0)
        return Draft(tree, [("root",), "bad"])

    def accepted(self, tokens) -> None:
        pass


def test_a_costly_drafter_rests_while_nothing_it_drafts_pays() -> None:
    stats = AcceptanceStats()
    stats.counts["bad"] = [0, 50]
    drafter = _CountingDrafter()
    spec = PlannedSpeculator("tree", [Source("model", drafter, stats)], THIS_CPU)
    proposed = [len(spec.propose([1, 2, 3], 4, 32).tree) for _ in range(100)]
    assert proposed == [1] * 100  # nothing verified
    assert drafter.calls <= 8  # rests 1, 2, 4, ... 32 steps between tries: log-many drafts, not 100
    stats.counts["bad"] = [50, 50]  # the text changed: its drafts are right now
    for _ in range(40):
        spec.propose([1, 2, 3], 4, 32)
    assert len(spec.propose([1, 2, 3], 4, 32).tree) == 2  # back to drafting and verifying within MAX_REST steps


@pytest.mark.parametrize("model_rate, lookup_wins", [(50.0, False), (4.0, True)])
def test_auto_prefers_lookup_only_where_its_expected_rate_beats_the_models(model_rate: float,
                                                                          lookup_wins: bool) -> None:
    """On a flat cost curve (an offloaded target) a lookup tree of 3 likely nodes pays, but a
    draft model measured at 50 tok/s pays more: auto must not settle for lookup there."""
    flat = CostCurve((1, 64), (0.3, 0.3))
    stats = AcceptanceStats()
    stats.counts["lookup"] = [90, 100]
    stats.counts["model"] = [90, 100]
    lookup_drafter, model_drafter = FixedDrafter(3, "lookup", False), FixedDrafter(20, "model", True)
    speed = DraftSpeed(rate=model_rate, steps=10)
    spec = PlannedSpeculator("auto", [Source("ngram", lookup_drafter, stats), Source("model", model_drafter, stats)],
                             flat, 64, gate=ModelGate(flat, speed))
    tree = spec.propose([1, 2, 3], 32, 64).tree
    assert (len(tree) == 4) == lookup_wins  # lookup's chain: ~3.4 tokens per 0.3 s pass = 11 tok/s
    assert model_drafter.calls == (0 if lookup_wins else 1)


def test_auto_stops_loading_a_draft_model_that_does_not_pay_and_looks_again_later() -> None:
    plain = 1 / THIS_CPU.cost(1)  # 18 tok/s
    assert DraftSpeed().should_load(plain)  # never measured: try it
    speed = DraftSpeed(rate=5.0, steps=3)
    assert not any(speed.should_load(plain) for _ in range(auto.RETRY_RUNS - 1))
    assert speed.runs_without == auto.RETRY_RUNS - 1
    assert speed.should_load(plain) and speed == DraftSpeed()  # forgotten, so measured afresh
    assert DraftSpeed(rate=16.0, steps=3).should_load(plain)  # close to plain: keep looking
    assert DraftSpeed(rate=5.0, steps=1).should_load(plain)  # not tried enough
    speed = DraftSpeed()
    for rate in (10.0, 20.0, 20.0):
        speed.record(rate)
    assert speed.steps == 3 and speed.rate == pytest.approx(0.7 * (0.7 * 10 + 0.3 * 20) + 0.3 * 20)


def test_a_draft_model_is_tried_only_where_the_cost_curve_lets_one_pay() -> None:
    assert not auto.could_pay(THIS_CPU, 0.44 * THIS_CPU.cost(1))  # a 0.5B draft beside a 1.5B target in RAM
    assert auto.could_pay(THIS_CPU, 0.0)  # one costing nothing could: 4 tokens cost 2.4x one
    assert auto.could_pay(OFFLOADED, 0.3)  # a streamed pass costs its read: trees pay even a slow draft
    assert not auto.could_pay(CostCurve((1, 2, 4), (1.0, 2.0, 4.0)), 0.0)  # every token costs a pass


def test_a_session_leaves_a_draft_that_cannot_pay_unloaded(tiny_model: Path, tmp_path: Path) -> None:
    """The tiny draft is the target itself: in RAM on the CPU its passes cost the target's, so
    no tree of it can beat plain decoding, and auto neither loads nor uses it."""
    specs = (SpecConfig("auto"), SpecConfig("chain"))
    with Session(SessionConfig(tiny_model, tiny_model, tmp_path, specs)) as s:
        s.open(256)
        spec = s.speculator(SpecConfig("auto"))
        assert s.draft_hopeless and s.draft is None
        assert isinstance(spec, PlannedSpeculator) and spec.costly is None
        s.speculator(SpecConfig("chain"))  # loaded for chain: auto still leaves it out
        assert s.draft is not None
        assert s.speculator(SpecConfig("auto")).costly is None


def test_a_session_loads_the_draft_only_for_modes_that_use_it(tiny_model: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("specrun.session.could_pay", lambda cost, draft_pass_s: True)  # a draft that might pay
    specs = (SpecConfig("auto"), SpecConfig("chain"))
    with Session(SessionConfig(tiny_model, tiny_model, tmp_path, specs)) as s:
        s.open(256)
        speeds = s.calibrated().speeds
        speeds[tiny_model.name] = DraftSpeed(rate=1e-3, steps=5)  # far slower than plain decoding
        spec = s.speculator(SpecConfig("auto"))
        assert isinstance(spec, PlannedSpeculator) and spec.costly is None and s.draft is None
        s.speculator(SpecConfig("chain"))
        assert s.draft is not None and s.draft_cache is not None and s.cache is not None
        assert s.draft_cache.n_ctx == s.cache.n_ctx
        speeds[tiny_model.name] = DraftSpeed()
        spec = s.speculator(SpecConfig("auto"))
        assert isinstance(spec, PlannedSpeculator) and spec.costly is not None


def test_overlapped_and_sequential_runs_learn_their_step_costs_apart(tiny_model: Path, tmp_path: Path) -> None:
    """A step that drafted during the previous pass costs differently from one that did not:
    bench's side-by-side rows (and a user switching --overlap) must not average the two."""
    specs = (SpecConfig("tree", overlap="on"), SpecConfig("tree", overlap="off"))
    with Session(SessionConfig(tiny_model, tiny_model, tmp_path, specs)) as s:
        s.open(256)
        on, off = (s.speculator(spec) for spec in specs)
        assert isinstance(on, PlannedSpeculator) and isinstance(off, PlannedSpeculator)
        assert on.step_cost is not off.step_cost
        assert set(s.calibrated().steps) == {"tree", "tree, overlapped"}
        assert s.speculator(specs[0]).step_cost is on.step_cost  # learnt across runs of a mode


def test_a_small_context_still_calibrates_the_whole_curve(tiny_model: Path, tmp_path: Path) -> None:
    with Session(SessionConfig(tiny_model, None, tmp_path)) as s:
        n_ctx = s.open(16).n_ctx
        assert 32 <= s.calibrated().cost.max_size <= 255  # the rest of the way while passes stay cheap
        assert s.cache is not None and s.cache.n_ctx == n_ctx and s.cache.kv_len == 0


def test_a_cache_too_small_to_measure_in_is_widened_then_restored(tiny_model: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """llama.cpp pads small contexts to 256 cells, so ask the measurement for more than that."""
    import specrun.calibrate as calibrate

    opened: list[int] = []
    with Session(SessionConfig(tiny_model, None, tmp_path)) as s:
        first = s.open(256)
        n_ctx = first.n_ctx
        monkeypatch.setattr(calibrate, "context_needed", lambda sizes=calibrate.SIZES: 1024)
        real_new_cache, made = s.target.new_cache, [first]

        def new_cache(n: int):
            opened.append(n)
            made.append(real_new_cache(n))
            return made[-1]

        monkeypatch.setattr(s.target, "new_cache", new_cache)
        assert s.calibrated().cost.max_size >= 32
        assert opened == [1024, n_ctx] and s.cache is made[-1] and s.cache.n_ctx == n_ctx and s.cache.kv_len == 0
        for replaced in made[:-1]:  # freed, not left beside the ones that replaced them
            with pytest.raises(ValueError, match="closed"):
                s.target.eval(replaced, [1])


def test_a_directory_calibration_changes_with_its_weights(tmp_path: Path) -> None:
    d = tmp_path / "model"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"x" * 100)
    before = memory_path(tmp_path, d, "torch")
    (d / "model.safetensors").write_bytes(b"x" * 200)
    assert memory_path(tmp_path, d, "torch") != before


def test_a_step_costs_its_pass_plus_the_drafting_that_does_not_hide_behind_it() -> None:
    flat = CostCurve((1, 64), (0.3, 0.3))
    step = StepCost(flat)
    assert step.cost(1) == step.cost(40) == 0.3  # nothing measured yet: the pass alone
    step.observe(20, drafting_s=0.4, wall_s=0.6)  # 0.1 s of the 0.4 hid behind the pass
    assert step.per_node == pytest.approx(0.02) and step.hidden == pytest.approx(0.1)
    assert step.cost(1) == 0.3  # plain decoding drafts nothing
    assert step.cost(4) == pytest.approx(0.3)  # 0.08 s of drafting: hidden, free
    assert step.cost(20) == pytest.approx(0.6) and step.cost(40) == pytest.approx(1.0)
    step.observe(20, drafting_s=0.4, wall_s=0.8)  # the draft slowed the pass (shared cores)
    assert step.hidden == pytest.approx(0.1 + 0.3 * (-0.1 - 0.1))
    step.observe(1, drafting_s=0.0, wall_s=0.3)  # plain steps say nothing about drafting
    assert step.steps == 2
    first = StepCost(flat)  # a first draft grew twice the candidates its plan kept
    first.observe(20, drafting_s=0.8, wall_s=1.0, needed=0.5)
    assert first.per_node == pytest.approx(0.02) and first.hidden == pytest.approx(0.3 + 0.8 - 1.0)
    first.observe(20, drafting_s=0.2, wall_s=0.3, afresh=True)  # measured afresh: replaces, not averages
    assert first.per_node == pytest.approx(0.01) and first.hidden == pytest.approx(0.2)


def test_nodes_found_during_the_previous_pass_cost_no_drafting() -> None:
    """With overlap, drafting during the previous pass costs no wall time. Charged to every
    verified node, it made drafting look 25 ms a node (a 100 ms pass of it over 4 nodes),
    and overlapped plans kept 5 nodes where sequential ones kept 8."""
    flat = CostCurve((1, 64), (0.1, 0.1))
    step = StepCost(flat)
    step.observe(12, drafting_s=0.04, wall_s=0.14, free=8)  # 8 prepared; 4 grown after the pass, in 40 ms
    assert step.per_node == pytest.approx(0.01) and step.free == 8 and step.hidden == pytest.approx(0.0)
    assert step.cost(8) == pytest.approx(0.1)  # what the previous pass found costs its verification only
    assert step.cost(12) == pytest.approx(0.14) and step.cost(20) == pytest.approx(0.22)
    step.observe(12, drafting_s=0.12, wall_s=0.22, free=0)  # a miss: the whole tree drafted after the pass
    assert step.free == pytest.approx(0.7 * 8) and step.per_node == pytest.approx(0.01)
    assert StepCost.from_json(flat, step.to_json()) == step
    assert StepCost.from_json(flat, {"per_node": 0.01, "hidden": 0, "steps": 3, "kept": 9}).free == 0  # older files


def test_trees_shrink_to_what_their_drafting_pays_for() -> None:
    """On an offloaded target a pass costs the same for 1 or 255 nodes; the planner used to
    keep hundreds of nodes however long the draft model took to grow them. With drafting in
    the step's cost, trees stop where a node's drafting costs more than it is expected to
    yield; drafting that hides behind the pass is free (and a cheaper step raises the rate
    every further node must beat)."""
    _, chances = wide_tree(depth=6, width=3)
    free = best_subtree(chances, StepCost(OFFLOADED))
    costly = best_subtree(chances, StepCost(OFFLOADED, per_node=0.03))
    hidden = best_subtree(chances, StepCost(OFFLOADED, per_node=0.03, hidden=0.6))
    assert len(free) >= 100
    assert 4 <= len(costly) < len(free) / 2 and 4 <= len(hidden) < len(free) / 2
    likeliest = sorted(chances[1:], reverse=True)
    for keep, hide in ((costly, 0.0), (hidden, 0.6)):  # the best k by brute force, slowly and obviously
        step = StepCost(OFFLOADED, per_node=0.03, hidden=hide)
        rates = [(1 + sum(likeliest[:k])) / step.cost(k + 1) for k in range(len(likeliest) + 1)]
        assert len(keep) - 1 == max(range(len(rates)), key=lambda k: (rates[k], -k))


class _SlowDrafter(FixedDrafter):
    """Each draft takes 0.05 s of `clock`."""

    def __init__(self, n: int, key: str, costly: bool, clock: FakeClock) -> None:
        super().__init__(n, key, costly)
        self.clock = clock

    def draft(self, context, max_nodes, max_depth):
        self.clock.advance(0.05)
        return super().draft(context, max_nodes, max_depth)


def test_a_planned_speculator_charges_drafting_to_the_nodes_not_found_during_the_pass() -> None:
    flat = CostCurve((1, 64), (0.1, 0.1))
    stats = AcceptanceStats()
    stats.counts["model"] = [95, 100]
    clock = FakeClock()
    drafter = _SlowDrafter(6, "model", True, clock)  # 0.05 s a draft
    spec = PlannedSpeculator("tree", [Source("model", drafter, stats)], flat, max_nodes=8, clock=clock)
    drafter.prepared = [False, True, True, True, False, False, False]  # the root, then a chain
    proposal = spec.propose([1, 2, 3], 8, 8)
    assert len(proposal.tree) == 7 and proposal.free == 3
    spec.observe(proposal, list(range(len(proposal.tree))), wall_s=0.15)
    assert spec.step_cost is not None and spec.step_cost.free == 3
    assert spec.step_cost.per_node == pytest.approx(0.05 / 4)  # the draft's time over 4 nodes, not 7


def test_a_planned_speculator_learns_its_step_cost_and_the_next_run_starts_from_it() -> None:
    flat = CostCurve((1, 64), (0.3, 0.3))
    stats = AcceptanceStats()
    stats.counts["model"] = [95, 100]
    clock = FakeClock()
    drafter = _SlowDrafter(40, "model", True, clock)
    spec = PlannedSpeculator("tree", [Source("model", drafter, stats)], flat, max_nodes=64, clock=clock)
    assert spec.step_cost is not None and spec.step_cost.steps == 0
    proposal = spec.propose([1, 2, 3], 64, 64)
    tree = proposal.tree
    spec.observe(proposal, list(range(len(tree))), wall_s=0.3 + 0.5)  # the 0.05 s draft, and more, cost wall time
    step = spec.step_cost
    assert step.steps == 1 and step.kept == len(tree)
    assert step.per_node * len(tree) == pytest.approx(0.05) and step.hidden == pytest.approx(0.3 + 0.05 - 0.8)
    again = PlannedSpeculator("tree", [Source("model", drafter, stats)], flat, max_nodes=64, step_cost=step, clock=clock)
    drafter.n = 64
    again_tree = again.propose([1, 2, 3], 64, 64).tree
    assert len(again_tree) - 1 == len(tree) + len(tree) // 4  # not 63: sized from the last run


class _PrefillingDrafter(_SlowDrafter):
    """Spends its 0.05 s prefilling its cache with a new prompt, and reports it."""

    def draft(self, context, max_nodes, max_depth) -> Draft:
        t0 = self.clock()
        draft = super().draft(context, max_nodes, max_depth)
        return replace(draft, catch_up_s=self.clock() - t0)


def test_a_draft_models_prefill_of_a_new_prompt_is_not_counted_as_drafting_the_tree() -> None:
    """The first draft of a run evaluates the whole prompt: counted per tree node, it once made
    drafting look 66 ms a node on a CPU, and the planner stopped verifying draft trees."""
    flat = CostCurve((1, 64), (0.3, 0.3))
    stats = AcceptanceStats()
    stats.counts["model"] = [95, 100]
    clock = FakeClock()
    spec = PlannedSpeculator("tree", [Source("model", _PrefillingDrafter(8, "model", True, clock), stats)], flat, max_nodes=16,
                             clock=clock)
    proposal = spec.propose([1, 2, 3], 16, 16)
    tree = proposal.tree
    assert proposal.catch_up_s == pytest.approx(0.05)
    spec.observe(proposal, [0], wall_s=0.3 + proposal.catch_up_s)
    assert spec.step_cost is not None and spec.step_cost.steps == 1
    assert spec.step_cost.per_node == 0 and spec.step_cost.hidden == pytest.approx(0)
    # Nor in auto's measured speed of the draft model (it decides whether the model pays at all).
    gate = ModelGate(flat)
    auto = PlannedSpeculator("auto", [Source("ngram", FixedDrafter(0, "lookup", False), stats),
                                      Source("model", _PrefillingDrafter(8, "model", True, clock), stats)],
                             flat, max_nodes=16, gate=gate, clock=clock)
    proposal = auto.propose([1, 2, 3], 16, 16)
    tree = proposal.tree
    assert len(tree) > 1 and proposal.costly and proposal.catch_up_s == pytest.approx(0.05)
    auto.observe(proposal, list(range(len(tree))), wall_s=0.3 + proposal.catch_up_s)
    assert gate.speed.rate == pytest.approx(len(tree) / 0.3)


def test_a_drafting_cost_learnt_wrong_is_measured_afresh() -> None:
    """A drafting cost learnt far too high (a run's first draft, a busy machine) used to rule
    out every later tree, and only verified trees teach it. A tree the pass alone pays for
    is now verified after EXPLORE_EVERY steps without one, and a cheap draft brings the
    plans back."""
    flat = CostCurve((1, 64), (0.3, 0.3))
    stats = AcceptanceStats()
    stats.counts["model"] = [95, 100]
    step = StepCost(flat, per_node=1.0, hidden=0.0, steps=5, kept=8)  # a second a node: nothing pays
    drafter = FixedDrafter(8, "model", True)

    def run() -> tuple[list[int], list[bool]]:  # 120 steps of a run starting from `step`
        spec = PlannedSpeculator("tree", [Source("model", drafter, stats)], flat, max_nodes=16, step_cost=step, clock=FakeClock())
        sizes, explored = [], []
        for _ in range(120):
            proposal = spec.propose([1, 2, 3], 16, 16)
            sizes.append(len(proposal.tree))
            explored.append(proposal.explored)
            spec.observe(proposal, list(range(len(proposal.tree))), wall_s=0.3)  # drafting really is free
        return sizes, explored

    # Figures from earlier runs (steps=5): this run verifies a tree at once to measure them afresh.
    sizes, explored = run()
    assert sizes[0] > 1 and explored[0] and sum(explored) == 1
    assert step.per_node < 0.01 and sizes[-20:] == [9] * 20  # back to verifying every draft
    # Within a run: after EXPLORE_EVERY steps without a verified tree, one the pass pays for.
    step.per_node, step.steps = 1.0, 0
    sizes, explored = run()
    first = next(i for i, n in enumerate(sizes) if n > 1)
    every, rest = PlannedSpeculator.EXPLORE_EVERY, PlannedSpeculator.MAX_REST
    assert every - 1 <= first < every + rest and explored[first] and sum(explored) == 1
    assert step.per_node < 0.01 and sizes[-20:] == [9] * 20


def test_a_run_that_learnt_nothing_drafts_a_modest_tree_first_and_grows_it() -> None:
    """A first draft of the calibration's 256 nodes took a second on 2 cores. It starts at
    FIRST_DRAFT candidates; while plans keep all of them, each step drafts a quarter more."""
    flat = CostCurve((1, 256), (0.3, 0.3))
    stats = AcceptanceStats()
    stats.counts["model"] = [99, 100]
    spec = PlannedSpeculator("tree", [Source("model", FixedDrafter(255, "model", True), stats)], flat, max_nodes=256, max_depth=256,
                             clock=FakeClock())  # drafting costs nothing
    sizes = []
    for _ in range(8):
        proposal = spec.propose([1, 2, 3], 256, 256)
        sizes.append(len(proposal.tree))
        spec.observe(proposal, list(range(len(proposal.tree))), wall_s=0.3)
    assert sizes[0] == PlannedSpeculator.FIRST_DRAFT == 32 and sizes[-1] > 100
    assert all(b <= a + a // 4 + 1 for a, b in zip(sizes, sizes[1:]))


# --- what is learnt survives a bad hour -------------------------------------------------------

def test_a_contradicted_cost_curve_is_replaced_and_the_trees_follow() -> None:
    """Calibrated on an idle machine (a pass over 32 tokens about one over 1), then every node
    beyond 4 began to cost 0.4 s mid-run (a busy CPU, memory pressure): the passes contradict
    the curve, it is replaced from what they measured, and the trees shrink to what now pays."""
    idle = LearntCurve(CostCurve((1, 2, 4, 8, 16, 32), (0.30, 0.30, 0.31, 0.32, 0.33, 0.35)))
    stats = AcceptanceStats()
    stats.counts["lookup"] = [970, 1000]
    spec = PlannedSpeculator("ngram", [Source("ngram", FixedDrafter(31, "lookup", False), stats)], idle, max_nodes=32,
                             clock=FakeClock())  # drafting costs nothing
    sizes = []
    for step in range(30):
        proposal = spec.propose([1, 2, 3], 32, 32)
        n = len(proposal.tree)
        sizes.append(n)
        took = 0.30 + (0.002 * n if step < 5 else 0.4 * max(0, n - 4))
        spec.observe(proposal, list(range(n)), wall_s=took, pass_s=took)
    assert sizes[:5] == [32] * 5 and sizes[-1] <= 8
    assert idle.replaced and "replaced it" in idle.replaced[0] and idle.stale  # 5x off: measure afresh next run
    assert idle.seconds == tuple(sorted(idle.seconds)) and idle.cost(1) == pytest.approx(0.30)


def test_passes_within_the_curves_noise_change_nothing() -> None:
    curve = LearntCurve(CostCurve((1, 8, 32), (0.3, 0.4, 0.8)))
    for took in (0.33, 0.28, 0.36, 0.31, 0.35, 0.30, 0.5):  # +-20%, and one outlier: a machine's jitter
        curve.observe(8, took * 4 / 3)
    assert curve.curve == CostCurve((1, 8, 32), (0.3, 0.4, 0.8)) and not curve.replaced
    for _ in range(LearntCurve.MIN_PASSES):  # a machine that became 1.5x slower
        curve.observe(8, 0.6)
    assert curve.cost(8) == pytest.approx(0.6, rel=0.01) and curve.cost(32) == pytest.approx(1.2, rel=0.01)
    assert curve.cost(1) == pytest.approx(0.45, rel=0.01)  # nothing said only size 8 slowed: all of it moves
    assert curve.replaced and not curve.stale  # corrected, and kept: not so far off that it needs measuring


def test_acceptance_weighs_recent_tests_more() -> None:
    """Counts halve beyond WINDOW tests: after a long run of hits (rewrites copying their input),
    a run of misses (a new kind of text) moves the rate within a prompt's few dozen tests,
    not hundreds."""
    s = AcceptanceStats()
    for _ in range(5000):
        s.update("k", True)
    assert s.counts["k"][1] <= AcceptanceStats.WINDOW
    for _ in range(48):
        s.update("k", False)
    assert s.rate("k") < 0.5


def test_a_draft_models_speed_is_judged_against_plain_decoding_measured_with_it() -> None:
    """Measured while the machine ran at half speed (plain 5 tok/s, draft model 8): it paid then
    and still pays, although plain decoding by today's curve runs at 10 tok/s."""
    speed = DraftSpeed()
    for _ in range(auto.TRY_STEPS):
        speed.record(8.0, plain=5.0)
    assert speed.pays(10.0) and DraftSpeed.from_json(speed.to_json()) == speed
    old = DraftSpeed.from_json({"rate": 8.0, "steps": 5, "runs_without": 0})  # files without "plain"
    assert not old.pays(10.0)


def test_a_generation_whose_passes_slow_mid_run_replaces_its_curve_and_shrinks_its_trees() -> None:
    """The generation loop hands each pass's time to the planner: calibrated flat, the passes
    turn steep after 6 steps, the contradicted curve is replaced, and trees shrink with it."""
    curve = LearntCurve(CostCurve((1, 2, 4, 8, 16, 32, 64), (0.01, 0.01, 0.01, 0.011, 0.012, 0.014, 0.018)))
    stats = AcceptanceStats()
    stats.counts["lookup"] = [990, 1000]
    clock = FakeClock()
    engine = CountingEngine(lambda n: 0.01 + (0.0001 if engine.passes < 7 else 0.006) * n, clock)
    spec = PlannedSpeculator("ngram", [Source("ngram", NextTokenDrafter(63, "lookup", False), stats)], curve, max_nodes=64,
                             max_depth=64, clock=clock)
    gen = Generation(engine, engine.new_cache(4096), [1, 2, 3],
                     GenerationConfig(max_tokens=1000, sampling=SamplingConfig(temperature=0)), spec, clock=clock)
    sizes = [step.drafted + 1 for step in gen if step.target_calls]
    assert gen.tokens == [(4 + i) % 1000 for i in range(1000)]  # every drafted token accepted: output unchanged
    assert min(sizes[:6]) >= 32 and sizes[-1] <= 16 and curve.replaced


def test_a_disk_that_speeds_up_moves_the_curve_without_bending_it() -> None:
    """A streamed target's disk drifts: a fast spell seen first in 16-node passes, then in
    1-token ones. The curve moves as a whole once; read size by size, it bent a flat curve
    until 8 tokens cost 1.5x one."""
    curve = LearntCurve(CostCurve((1, 2, 4, 8, 16, 32), (0.30, 0.30, 0.30, 0.31, 0.32, 0.45)))
    for _ in range(4):
        curve.observe(16, 0.32 * 0.6)
    for _ in range(4):
        curve.observe(1, 0.30 * 0.6)
    assert len(curve.replaced) == 1 and "as a whole" in curve.replaced[0] and not curve.stale
    assert curve.cost(1) == pytest.approx(0.18, rel=0.05)
    assert curve.cost(8) / curve.cost(1) < 1.1 and curve.cost(16) / curve.cost(1) < 1.1


def test_a_drifting_disk_timed_at_changing_sizes_keeps_the_curves_shape() -> None:
    """Slow and fast spells 2x apart (a streamed target's disk within a run) while the trees
    change size from step to step: the curve moves, but 16 tokens keep costing what the
    calibration said against one."""
    rng = np.random.default_rng(5)
    curve = LearntCurve(CostCurve((1, 2, 4, 8, 16, 32), (0.30, 0.30, 0.30, 0.31, 0.32, 0.45)))
    for spell in range(16):
        speed = (0.7, 1.4)[spell % 2]
        for _ in range(int(rng.integers(4, 10))):
            n = int(rng.choice([1, 4, 16, 24]))
            curve.observe(n, 0.30 * speed * (1.1 if n > 16 else 1.0) * rng.uniform(0.9, 1.1))
    assert curve.replaced and all("as a whole" in r for r in curve.replaced)
    assert curve.cost(16) / curve.cost(1) == pytest.approx(0.32 / 0.30, rel=0.01)


def test_a_size_off_against_the_passes_around_it_reshapes_the_curve() -> None:
    """A CPU's 16-token passes at 1.5x its calibration among one-token passes that agree: the
    shape was wrong (not the machine's speed), and only the larger sizes move."""
    curve = LearntCurve(CostCurve((1, 2, 4, 8, 16, 32), (0.03, 0.06, 0.10, 0.20, 0.22, 0.33)))
    for _ in range(LearntCurve.MIN_PASSES):
        for _ in range(3):
            curve.observe(1, 0.03)
        curve.observe(16, 0.33)
    assert len(curve.replaced) == 1 and "replaced it" in curve.replaced[0] and not curve.stale
    assert curve.cost(1) == pytest.approx(0.03) and curve.cost(16) == pytest.approx(0.33, rel=0.05)


@pytest.mark.parametrize("seed", range(10))
def test_best_subtrees_of_one_tree_is_best_subtree_and_of_several_takes_the_likeliest(seed: int) -> None:
    from specrun.speculate.planner import best_subtrees

    rng = np.random.default_rng(seed)
    curve = CostCurve((1, 4, 16, 64), (1.0, 1.0, 1.3 + rng.random(), 4.0))

    def tree_chances(n: int) -> list[float]:
        parents = [-1] + [int(rng.integers(i)) for i in range(1, n)]
        out = [1.0]
        for i in range(1, n):
            out.append(out[parents[i]] * float(rng.uniform(0.2, 0.99)))
        return out

    one = tree_chances(30)
    assert best_subtrees([one], curve, 64) == [best_subtree(one, curve, 64)]
    several = [tree_chances(int(rng.integers(1, 20))) for _ in range(4)]
    keeps = best_subtrees(several, curve, 64, fixed=2)
    chosen = sorted((c[i] for c, k in zip(several, keeps) for i in k[1:]), reverse=True)
    left = [c[i] for c, k in zip(several, keeps) for i in range(1, len(c)) if i not in k]
    assert not left or not chosen or max(left) <= min(chosen)  # nothing left out is likelier than what was kept
    total = 4 + 2 + len(chosen)
    rate = (6 + sum(chosen)) / curve.cost(total)
    for extra in (1, -1):  # one node more or fewer pays less
        k = len(chosen) + extra
        if 0 <= k <= len(chosen) + len(left):
            pool = sorted(chosen + left, reverse=True)[:k]
            assert (6 + sum(pool)) / curve.cost(6 + k) <= rate * (1 + 1e-9)
