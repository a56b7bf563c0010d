"""The two roles in speculation: a drafter guesses, a speculator decides what to verify.

A `Drafter` proposes a candidate tree (a `Draft`) and tags each node with a
planner key (how it was found). A `Speculator` turns drafts into the tree the
target verifies in one pass (a `Proposal`), and learns from what the target
accepted of it. Both hand back values: what a step needs to learn from its
outcome travels in the proposal it made, not in attributes left for later.
The generation loop talks to speculators only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Mapping, Protocol, Sequence

from specrun.engines.base import Logits
from specrun.speculate.allowance import Allowance
from specrun.speculate.tree import DraftTree

Proposers = tuple[tuple[str, Hashable], ...]  # per node: (source, planner key) of each drafter that proposed it


@dataclass(frozen=True)
class Draft:
    """A drafter's candidate tree, rooted at the pending token, and what drafting it took."""

    tree: DraftTree
    keys: list[Hashable]  # a planner key per node
    reused: bool | None = None  # grown below a guess that came true during the previous pass; False: a
    # guess dropped; None: nothing was prepared
    prepared: Sequence[bool] = ()  # per node: found during the previous pass (empty: none was)
    catch_up_s: float = 0.0  # of the time drafting took, prefilling the drafter's own cache with a new prompt
    calls: int = 0  # draft model calls it made: bringing its cache to the context, then one per level
    evaluated: int = 0  # nodes the draft model evaluated (leaves need no evaluation)


@dataclass(frozen=True)
class Verified:
    """What a target pass settled, for drafters to learn from: the root and the tokens it
    accepted, and the rows of its logits that follow each (what the target expects after it)."""

    tokens: Sequence[int]  # the root, then the accepted tokens
    logits: Logits | None = None  # the pass's (valid until the target's next pass)
    rows: Sequence[int] = ()  # per token, its row in `logits`
    tree: DraftTree | None = None  # the whole tree verified: row i of `logits` is node i's


@dataclass(frozen=True)
class Proposal:
    """The tree a speculator proposes for one step, and what it needs to learn from the
    outcome: handed back to the same speculator's `prepare` and `observe`."""

    tree: DraftTree
    keys: Sequence[Proposers] = ()  # per node of `tree`: who proposed it, with their planner keys
    reused: bool | None = None  # as Draft.reused, for the draft this tree came from
    drafting_s: float = 0.0  # drafting this step waited for (not what was prepared during a pass)
    catch_up_s: float = 0.0  # of it, the drafter's prefill of a new prompt: neither the tree's cost nor hidden
    free: int = 0  # nodes found during the previous pass
    needed: float = 1.0  # the share of the drafting a plan of this size needs (StepCost.observe)
    skipped: bool = False  # resting: nothing was drafted
    explored: bool = False  # verified to measure drafting afresh, not because it paid
    source: Any = None  # the speculator that made it
    proposed: Mapping[str, int] = field(default_factory=dict)  # candidates each drafter drafted
    costly: bool = False  # a costly drafter (a draft model) drafted it: it may prepare during the pass


class Speculator(Protocol):
    """Proposes a draft tree rooted at the pending token, and learns from what was accepted."""

    name: str
    max_depth: int  # the deepest draft node it proposes

    def propose(self, context: Sequence[int], max_depth: int, max_nodes: int,
                allowance: Allowance | None = None) -> Proposal:
        """A tree rooted at context[-1] (the pending token) within the caller's room: depth at
        most `max_depth` (tokens left to generate, cache room), nodes at most `max_nodes`
        (the root included; cache room and what the target verifies in one pass); a planning
        speculator verifies only what the generation's `allowance` admits."""
        ...

    def warm(self, context: Sequence[int]) -> float:
        """Bring a draft model's cache up to `context` (a new prompt) while the target prefills
        it, so the first proposal does not wait for the draft's own prefill; the seconds spent."""
        ...

    def prepare(self, proposal: Proposal, until: Callable[[], bool]) -> float:
        """Work towards the next proposal while the target verifies `proposal`, until `until()`
        says the pass is back; the seconds spent (0.0: nothing worth doing)."""
        ...

    def observe(self, proposal: Proposal, path: list[int], wall_s: float | None, pass_s: float | None = None,
                logits: Logits | None = None) -> None:
        """The target accepted `path` (node indices, root first) of the proposal's tree; the step
        took `wall_s` seconds of wall time, drafting included (None: its pass verified other
        sequences' trees too, so its time is not this tree's), and the target's pass `pass_s`
        of them where nothing drafted beside it (None: the draft worked during the pass, or a
        streamed target's pass found weights read ahead while drafting or a larger pass ran).
        `logits`: the pass's rows (row i: node i's), for drafters that recycle them."""
        ...


class Drafter(Protocol):
    costly: bool  # drafting costs time worth saving (a draft model), not next to nothing (lookup)

    def draft(self, context: Sequence[int], max_nodes: int, max_depth: int) -> Draft:
        """A candidate tree rooted at context[-1], a planner key per node."""
        ...

    def warm(self, context: Sequence[int]) -> float:
        """As Speculator.warm."""
        ...

    def prepare(self, until: Callable[[], bool], deadline: float | None = None) -> float:
        """As Speculator.prepare, for the last draft; `deadline` (time.perf_counter()) is when
        the pass is expected back: a draft call that would end later is not started, since
        the step would wait for it."""
        ...

    def accepted(self, verified: Verified) -> None:
        """What the target's pass settled (a draft model keeps the accepted tokens' KV; token
        recycling keeps the rows)."""
        ...
