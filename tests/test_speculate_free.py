"""The free drafters (suffix index, token recycling) and the merged tree, against slow references;
speculative output with each source alone and all together against plain decoding."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pytest

from specrun.engines.llamacpp import LlamaCppConfig, LlamaCppEngine
from specrun.generate import Generation, GenerationConfig
from specrun.sampling import SamplingConfig
from specrun.speculate.base import Draft, Verified
from specrun.speculate.draft_model import ModelDrafter
from specrun.speculate.merge import PASSED_OVER, chances, mark_company, mark_passed_over, merge, rate_of
from specrun.speculate.ngram import NgramDrafter
from specrun.speculate.planned import PlannedSpeculator, Source
from specrun.speculate.acceptance import AcceptanceStats
from specrun.speculate.planner import CostCurve
from specrun.speculate.recycle import RecycleDrafter, RecycleTable
from specrun.speculate.suffix import SEPARATOR, SuffixDrafter, SuffixIndex
from specrun.speculate.tree import DraftTree
from tests.fakes import ArrayLogits, add_path, path_to

GREEDY = SamplingConfig(temperature=0)


# --- the suffix index ------------------------------------------------------------------------


def scan_matches(stream: Sequence[int], context: Sequence[int], max_len: int = 32) -> tuple[int, list[int]]:
    """The slow, obviously right `SuffixIndex.matches` (every start, latest first): try every
    position of the stream for every length."""
    best, starts = 0, []
    for length in range(1, min(max_len, len(context)) + 1):
        tail = list(context[-length:])
        hits = [e for e in range(length, len(stream)) if list(stream[e - length:e]) == tail
                and stream[e] != SEPARATOR]
        if not hits:
            break
        best, starts = length, sorted(hits, reverse=True)
    return best, starts


@pytest.mark.parametrize("seed", range(30))
def test_suffix_matches_agree_with_a_brute_force_scan(seed: int) -> None:
    rng = np.random.default_rng(seed)
    symbols = int(rng.integers(2, 6))  # few symbols: long and many matches
    docs = [[int(t) for t in rng.integers(0, symbols, size=int(rng.integers(0, 60)))] for _ in range(rng.integers(1, 4))]
    index = SuffixIndex(docs)
    for _ in range(10):
        if rng.random() < 0.5 and any(docs):  # a tail of a document: a long match exists
            doc = max(docs, key=len)
            end = int(rng.integers(1, len(doc) + 1))
            context = [int(t) for t in rng.integers(0, symbols, size=3)] + doc[:end]
        else:
            context = [int(t) for t in rng.integers(0, symbols + 1, size=int(rng.integers(1, 20)))]
        length, starts = index.matches(context, max_len=8, max_hits=10_000)
        want_length, want_starts = scan_matches(list(index.stream), context, max_len=8)
        assert (length, starts) == (want_length, want_starts), (docs, context)


def test_suffix_matches_never_cross_documents() -> None:
    index = SuffixIndex([[1, 2, 3], [4, 5]])
    assert list(index.stream) == [1, 2, 3, SEPARATOR, 4, 5, SEPARATOR]
    assert index.matches([3]) == (0, [])  # 3 ends its document: nothing follows it
    assert index.matches([3, 4]) == (1, [5])  # only the 4 matches: "3 4" spans two documents
    assert SuffixIndex([]).matches([1]) == (0, [])


def test_the_suffix_drafter_builds_a_trie_with_counts() -> None:
    # "7 8" was followed by 1 2 three times and by 1 3 once, and by 5 once.
    context = [7, 8, 1, 2, 0, 7, 8, 1, 2, 0, 7, 8, 1, 3, 0, 7, 8, 5, 0, 7, 8, 1, 2, 0, 9, 7, 8]
    draft = SuffixDrafter().draft(context, max_nodes=32, max_depth=2)
    tree = draft.tree
    one = tree.child(0, 1)
    assert one is not None and tree.child(0, 5) is not None
    assert tree.child(one, 2) is not None and tree.child(one, 3) is not None
    two, three, five = tree.child(one, 2), tree.child(one, 3), tree.child(0, 5)
    # keys: ("suffix", match bucket, share of the parent's occurrences bucket, depth)
    assert draft.keys[one][2] == 3 and draft.keys[five][2] == 0  # 4 of 5 (0.8), 1 of 5 (0.2)
    assert draft.keys[two][2] == 3 and draft.keys[three][2] == 1  # 3 of 4, 1 of 4
    assert all(k[0] == "suffix" and k[1] == 2 for k in draft.keys[1:])  # "9 7 8" is only the end: "7 8"
    small = SuffixDrafter().draft(context, max_nodes=3, max_depth=4)
    assert [small.tree.tokens[i] for i in path_to(small.tree, 2)] == [8, 1, 2]  # the likeliest two nodes


def test_the_suffix_drafter_reads_shared_indexes() -> None:
    corpus = SuffixIndex([[10, 11, 12, 13, 14]])
    drafter = SuffixDrafter(lambda: [corpus])
    tree = drafter.draft([5, 10, 11], max_nodes=8, max_depth=3).tree
    assert [tree.tokens[i] for i in path_to(tree, len(tree) - 1)] == [11, 12, 13, 14]
    assert len(SuffixDrafter().draft([5, 10, 11], max_nodes=8, max_depth=3).tree) == 1


# --- token recycling -------------------------------------------------------------------------

def test_the_recycle_table_keeps_each_tokens_latest_top_k() -> None:
    rng = np.random.default_rng(0)
    table, reference = RecycleTable(k=4), {}
    for _ in range(50):
        logits = rng.normal(size=(6, 40)).astype(np.float32)
        tokens = [int(t) for t in rng.integers(0, 10, size=3)]
        rows = [int(r) for r in rng.choice(6, size=3, replace=False)]
        table.learn(Verified(tokens, ArrayLogits(logits), rows))
        for tok, row in zip(tokens, rows):  # the slow way: a full sort of the row
            reference[tok] = list(np.argsort(-logits[row], kind="stable")[:4])
    assert {t: list(v) for t, v in table.successors.items()} == reference


def test_the_recycle_drafter_grows_breadth_first_through_the_table() -> None:
    drafter = RecycleDrafter(RecycleTable(k=8))
    drafter.table.successors = {1: np.arange(10, 18, dtype=np.int32), 10: np.array([20, 21, 22, 23], dtype=np.int32),
                                11: np.array([30, 31], dtype=np.int32), 20: np.array([40], dtype=np.int32)}
    draft = drafter.draft([5, 1], max_nodes=64, max_depth=8)
    tree = draft.tree
    assert [tree.tokens[i] for i in range(1, 9)] == list(range(10, 18))  # width 8 at the root
    assert sorted(tree.tokens[i] for i in range(len(tree)) if tree.parents[i] == 1) == [20, 21, 22, 23]
    assert sorted(tree.tokens[i] for i in range(len(tree)) if tree.parents[i] == 2) == [30, 31]
    forty = tree.tokens.index(40)
    assert [tree.tokens[i] for i in path_to(tree, forty)] == [1, 10, 20, 40]
    assert draft.keys[1] == ("recycle", 0, 1) and draft.keys[8] == ("recycle", 4, 1)
    assert len(drafter.draft([5, 1], max_nodes=5, max_depth=8).tree) == 5
    assert len(drafter.draft([5, 2], max_nodes=5, max_depth=8).tree) == 1  # nothing recycled after 2


# --- one tree from every drafter --------------------------------------------------------------

def _random_draft(rng: np.random.Generator, root: int, key: str) -> Draft:
    tree = DraftTree.rooted(root)
    for _ in range(int(rng.integers(0, 12))):
        parent = int(rng.integers(len(tree)))
        if tree.child(parent, tok := int(rng.integers(0, 4))) is None:
            tree.add(tok, parent)
    return Draft(tree, [("root",)] + [(key, tree.depths[i] % 2) for i in range(1, len(tree))])


def _paths(tree: DraftTree) -> set[tuple[int, ...]]:
    return {tuple(tree.tokens[j] for j in path_to(tree, i)) for i in range(len(tree))}


@pytest.mark.parametrize("seed", range(20))
def test_a_merged_tree_is_the_union_of_its_sources_with_each_nodes_best_price(seed: int) -> None:
    rng = np.random.default_rng(seed)
    names = ["ngram", "suffix", "recycle", "model"][: int(rng.integers(1, 5))]
    drafts = [(name, _random_draft(rng, 9, name)) for name in names]
    stats = {}
    for name in names:
        stats[name] = AcceptanceStats(explore=0)
        for parity in (0, 1):
            stats[name].counts[(name, parity)] = [int(rng.integers(0, 20)), 20]
    merged = merge(drafts)
    assert _paths(merged.tree) == set().union(*(_paths(d.tree) for _, d in drafts))
    assert len(merged.tree) == len(_paths(merged.tree))  # each path once
    found = chances(merged.tree, merged.proposers, stats)
    for i in range(1, len(merged.tree)):
        path = tuple(merged.tree.tokens[j] for j in path_to(merged.tree, i))
        who = {name for name, d in drafts if path in _paths(d.tree)}
        assert {s for s, _ in merged.proposers[i]} == who
        best = max(stats[name].rate(k) for name, k in merged.proposers[i])
        assert found[i] == pytest.approx(found[merged.tree.parents[i]] * best)
        assert rate_of(merged.proposers[i], stats) == best


def test_nodes_the_draft_model_passed_over_learn_their_own_rate() -> None:
    """Below a node where the model chose other children, a cheap drafter's node is keyed apart
    (the model's top guesses hold most of what it gets right); elsewhere its keys stay."""
    model, ngram = DraftTree.rooted(0), DraftTree.rooted(0)
    add_path(model, [1, 3])  # root -> 1 -> 3
    add_path(model, [2])
    add_path(ngram, [1, 4])  # 4: below 1, where the model grew 3
    add_path(ngram, [5, 6])  # 5: below the root, where the model grew 1 and 2; 6: below 5, which it never saw
    merged = mark_passed_over(merge([("ngram", Draft(ngram, [("root",)] + [("ngram", d) for d in ngram.depths[1:]])),
                                     ("model", Draft(model, [("root",)] + [("model", d) for d in model.depths[1:]]))]),
                              "model")
    keys = {tuple(merged.tree.tokens[j] for j in path_to(merged.tree, i))[1:]: merged.proposers[i]
            for i in range(1, len(merged.tree))}
    assert keys[(1,)] == (("ngram", ("ngram", 1)), ("model", ("model", 1)))
    assert keys[(1, 4)] == (("ngram", ("ngram", 2, PASSED_OVER)),)
    assert keys[(5,)] == (("ngram", ("ngram", 1, PASSED_OVER)),)
    assert keys[(5, 6)] == (("ngram", ("ngram", 2)),)
    assert keys[(1, 3)] == (("model", ("model", 2)),)
    stats = AcceptanceStats()
    for _ in range(10):
        stats.update(("ngram", 1), True)
    assert stats.rate(("ngram", 1, PASSED_OVER)) == stats.rate(("ngram", 1))  # untested: the plain key's
    for _ in range(10):
        stats.update(("ngram", 1, PASSED_OVER), False)
    assert stats.rate(("ngram", 1, PASSED_OVER)) < 0.3 < 0.9 < stats.rate(("ngram", 1))


def test_nodes_learn_apart_by_the_company_they_were_proposed_in() -> None:
    """A node two drafters proposed is keyed apart from the nodes each proposed alone: a recycled
    guess that lookup agreed with is right far more often than one alone, and a key learnt over
    both overprices the lone ones."""
    ngram, recycle = DraftTree.rooted(0), DraftTree.rooted(0)
    add_path(ngram, [1, 2])
    add_path(recycle, [1, 3])
    merged = mark_company(merge([
        ("ngram", Draft(ngram, [("root",)] + [("ngram", d) for d in ngram.depths[1:]])),
        ("recycle", Draft(recycle, [("root",)] + [("recycle", 0, d) for d in recycle.depths[1:]]))]))
    keys = {tuple(merged.tree.tokens[j] for j in path_to(merged.tree, i))[1:]: merged.proposers[i]
            for i in range(1, len(merged.tree))}
    assert keys[(1,)] == (("ngram", ("ngram", 1, "with recycle")), ("recycle", ("recycle", 0, 1, "with ngram")))
    assert keys[(1, 2)] == (("ngram", ("ngram", 2, "alone")),)
    assert keys[(1, 3)] == (("recycle", ("recycle", 0, 2, "alone")),)
    stats = AcceptanceStats()
    for i in range(40):
        stats.update(("recycle", 0, 1, "with ngram"), i % 2 == 0)
    assert stats.rate(("recycle", 0, 1, "alone")) == stats.rate(("recycle", 0, 1))  # untested: the plain key's
    for _ in range(40):
        stats.update(("recycle", 0, 1, "alone"), False)
    assert stats.rate(("recycle", 0, 1, "alone")) < 0.05 < 0.4 < stats.rate(("recycle", 0, 1, "with ngram"))


class ChainDrafter:
    """Drafts a chain as long as it is allowed, and records what it was allowed."""

    costly = False

    def __init__(self) -> None:
        self.allowed: list[int] = []

    def draft(self, context: Sequence[int], max_nodes: int, max_depth: int) -> Draft:
        self.allowed.append(max_nodes)
        tree = DraftTree.rooted(context[-1])
        add_path(tree, list(range(100, 100 + min(max_nodes - 1, max_depth))))
        return Draft(tree, [("root",)] + [("chain", min(d, 3)) for d in tree.depths[1:]])

    def accepted(self, verified: Verified) -> None:
        pass


@pytest.mark.parametrize("dear", [True, False])
@pytest.mark.parametrize("everywhere", [True, False])
def test_a_drafter_that_drafts_everywhere_drafts_fewer_while_its_nodes_are_dropped(dear: bool,
                                                                                    everywhere: bool) -> None:
    """Where passes are dear and its nodes unlikely, the budget of a drafter with a tree below
    every token (recycling) halves each step down to IDLE_FLOOR: drafting and pricing nodes
    nobody verifies cost 3% of a step in RAM. One that drafts where the context matches keeps
    FREE_FLOOR, and one whose nodes the plan keeps drafts twice what it kept."""
    drafter = ChainDrafter()
    curve = CostCurve((1, 2, 64), (1.0, 2.0, 64.0) if dear else (1.0, 1.0, 1.0))
    spec = PlannedSpeculator("free", [Source("chain", drafter, AcceptanceStats(), everywhere=everywhere)],
                             curve, 64, 16)
    for _ in range(6):
        spec.propose([1, 2, 3], 16, 64)
    f = PlannedSpeculator
    dropped = [64, 32, 16, 8, f.IDLE_FLOOR, f.IDLE_FLOOR] if everywhere else [64] + [f.FREE_FLOOR] * 5
    assert drafter.allowed == (dropped if dear else [64] + [2 * 16] * 5)


# --- speculative output equals plain output ---------------------------------------------------

@pytest.fixture(scope="module")
def engine(tiny_model: Path):
    with LlamaCppEngine(tiny_model, LlamaCppConfig(n_threads=1, max_tree_nodes=63)) as e:
        yield e


def _generate(engine, cache, prompt: list[int], sampling: SamplingConfig, speculator=None, max_tokens: int = 48):
    engine.rewind(cache, 0)
    gen = Generation(engine, cache, prompt, GenerationConfig(max_tokens, sampling), speculator)
    for _ in gen:
        pass
    return gen


def _sources(which: str, draft=None) -> list[Source]:
    made = {"ngram": lambda: NgramDrafter(), "suffix": lambda: SuffixDrafter(),
            "recycle": lambda: RecycleDrafter(), "model": lambda: ModelDrafter(draft)}
    names = list(made) if which == "all" else [which]
    return [Source(n, made[n](), AcceptanceStats()) for n in names if n != "model" or draft is not None]


PROMPT = "def fib(n): return fib(n - 1) + fib(n"


@pytest.mark.parametrize("which", ["ngram", "suffix", "recycle", "model", "all"])
@pytest.mark.parametrize("planned", [False, True])
def test_greedy_output_equals_plain_with_each_source_and_all(engine, pair, which: str, planned: bool) -> None:
    cache = engine.new_cache(512)
    prompt = engine.vocab.tokenize(PROMPT)
    plain = _generate(engine, cache, prompt, GREEDY)
    _, same, _ = pair
    flat = CostCurve((1, 64), (0.01, 0.011)) if planned else None  # a pass over 64 tokens costs one's
    spec = PlannedSpeculator(which, _sources(which, same), flat, 24, 8)
    out = _generate(engine, cache, prompt, GREEDY, spec)
    assert out.tokens == plain.tokens and out.text == plain.text
    assert out.stats.drafted_tokens > 0
    proposed = out.stats.sources
    assert set(proposed) <= {s.name for s in spec.sources} and proposed
    for name, c in proposed.items():
        assert c.accepted <= c.verified and (planned or c.verified <= c.proposed)
    if which in ("model", "all"):
        assert out.stats.accepted_tokens > 0  # the same weights draft: their guesses come true


@pytest.mark.parametrize("seed", [1, 2])
def test_seeded_sampling_equals_plain_with_all_sources(engine, pair, seed: int) -> None:
    cache = engine.new_cache(512)
    prompt = engine.vocab.tokenize("hello world hello world hello")
    sampling = SamplingConfig(temperature=0.9, top_p=0.95, seed=seed)
    plain = _generate(engine, cache, prompt, sampling)
    spec = PlannedSpeculator("all", _sources("all", pair[2]), None, 16, 6)
    out = _generate(engine, cache, prompt, sampling, spec)
    assert out.tokens == plain.tokens and out.stats.drafted_tokens > 0


def test_recycled_rows_come_from_the_target_pass() -> None:
    """After a pass, the table holds the target's top-k at every token on the accepted path."""
    tree = DraftTree.rooted(3)
    add_path(tree, [4, 5])
    logits = np.zeros((3, 16), dtype=np.float32)
    for row, best in enumerate((4, 5, 9)):
        logits[row, best] = 5.0
    drafter = RecycleDrafter()
    drafter.accepted(Verified([3, 4, 5], ArrayLogits(logits), [0, 1, 2]))
    assert [int(drafter.table.successors[t][0]) for t in (3, 4, 5)] == [4, 5, 9]


def test_a_session_keeps_the_recycled_table_for_the_next_run(tiny_model: Path, tmp_path: Path) -> None:
    from specrun.planner_memory import load_recycled, recycle_path
    from specrun.session import Session, SessionConfig
    from specrun.speculate.factory import SpecConfig

    def one_run(keep: bool) -> dict:
        with Session(SessionConfig(tiny_model, None, tmp_path, (SpecConfig("auto"),), keep_recycled=keep)) as s:
            s.open(256)
            spec = s.speculator(SpecConfig("auto"))  # calibrates: may replace the cache (read it after)
            assert isinstance(spec, PlannedSpeculator)
            table = next(src.drafter.table for src in spec.sources if src.name == "recycle")
            before = dict(table.successors)
            _generate(s.target, s.cache, s.target.vocab.tokenize(PROMPT), GREEDY, spec, max_tokens=24)
            s.save()
            return before, {t: list(v) for t, v in table.successors.items()}

    path = recycle_path(tmp_path, tiny_model)
    before, after = one_run(keep=False)
    assert before == {} and after and not path.exists()  # bench's way: learnt in the run, not kept
    before, after = one_run(keep=True)
    assert before == {} and path.exists()
    again, _ = one_run(keep=True)
    assert {t: list(v) for t, v in again.items()} == after  # the next run starts where this one ended
    path.write_bytes(b"not a table")
    assert load_recycled(path).successors == {}  # a damaged cache costs only the learning


def test_recycling_learns_from_the_whole_tree_and_the_path_wins() -> None:
    """Rejected nodes' rows are the target's guess after their token too; where a token is both
    on the path and off it, the path's row (the context that was kept) is what stays."""
    tree = DraftTree.rooted(3)
    add_path(tree, [4, 5])  # nodes 1, 2: the accepted path
    add_path(tree, [7, 4])  # nodes 3, 4: rejected; node 4 holds token 4 again
    logits = np.zeros((5, 16), dtype=np.float32)
    for row, best in enumerate((4, 5, 9, 11, 12)):
        logits[row, best] = 5.0
    drafter = RecycleDrafter()
    drafter.accepted(Verified([3, 4, 5], ArrayLogits(logits), [0, 1, 2], tree))
    assert {t: int(v[0]) for t, v in drafter.table.successors.items()} == {3: 4, 4: 5, 5: 9, 7: 11}


def test_recycling_grafts_below_the_leaves_of_other_drafters() -> None:
    drafter = RecycleDrafter(RecycleTable(k=8))
    drafter.table.successors = {6: np.array([20, 21, 22], dtype=np.int32), 20: np.array([30], dtype=np.int32),
                                5: np.array([40, 41], dtype=np.int32)}
    tree = DraftTree.rooted(1)
    add_path(tree, [5, 6])  # a lookup's chain: leaf 6
    add_path(tree, [7])  # a leaf with nothing recycled after it
    graft = drafter.graft(tree, max_nodes=64, max_depth=8)
    merged = merge([("ngram", Draft(tree, [("root",)] + [("ngram", 1, 1)] * 3)), ("recycle", graft)])
    paths = {tuple(merged.tree.tokens[j] for j in path_to(merged.tree, i)): merged.proposers[i]
             for i in range(len(merged.tree))}
    assert set(paths) == {(1,), (1, 5), (1, 5, 6), (1, 7), (1, 5, 6, 20), (1, 5, 6, 21), (1, 5, 6, 20, 30)}
    assert paths[(1, 5, 6)] == (("ngram", ("ngram", 1, 1)),)  # carried, not proposed by recycling
    assert paths[(1, 5, 6, 21)] == (("recycle", ("recycle", "graft", 1, 1)),)
    assert paths[(1, 5, 6, 20, 30)] == (("recycle", ("recycle", "graft", 0, 2)),)
    with pytest.raises(ValueError, match="carried a node"):
        merge([("recycle", graft)])  # carried nodes nobody proposed
