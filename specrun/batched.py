"""Several sequences share every target pass: each a `Generation` with its own cache (and
speculator), their trees verified together by one `eval_trees` call.

A pass whose weights stream costs its transfer whatever it carries (on an AVX-512
machine's disk 48 tokens cost about what one does), so one sequence leaves most of
it unused and several fill it. Each sequence's output is what it would be alone: its
tree is walked on its own rows of the pass, drawn from its own random stream, and
kept in its own cache. The prefills of sequences that join together share passes
of their own (`join_many`); decoding passes are shared by every active sequence.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from specrun.engines.base import Engine, TreeRequest
from specrun.generate import Generation, PassHistory, Plan, Step
from specrun.speculate.draft_model import ModelDrafter, draft_together, warm_together
from specrun.speculate.planned import Candidates
from specrun.speculate.planner import PassCost, best_subtrees, learn_pass


@dataclass
class BatchStats:
    """The shared passes: how many, and the wall time from the first to the last."""

    sequences: int = 0
    passes: int = 0  # shared decoding passes
    nodes: int = 0  # tree nodes they verified, over all sequences
    drafted: int = 0  # of them, drafted nodes (not a sequence's pending token)
    accepted: int = 0  # drafted nodes the target accepted
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def acceptance(self) -> float:
        """The share of drafted nodes accepted so far, smoothed toward PRIOR_ACCEPTANCE while few
        were tested."""
        return (self.accepted + PRIOR_ACCEPTANCE * PRIOR_WEIGHT) / (self.drafted + PRIOR_WEIGHT)

    @property
    def nodes_per_pass(self) -> float:
        return self.nodes / self.passes if self.passes else 0.0


PRIOR_ACCEPTANCE, PRIOR_WEIGHT = 0.25, 8  # the free drafters' first guesses: right 20-50% on code


def node_shares(budget: int, active: int) -> int:
    """Tree nodes a sequence may use in a pass that `active` sequences share, of `budget` for the
    whole pass: as the batch grows each sequence's tree shrinks, down to its pending token."""
    return max(1, budget // max(active, 1))


def pass_budget(cost: Callable[[int], float], active: int, most: int, acceptance: float) -> int:
    """Nodes for a pass `active` sequences share (at least one each, at most `most`): the total n
    that maximises expected tokens per second, (active + acceptance * (n - active)) / cost(n),
    where every drafted node is worth its measured acceptance and `cost` is the pass's cost
    curve. Each sequence's own planner prices its tree as if it were alone; only the batch
    knows what the others add, so this is where a pass stops growing (on a disk-streamed
    pass, where it stops being nearly free)."""
    best, best_rate = active, active / cost(active)
    for n in range(active + 1, max(most, active) + 1):
        rate = (active + acceptance * (n - active)) / cost(n)
        if rate > best_rate:
            best, best_rate = n, rate
    return best


class BatchGeneration:
    """Sequences sharing the target's passes, each a `Generation` on `engine` in a cache of its
    own, iterated through here only. Sequences may join between passes (`join`: its prefill
    runs then) and leave when they stop; `step` runs one shared pass. Iterating gives (sequence
    index, step) pairs for the sequences given at the start: every prefill's step first, then,
    pass by pass, one step per sequence still generating. `max_nodes`: tree nodes per pass over
    all sequences, at most; `cost` (the target's pass cost curve) plans each pass within it:
    over all sequences' candidates where their speculators offer them (`step`), else in equal
    shares of `pass_budget` (None: equal shares of `max_nodes`). A learnt curve learns from the
    shared passes (nothing drafts beside them) that a streamed target ran back to back."""

    def __init__(self, engine: Engine, generations: Sequence[Generation], max_nodes: int,
                 cost: PassCost | None = None, *, clock: Callable[[], float] = time.perf_counter) -> None:
        self.engine, self.max_nodes, self.cost, self.clock = engine, max_nodes, cost, clock
        self.generations: dict[int, Generation] = {}  # every sequence that joined and is not released, by index
        self.active: list[int] = []  # the indices of those still generating
        self.stats = BatchStats()
        self._first = list(generations)
        self._history = PassHistory(engine)  # the pass before the next: a shared step's, or prefills'

    def join(self, generation: Generation) -> tuple[int, list[Step]]:
        """Add a sequence: (its index, its prefill's steps)."""
        return self.join_many([generation])[0]

    def join_many(self, generations: Sequence[Generation]) -> list[tuple[int, list[Step]]]:
        """Add sequences, their prefills sharing passes (`Engine.sync_many`: a streamed target
        reads its weights once for all of them): (index, prefill's steps) for each."""
        if self.engine.max_tree_nodes < 1:
            raise ValueError("a batch verifies every step as a tree: open the engine for trees")
        caches = [self.generations[i].cache for i in self.active] + [g.cache for g in generations]
        if len({id(c) for c in caches}) != len(caches):
            raise ValueError("each sequence of a batch needs a cache of its own")
        if any(g.engine is not self.engine for g in generations):
            raise ValueError("every sequence of a batch generates on the batch's engine")
        if not generations:
            return []
        t0 = self.clock()
        requests = [g.prefill_request() for g in generations]
        rows = self.engine.sync_many(requests)
        seconds = self.clock() - t0
        self._history.passed(sum(len(tokens) - g.stats.reused_tokens for g, (_, tokens) in zip(generations, requests)),
                             self.clock())  # the tokens the prefills evaluated
        warm = [(d, g.prompt) for g in generations if (d := getattr(g.speculator, "costly_drafter", None)) is not None]
        if warm:  # their draft model's caches too, as a sequence alone prefills its draft's with the target's
            warm_together(warm)
        out = []
        for generation, row in zip(generations, rows):
            index = self.stats.sequences
            self.generations[index] = generation
            out.append((index, list(generation.prefilled(row, seconds))))
            self.active.append(index)
            self.stats.sequences += 1
        self.stats.prefill_s += self.clock() - t0
        return out

    def release(self, index: int) -> None:
        """Forget a sequence that has stopped (a server's finished requests would pile up)."""
        if index in self.active:
            raise ValueError("release of a sequence still generating: leave() it first")
        self.generations.pop(index, None)

    def leave(self, index: int) -> None:
        """Drop a sequence before it stops by itself (a client that went away): it takes no part
        in later passes, and its cache may serve another sequence."""
        if index in self.active:
            self.active.remove(index)
            g = self.generations[index]
            g.done = g.done or "interrupted"
            list(g.end())

    def step(self) -> list[tuple[int, Step]]:
        """One pass shared by the active sequences (none when every one has stopped). Sequences
        whose speculators offer candidates (the free drafters, with a cost curve) get the pass's
        nodes where they are likeliest over all of them (planner.best_subtrees); the others
        propose within an equal share of `pass_budget`. One `eval_trees` call verifies every
        tree, and each walks its own rows. A sequence that has stopped leaves with its last step."""
        if not self.active:
            return []
        t0 = self.clock()
        out: list[tuple[int, Step]] = []
        planned: dict[int, Plan] = {}
        offered: dict[int, Candidates] = {}  # sequences whose candidates the batch plans together
        share = 0  # an equal share of the pass, worked out once a sequence needs it
        for i in self.active:
            g = self.generations[i]
            c = g.candidates(self.max_nodes) if self.cost is not None else None
            if c is not None:
                offered[i] = c
                continue
            share = share or self._share()
            if (plan := g.plan(share)) is not None:
                planned[i] = plan
            else:  # this sequence has stopped
                out += [(i, step) for step in g.end()]
        if offered:  # TETRIS: the pass's nodes go to the likeliest candidates over all sequences
            assert self.cost is not None
            self._draft(offered)
            keeps = best_subtrees([c.chances for c in offered.values()], self.cost,
                                  min(self.max_nodes, self.cost.max_size), fixed=sum(len(p.tree) for p in planned.values()))
            for (i, c), keep in zip(offered.items(), keeps):
                planned[i] = self.generations[i].plan_of(c, keep)
        plans = [(i, planned[i]) for i in self.active if i in planned]
        self.active = [i for i, _ in plans]
        if plans:
            requests = [TreeRequest(self.generations[i].cache, p.tree.tokens, p.tree.parents, p.tree.depths)
                        for i, p in plans]
            nodes, t_pass = sum(len(p.tree) for _, p in plans), self.clock()
            rows = self.engine.eval_trees(requests)  # one pass for every sequence's tree
            rows[-1].argmax(0)  # a row read: the pass has finished (a GPU's runs on after the call)
            t_done = self.clock()
            if self._history.back_to_back(nodes, t_pass, t_done - t_pass):
                learn_pass(self.cost, nodes, t_done - t_pass)
            self._history.passed(nodes, t_done)
            self.stats.passes += 1
            self.stats.nodes += nodes
            for (i, plan), logits in zip(plans, rows):
                g = self.generations[i]
                step = g.finish(plan, logits, shared=True)
                self.stats.drafted += step.drafted
                self.stats.accepted += step.accepted
                out.append((i, step))
                if g.done is not None:  # it leaves now: a sequence waiting to join may take its place
                    out += [(i, step) for step in g.end()]
                    self.active.remove(i)
        self.stats.decode_s += self.clock() - t0
        return out

    def _draft(self, offered: dict[int, Candidates]) -> None:
        """The draft model's trees for the sequences whose speculators draft with one, grown
        together (a level of every tree per draft call: draft_together) and merged into their
        candidates, so the batch's plan prices its nodes beside the free drafters'."""
        jobs: dict[int, tuple[ModelDrafter, int]] = {}
        for i, c in offered.items():
            ask = getattr(self.generations[i].speculator, "batch_draft", None)
            if ask is not None and (job := ask(c)) is not None:
                jobs[i] = job
        if not jobs:
            return
        assert self.cost is not None
        t0 = self.clock()
        pass_s = self.cost.cost(max(round(self.stats.nodes_per_pass), len(self.active)))
        drafts = draft_together([(d, offered[i].context, n, offered[i].max_depth) for i, (d, n) in jobs.items()],
                                pass_s, self.clock)
        share = (self.clock() - t0) / len(jobs)
        for i, draft in zip(jobs, drafts):
            offered[i] = self.generations[i].speculator.with_draft(offered[i], draft, share)  # type: ignore[union-attr]

    def _share(self) -> int:
        """Nodes for one tree of a sequence that plans alone: an equal share of the pass."""
        budget = self.max_nodes if self.cost is None else pass_budget(self.cost.cost, len(self.active),
                                                                     self.max_nodes, self.stats.acceptance)
        return node_shares(budget, len(self.active))

    def __iter__(self) -> Iterator[tuple[int, Step]]:
        if not self._first:
            raise ValueError("a batch of no sequences")
        first, self._first = self._first, []
        for index, steps in self.join_many(first):
            yield from ((index, step) for step in steps)
        while self.active:
            yield from self.step()
