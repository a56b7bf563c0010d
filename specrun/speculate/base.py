"""The two roles in speculation: a drafter guesses, a speculator decides what to verify.

A `Drafter` proposes a candidate tree and tags each node with a planner key
(how it was found). A `Speculator` turns drafts into the tree the target
verifies in one pass, and learns from what the target accepted. The
generation loop talks to speculators only.
"""

from __future__ import annotations

from typing import Callable, Hashable, Protocol, Sequence

from specrun.speculate.tree import DraftTree


class Speculator(Protocol):
    """Proposes a draft tree rooted at the pending token, and learns from what was accepted."""

    name: str
    max_depth: int  # the deepest draft node it proposes
    reused: bool | None  # the last proposal grew from work done during the previous pass (None: none was)

    def propose(self, context: Sequence[int], max_depth: int, max_nodes: int) -> DraftTree:
        """A tree rooted at context[-1] (the pending token) within the caller's room: depth at
        most `max_depth` (tokens left to generate, cache room), nodes at most `max_nodes`
        (the root included; cache room and what the target verifies in one pass)."""
        ...

    def warm(self, context: Sequence[int]) -> float:
        """Bring a draft model's cache up to `context` (a new prompt) while the target prefills
        it, so the first proposal does not wait for the draft's own prefill; the seconds spent."""
        ...

    def prepare(self, until: Callable[[], bool]) -> float:
        """Work towards the next proposal while the target verifies the last one, until
        `until()` says the pass is back; the seconds spent (0.0: nothing worth doing)."""
        ...

    def observe(self, tree: DraftTree, path: list[int], wall_s: float, pass_s: float | None = None) -> None:
        """The target accepted `path` (node indices, root first) of `tree`; the step took
        `wall_s` seconds of wall time, drafting included, and the target's pass `pass_s` of
        them where nothing drafted beside it (None: the draft worked during the pass)."""
        ...


class Drafter(Protocol):
    costly: bool  # drafting costs time worth saving (a draft model), not next to nothing (lookup)
    reused: bool | None  # as Speculator.reused, for the last draft
    catch_up_s: float  # of the last draft's time, what prefilling its own cache with a new prompt took
    prepared_nodes: Sequence[bool]  # per node of the last draft: found during the previous pass (empty: none)

    def draft(self, context: Sequence[int], max_nodes: int, max_depth: int) -> tuple[DraftTree, list[Hashable]]:
        """A candidate tree rooted at context[-1] and a planner key per node."""
        ...

    def warm(self, context: Sequence[int]) -> float:
        """As Speculator.warm."""
        ...

    def prepare(self, until: Callable[[], bool], deadline: float | None = None) -> float:
        """As Speculator.prepare, for the last draft; `deadline` (time.perf_counter()) is when
        the pass is expected back: a draft call that would end later is not started, since
        the step would wait for it."""
        ...

    def accepted(self, tokens: Sequence[int]) -> None:
        """The target accepted these drafted tokens after the root (a draft model keeps their KV)."""
        ...
