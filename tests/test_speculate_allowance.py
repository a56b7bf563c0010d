"""A generation never loses more than its allowance to trees that miss (speculate/allowance.py)."""

from __future__ import annotations

import pytest

from specrun.generate import Generation, GenerationConfig
from specrun.sampling import SamplingConfig
from specrun.speculate.acceptance import AcceptanceStats
from specrun.speculate.allowance import SHARE, Allowance, Risk, holds
from specrun.speculate.merge import chances
from specrun.speculate.planned import PlannedSpeculator, Source
from specrun.speculate.planner import CostCurve, best_subtree
from specrun.speculate.tree import DraftTree
from tests.clocks import FakeClock
from tests.fakes import CountingEngine, FixedDrafter, NextTokenDrafter

CPU = CostCurve((1, 2, 4, 8), (0.07, 0.10, 0.105, 0.2))  # in RAM on 2 cores: 4 tokens cost 1.5x one


def _measured(spare_s: float = 0.0) -> Allowance:
    return Allowance(spare_s=spare_s, plain_s=0.07)


def test_nothing_is_admitted_before_a_plain_step_was_measured() -> None:
    fresh = Allowance()
    assert not fresh.admits(0.07, 0.07, [1.0, 1.0])
    fresh.step(1, 0.07, speculated=False)
    assert fresh.plain_s == 0.07 and fresh.spare_s == pytest.approx(SHARE * 0.07)


def test_what_a_step_saves_or_loses_moves_the_allowance() -> None:
    a = _measured(0.01)
    a.step(4, 0.105, speculated=True)  # 4 tokens for the price of 1.5
    assert a.spare_s == pytest.approx(0.01 + (1 + SHARE) * 4 * 0.07 - 0.105) and a.plain_s == 0.07
    a.step(1, 0.105, speculated=True)  # a miss
    assert a.spare_s == pytest.approx(0.01 + (1 + SHARE) * 5 * 0.07 - 0.21)


CHAIN = [0, 1, 2, 3]  # depths of a root and a chain of 3


@pytest.mark.parametrize("chances, sure, spare_s, kept", [
    ([1.0, 0.6, 0.36, 0.22], None, 0.0, [0]),  # misses 40% of the time: only what the allowance covers
    ([1.0, 0.6, 0.36, 0.22], None, 0.035, [0, 1, 2, 3]),  # 4 tokens cost 0.035 s more than 1: covered
    ([1.0, 0.9, 0.81, 0.73], None, 0.0, [0, 1, 2, 3]),  # one token pays it back 90% of the time
    ([1.0, 0.9, 0.81, 0.73], [1.0, 0.5, 0.25, 0.12], 0.0, [0]),  # priced at 0.9 while young, surely 0.5
])
def test_a_plan_keeps_what_the_allowance_admits(chances: list[float], sure: list[float] | None, spare_s: float,
                                                kept: list[int]) -> None:
    assert best_subtree(chances, CPU) == [0, 1, 2, 3]  # without one, the chain pays by expectation
    risk = Risk(_measured(spare_s), sure or chances, CHAIN)
    assert best_subtree(chances, CPU, risk=risk) == kept


def test_siblings_do_not_add_up_to_a_sure_plan() -> None:
    """Two children of the root surely right 0.4 and 0.5 of the time would miss 10% of the time
    if rates held node by node; they do not (Risk), so only one sure child makes a sure plan."""
    assert best_subtree([1.0, 0.4, 0.5], CPU, risk=Risk(_measured(), [1.0, 0.4, 0.5], [0, 1, 1])) == [0]
    assert best_subtree([1.0, 0.8, 0.1], CPU, risk=Risk(_measured(), [1.0, 0.8, 0.1], [0, 1, 1])) == [0, 1, 2]


def test_a_wide_tree_must_pay_back_what_it_costs_not_just_hit() -> None:
    """In RAM 16 tokens cost 3.5 plain steps: a tree whose children surely hit 90% of the time
    but whose deeper nodes surely do not does not pay its 0.175 s back (3 tokens) often enough."""
    ram = CostCurve((1, 2, 4, 8, 16), (0.07, 0.10, 0.105, 0.2, 0.245))
    depths = [0] + [1] * 5 + [2] * 5 + [3] * 5
    chances = [1.0] + [0.19] * 15  # five chains of 3, their young keys priced at 1 below the first
    sure = [1.0] + [0.18] * 5 + [0.06] * 5 + [0.02] * 5
    assert len(best_subtree(chances, ram)) == 16
    assert best_subtree(chances, ram, risk=Risk(_measured(), sure, depths)) == [0]
    assert len(best_subtree(chances, ram, risk=Risk(_measured(0.2), sure, depths))) == 16


def test_a_young_key_is_surely_right_less_often_than_it_is_priced() -> None:
    stats = AcceptanceStats()
    stats.counts["young"] = [4, 5]
    stats.counts["old"] = [80, 100]
    assert stats.rate("young", sure=True) < 0.6 < stats.rate("young")
    assert stats.rate("old", sure=True) == stats.rate("old")
    assert stats.rate("never tested", sure=True) == 0.0 < stats.rate("never tested")


def test_sure_chances_take_each_nodes_best_sure_rate_along_its_path() -> None:
    tree = DraftTree.rooted(1)
    a = tree.add(2, 0)
    tree.add(3, a)
    tree.add(4, 0)
    stats = {"ngram": AcceptanceStats(), "recycle": AcceptanceStats()}
    stats["ngram"].counts["k"] = [70, 100]
    stats["recycle"].counts["k"] = [20, 100]
    proposers = [(), (("ngram", "k"), ("recycle", "k")), (("ngram", "k"),), (("recycle", "never tested"),)]
    r = stats["ngram"].rate("k")
    assert chances(tree, proposers, stats, sure=True) == [1.0, pytest.approx(r), pytest.approx(r * r), 0.0]


class _Stubborn(AcceptanceStats):
    """Rates that never learn: every node priced at 0.6 (surely so), whatever the target says."""

    def rate(self, key, sure: bool = False) -> float:
        return 0.6

    def update(self, key, accepted: bool) -> None:
        pass


def _run(drafter, stats: AcceptanceStats, allowance: bool, tokens: int = 300) -> tuple[float, list[int]]:
    clock = FakeClock()
    engine = CountingEngine(CPU.cost, clock)
    spec = PlannedSpeculator("ngram", [Source("ngram", drafter, stats)], CPU, max_nodes=8, max_depth=8, clock=clock)
    gen = Generation(engine, engine.new_cache(4096), [1, 2, 3], GenerationConfig(
        max_tokens=tokens, sampling=SamplingConfig(temperature=0), allowance=allowance), spec, clock=clock)
    sizes = [step.drafted + 1 for step in gen if step.target_calls]
    assert gen.tokens == [(4 + i) % 1000 for i in range(tokens)]
    return gen.stats.decode_s, sizes


def test_trees_priced_wrong_cost_a_generation_its_allowance_at_most() -> None:
    """Every tree misses though priced at 0.6 a node: unguarded, each step costs 1.5 plain ones;
    guarded, the generation stays within SHARE of plain decoding (plus one tree)."""
    plain_s = 299 * CPU.cost(1)  # the prefill draws the first of the 300 tokens
    unguarded, _ = _run(FixedDrafter(3, "lookup", False), _Stubborn(), allowance=False)
    guarded, sizes = _run(FixedDrafter(3, "lookup", False), _Stubborn(), allowance=True)
    assert unguarded > 1.4 * plain_s
    assert guarded <= (1 + SHARE) * plain_s + CPU.cost(4) - CPU.cost(1)
    assert sum(n > 1 for n in sizes) > 5  # it did speculate, as far as the allowance let it


def test_a_confident_draft_is_verified_from_the_second_step() -> None:
    stats = AcceptanceStats()
    stats.counts["lookup"] = [95, 100]
    _, sizes = _run(NextTokenDrafter(3, "lookup", False), stats, allowance=True, tokens=40)
    assert sizes[0] == 1 and sizes[1] == 4


def test_it_holds_only_where_passes_climb_with_their_tokens() -> None:
    """A streamed target's flat passes: a miss costs little beside a hit, and plans are not held
    back (on a disk an allowance took the draft model's trees from 2.74x plain to 2.13x)."""
    flat = CostCurve((1, 2, 4, 8), (0.3, 0.3, 0.3, 0.39))
    assert holds(CPU) and not holds(flat)
    stats = _Stubborn()
    clock = FakeClock()
    engine = CountingEngine(flat.cost, clock)
    spec = PlannedSpeculator("ngram", [Source("ngram", FixedDrafter(3, "lookup", False), stats)], flat, max_nodes=8,
                             max_depth=8, clock=clock)
    gen = Generation(engine, engine.new_cache(256), [1, 2, 3], GenerationConfig(
        max_tokens=20, sampling=SamplingConfig(temperature=0)), spec, clock=clock)
    assert all(step.drafted == 3 for step in gen if step.target_calls)  # every step, the first included
