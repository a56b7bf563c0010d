"""A speculator that drafts from its sources, merges their trees, and verifies what pays.

Each source is a drafter with the acceptance statistics it has earned. Free
drafters (prompt lookup, the suffix index, recycled top-k) draft every step;
a costly one (a draft model) drafts while it rests not and its `gate` lets it
(auto: while its measured speed beats what the free sources are expected to
give). Their trees are merged (merge.py), every node priced by its
proposers' learnt rates, and the planner keeps the subtree that maximises
expected tokens per second of the step (planner.best_subtree). A mode with one
drafter is the case of one source.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from specrun.engines.base import Logits
from specrun.speculate.allowance import Allowance, Risk, holds
from specrun.speculate.base import Draft, Drafter, Proposal, Verified
from specrun.speculate.merge import Merged, chances, counts, mark_company, mark_passed_over, merge
from specrun.speculate.acceptance import AcceptanceStats
from specrun.speculate.planner import PassCost, StepCost, best_subtree, learn_pass
from specrun.speculate.tree import DraftTree


@dataclass(frozen=True)
class Source:
    name: str  # "ngram", "suffix", "recycle" or "model": how -v and the calibration name it
    drafter: Drafter
    stats: AcceptanceStats  # how often its nodes were accepted, per key
    grafts: bool = False  # it also grows below the merged tree's leaves (its drafter's `graft`)
    everywhere: bool = False  # it drafts below any token (recycling), not only where the context matches


@dataclass(frozen=True)
class Candidates:
    """A free-source plan before it is cut (PlannedSpeculator.candidates)."""

    merged: Merged
    chances: list[float]  # per node of merged.tree: the chance the target accepts it
    drafts: list[tuple[str, Draft]]
    grafts: list[tuple[str, Draft]]
    drafting_s: float
    limit: int  # the most nodes one tree of it may keep
    context: tuple[int, ...] = ()  # what it drafted after
    max_depth: int = 0
    costly: bool = False  # the costly source's draft is merged in (`with_draft`)


class Gate(Protocol):
    """Whether a costly source drafts this step (auto's: the draft model's measured speed)."""

    def wants(self, free_rate: float) -> bool:
        """Draft with it, where the free sources' plan is expected to give `free_rate`
        tokens per second (0.0: they have nothing)?"""
        ...

    def observe(self, proposal: Proposal, path: list[int], wall_s: float) -> None: ...


class PlannedSpeculator:
    """Drafts from `sources`, then verifies only the subtree of their merged trees that pays on
    this hardware (`cost` given), or every drafted node up to `max_nodes` (`cost` None: a
    fixed budget). At most one source is costly. Learns per source and key from what the
    target accepts; the statistics may be shared and saved."""

    def __init__(self, name: str, sources: Sequence[Source], cost: PassCost | None, max_nodes: int = 32,
                 max_depth: int = 16, step_cost: StepCost | None = None, *, free_step_cost: StepCost | None = None,
                 gate: Gate | None = None, clock: Callable[[], float] = time.perf_counter) -> None:
        costly = [s for s in sources if s.drafter.costly]
        if not sources or len(costly) > 1:
            raise ValueError("a planned speculator drafts from one costly source at most, and from one at least")
        self.name, self.sources, self.cost, self.gate = name, list(sources), cost, gate
        self.costly = costly[0] if costly else None
        self.free = [s for s in sources if not s.drafter.costly]
        self.stats = {s.name: s.stats for s in sources}
        self.clock = clock  # times drafting (tests pass a fake one; a drafter's own must be the same)
        self.max_nodes, self.max_depth = max_nodes, max_depth
        # What plans maximise over: `step_cost` (shared, kept with the calibration), else learnt
        # here; steps where only the free sources drafted cost differently (`free_step_cost`).
        self.step_cost = step_cost if step_cost is not None else StepCost(cost) if cost is not None else None
        self.free_step_cost = free_step_cost if free_step_cost is not None or self.costly is None else (
            StepCost(cost) if cost is not None else None)
        # Candidates the costly source drafts next step: a little more than the last plan kept
        # of its nodes, so a draft model does not grow nodes that will not be verified. With
        # nothing learnt, FIRST_DRAFT: trees grow a quarter a step from there while plans keep
        # them whole (a first draft of 256 nodes took a second on 2 cores, and what it taught
        # about drafting costs misled the plans after it).
        step = self.step_cost
        self._candidates = (self._drafts_for(round(step.kept)) if step is not None and step.steps
                            else min(max_nodes, self.FIRST_DRAFT))
        # After a plan that kept none of its nodes, the costly source rests for `_rest` steps,
        # doubling up to MAX_REST while plans keep none: drafts nobody verifies only cost time.
        self._rest, self._resting = 1, 0
        # Proposals since a tree of the costly source's was last verified. What earlier runs taught
        # about drafting costs may be stale (a busy hour, a draft paged out under a memory limit):
        # a run starts due for one verified tree, so its own first steps measure drafting afresh.
        self._unverified = self.EXPLORE_EVERY if step is not None and step.steps else 0
        # Candidates per free drafter (_budget): in RAM on a CPU, where plans keep a node or none,
        # drafting and merging hundreds cost 3-6% of a 36 ms step.
        self._free_candidates = {s.name: max_nodes for s in self.free}

    MAX_REST = 32
    FIRST_DRAFT = 32  # candidates a run drafts first when no run has taught the planner anything
    EXPLORE_EVERY = 32  # steps without a verified draft tree before one is verified anyway (propose)
    FREE_FLOOR = 16  # candidates a free drafter whose nodes the last plan kept drafts at least; else twice what
    # it kept, or an eighth of the largest tree measured (a streamed target's flat curve: recycling needs room)
    IDLE_FLOOR = 4  # a free drafter that drafts everywhere, whose nodes the last plan dropped, drafts half as
    # many, down to this

    def _step(self, costly: bool) -> StepCost | None:
        return self.step_cost if costly or self.free_step_cost is None else self.free_step_cost

    def propose(self, context: Sequence[int], max_depth: int, max_nodes: int,
                allowance: Allowance | None = None) -> Proposal:
        self._unverified += 1
        max_depth, max_nodes = min(max_depth, self.max_depth), min(max_nodes, self.max_nodes)
        if self.cost is None:  # a fixed budget: every source drafts, every node is verified
            drafts = [(s.name, s.drafter.draft(context, max_nodes, max_depth)) for s in self.sources]
            merged = merge(drafts)
            keep = list(range(min(len(merged.tree), max_nodes)))  # parents come first
            return Proposal(merged.tree.subtree(keep), [merged.proposers[i] for i in keep],
                            self._reused(drafts), source=self, proposed=self._proposed(drafts),
                            costly=self.costly is not None)
        if allowance is not None and not holds(self.cost):  # flat passes: it does not hold (allowance.py)
            allowance = None
        if allowance is not None and allowance.plain_s is None:  # the generation measures a plain step first
            return Proposal(DraftTree.rooted(context[-1]), [()], skipped=True, source=self)
        limit = min(max_nodes, self.cost.max_size)
        t0 = self.clock()
        drafts = [(s.name, s.drafter.draft(context, min(limit, self._free_candidates[s.name]), max_depth))
                  for s in self.free]
        drafting_s = self.clock() - t0
        catch_up_s, keep, merged, ch, grafts = 0.0, [0], None, [1.0], []
        if drafts:
            merged, grafts = self._merge(drafts, limit, max_depth)
            ch = chances(merged.tree, merged.proposers, self.stats)
            keep = self._plan(ch, self._step(False) or self.cost, limit, merged, allowance)
        costly, explored = self.costly, False
        if costly is not None and self._resting > 0:
            self._resting -= 1
            costly = None
        elif costly is not None and self.gate is not None:
            step = self._step(False) or self.cost
            free_rate = sum(ch[i] for i in keep) / step.cost(len(keep)) if len(keep) > 1 else 0.0
            costly = costly if self.gate.wants(free_rate) else None
        if costly is not None:
            t1 = self.clock()
            draft = costly.drafter.draft(context, min(self._candidates, limit), max_depth)
            drafting_s += self.clock() - t1 - draft.catch_up_s
            catch_up_s = draft.catch_up_s
            drafts.append((costly.name, draft))
            merged, grafts, ch = self._merge_costly(drafts, limit, max_depth)
            assert self.step_cost is not None
            keep = self._plan(ch, self.step_cost, limit, merged, allowance)
            if not self._has(merged.proposers, keep, costly.name) and self._unverified >= self.EXPLORE_EVERY:
                # Only the learnt drafting cost can rule out what the pass alone would pay for,
                # and it is learnt from verified trees only: verify one now and then to learn it
                # afresh (the text, the machine's load, a run's first draft may have set it wrong).
                keep = self._plan(ch, self.cost, limit, merged, allowance)
                explored = self._has(merged.proposers, keep, costly.name)
            self._costly_kept(merged.proposers, keep)
            needed = min(1.0, self._candidates / len(draft.tree))
        else:
            needed = 1.0
        if merged is None:  # a costly source alone, resting: nothing was drafted
            return Proposal(DraftTree.rooted(context[-1]), [()], skipped=True, source=self)
        self._budget(merged.proposers, keep, limit)
        return Proposal(merged.tree.subtree(keep), [merged.proposers[i] for i in keep], self._reused(drafts),
                        drafting_s, catch_up_s, free=sum(1 for i in keep[1:] if merged.prepared[i]), needed=needed,
                        explored=explored, source=self, proposed=self._proposed(drafts + grafts),
                        costly=costly is not None)

    def candidates(self, context: Sequence[int], max_depth: int, max_nodes: int) -> Candidates | None:
        """The free sources' merged tree with every node's chance, before any plan cuts it: a batch
        plans over all its sequences' candidates at once (planner.best_subtrees), then hands each
        its nodes (`proposal`). None where this speculator plans alone (a fixed budget, or no
        free source). A costly source drafts for them where the batch asks it (`batch_draft`)."""
        if self.cost is None or not self.free:
            return None
        self._unverified += 1
        max_depth, limit = min(max_depth, self.max_depth), min(max_nodes, self.max_nodes, self.cost.max_size)
        t0 = self.clock()
        drafts = [(s.name, s.drafter.draft(context, min(limit, self._free_candidates[s.name]), max_depth))
                  for s in self.free]
        merged, grafts = self._merge(drafts, limit, max_depth)
        return Candidates(merged, chances(merged.tree, merged.proposers, self.stats), drafts, grafts,
                          self.clock() - t0, limit, tuple(context), max_depth)

    @property
    def costly_drafter(self) -> Drafter | None:
        """The costly source's drafter (a batch prefills its cache with the target's)."""
        return self.costly.drafter if self.costly is not None else None

    def batch_draft(self, c: Candidates) -> tuple[Drafter, int] | None:
        """Where a batch drafts with the draft model for its sequences together: this one's
        drafter and how many nodes to draft for it (a quarter more than its last plan kept);
        None while it rests (plans kept none of its nodes lately). The batch's plan, not the
        single-sequence gate, decides what its nodes are worth: a batch's pass is shared."""
        if self.costly is None:
            return None
        if self._resting > 0:
            self._resting -= 1
            return None
        return self.costly.drafter, min(self._candidates, c.limit)

    def with_draft(self, c: Candidates, draft: Draft, drafting_s: float) -> Candidates:
        """The candidates with the costly source's `draft` (drafted for them by the batch) merged in."""
        assert self.costly is not None
        drafts = c.drafts + [(self.costly.name, draft)]
        merged, grafts, ch = self._merge_costly(drafts, c.limit, c.max_depth)
        return Candidates(merged, ch, drafts, grafts, c.drafting_s + drafting_s, c.limit, c.context, c.max_depth,
                          costly=True)

    def proposal(self, c: Candidates, keep: list[int]) -> Proposal:
        """The proposal of the candidates' nodes `keep` (root first, connected)."""
        m = c.merged
        self._budget(m.proposers, keep, c.limit)
        if c.costly:
            self._costly_kept(m.proposers, keep)
        return Proposal(m.tree.subtree(keep), [m.proposers[i] for i in keep], self._reused(c.drafts), c.drafting_s,
                        free=sum(1 for i in keep[1:] if m.prepared[i]), source=self,
                        proposed=self._proposed(c.drafts + c.grafts), costly=c.costly)

    def _costly_kept(self, proposers: Sequence, keep: Sequence[int]) -> None:
        """A plan over the costly source's draft kept `keep`: it rests while plans keep none of its
        nodes (twice as long each time), and drafts a quarter more than they kept next time."""
        assert self.costly is not None
        name = self.costly.name
        mine = sum(1 for i in keep[1:] if any(s == name for s, _ in proposers[i]))
        if mine == 0:
            self._resting, self._rest = self._rest, min(2 * self._rest, self.MAX_REST)
        else:
            self._rest, self._unverified = 1, 0
        self._candidates = self._drafts_for(mine + 1)  # its tree, the root included

    def _budget(self, proposers: Sequence, keep: Sequence[int], limit: int) -> None:
        """Candidates each free drafter drafts next step: twice what the plan kept of its nodes, at
        least FREE_FLOOR. Recycling has a tree below every token, and in RAM, where plans keep
        none of its nodes, drafting, merging and pricing them cost 3% of a step where nothing
        was verified (0.96x plain), so while plans drop its nodes it drafts half as many each
        step. Lookup drafts only where the context matches, and a long match, the one that pays
        in RAM, shows its worth only in a chain of 16 (a 4-token chain at its first rates does
        not pay there): it keeps the floor."""
        kept = counts([proposers[i] for i in keep], [])  # per source: (its nodes kept, 0)
        for s in self.free:
            mine = kept.get(s.name, (0, 0))[0]
            self._free_candidates[s.name] = (max(self.IDLE_FLOOR, self._free_candidates[s.name] // 2)
                                             if s.everywhere and not mine else
                                             max(self.FREE_FLOOR, 2 * mine, limit // 8))

    def _merge(self, drafts: list[tuple[str, Draft]], limit: int,
               max_depth: int) -> tuple[Merged, list[tuple[str, Draft]]]:
        """The drafts merged, and grafted below the leaves by the sources that grow there
        (recycling), to twice its size at most, within `limit`; (the tree, the grafts). Keys
        carry the company each node was proposed in."""
        merged = merge(drafts)
        growers = [s for s in self.free if s.grafts]
        if len(merged.tree) <= 1 or not growers:
            return mark_company(merged), []
        room = min(limit, 2 * len(merged.tree))
        grafts = [(s.name, s.drafter.graft(merged.tree, room, max_depth)) for s in growers]  # type: ignore[attr-defined]
        return mark_company(merge(drafts + grafts)), grafts

    def _merge_costly(self, drafts: list[tuple[str, Draft]], limit: int,
                      max_depth: int) -> tuple[Merged, list[tuple[str, Draft]], list[float]]:
        """`_merge` of drafts that end with the costly source's, the nodes it passed over marked
        (merge.mark_passed_over); (the tree, the grafts, every node's chance)."""
        assert self.costly is not None
        merged, grafts = self._merge(drafts, limit, max_depth)
        merged = mark_passed_over(merged, self.costly.name)
        return merged, grafts, chances(merged.tree, merged.proposers, self.stats)

    def _plan(self, ch: list[float], cost: PassCost | StepCost, limit: int, merged: Merged,
              allowance: Allowance | None) -> list[int]:
        """best_subtree, within what the generation's allowance admits (allowance.py). The plan
        that pays best is judged first: where it keeps nothing, or the allowance covers it,
        nothing else is needed (in RAM most steps: the sure chances cost 0.15 ms of a 1 ms plan)."""
        keep = best_subtree(ch, cost, limit)
        if allowance is None or len(keep) == 1 or allowance.admits(cost.cost(len(keep)), cost.cost(1), ()):
            return keep
        sure = chances(merged.tree, merged.proposers, self.stats, sure=True)
        return best_subtree(ch, cost, limit, Risk(allowance, sure, merged.tree.depths))

    @staticmethod
    def _has(proposers: Sequence, keep: Sequence[int], source: str) -> bool:
        return any(s == source for i in keep[1:] for s, _ in proposers[i])

    def _reused(self, drafts: Sequence[tuple[str, Draft]]) -> bool | None:
        return next((d.reused for name, d in drafts if self.costly is not None and name == self.costly.name), None)

    @staticmethod
    def _proposed(drafts: Sequence[tuple[str, Draft]]) -> dict[str, int]:
        """Nodes each source proposed (a graft's carried nodes are not its own)."""
        out: dict[str, int] = {}
        for name, d in drafts:
            out[name] = out.get(name, 0) + sum(k is not None for k in list(d.keys)[1:])
        return out

    @staticmethod
    def _drafts_for(kept: int) -> int:
        """Candidates to draft when plans keep about `kept` nodes: a quarter more, so the plan
        has a choice, but not so many more that the draft model grows nodes nobody verifies
        (a draft call costs about its level: 15 ms for one node on 2 cores, 39 for two)."""
        return max(kept + kept // 4 + 1, 3)

    def warm(self, context: Sequence[int]) -> float:
        return self.costly.drafter.warm(context) if self.costly is not None else 0.0

    def prepare(self, proposal: Proposal, until: Callable[[], bool]) -> float:
        """A costly drafter grows its last draft while the target verifies; the free ones have nothing to do."""
        if not proposal.costly or self.costly is None:
            return 0.0
        # When the pass is expected back: its calibrated cost, measured with no draft beside it
        # (a pass on a GPU or a disk takes about that with one; on shared cores, longer).
        deadline = self.clock() + self.cost.cost(len(proposal.tree)) if self.cost is not None else None
        return self.costly.drafter.prepare(until, deadline)

    def observe(self, proposal: Proposal, path: list[int], wall_s: float | None, pass_s: float | None = None,
                logits: Logits | None = None) -> None:
        """Each node whose parent was accepted was tested: it matched the target's draw or not,
        and every source that proposed it learns so. `pass_s`: the target's pass, where nothing
        drafted beside it, corrects the cost curve; `logits` feed the sources that recycle them."""
        tree, p = proposal.tree, proposal
        learn_pass(self.cost, len(tree), pass_s)
        step = self._step(p.costly)
        if step is not None and not p.skipped and wall_s is not None:
            step.observe(len(tree), p.drafting_s, wall_s - p.catch_up_s, p.needed, p.explored, p.free)
        accepted = set(path)
        for i in range(1, len(tree)):
            if tree.parents[i] in accepted:
                for source, key in p.keys[i]:
                    self.stats[source].update(key, i in accepted)
        verified = Verified([tree.tokens[i] for i in path], logits, path, tree)
        for s in self.sources:
            if not s.drafter.costly or p.costly:  # a draft model hears only of the trees it drafted in
                s.drafter.accepted(verified)
        if self.gate is not None and wall_s is not None:
            self.gate.observe(proposal, path, wall_s)
