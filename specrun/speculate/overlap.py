"""Drafting while the target verifies (DuoDecoding's overlap): when it pays, and how a draft
model's tree grows during the target's pass and is picked up after it.

A target pass takes the CPU (or a GPU, or a disk read) for a while; a draft
model can use that time to grow the tree it just proposed, below its likeliest
leaves and beside its nodes most likely to be rejected. When the target's
outcome (the accepted tokens, then its own next token) is a node the draft
evaluated, the next draft starts from that node's subtree, evaluated already
(a prepared tree used); otherwise it starts afresh (a prepared tree dropped).
`Preparation` is that state machine; `measure_overlap` and `should_overlap`
say whether doing so pays on this machine: where target and draft share the
same saturated cores, drafting beside a pass only slows the pass.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Protocol, Sequence

from specrun.engines.base import Cache, Engine
from specrun.speculate.tree import DraftTree

OVERLAP_PAYS = 1.15  # overlap on where the same work takes this much less wall time overlapped


def should_overlap(setting: str, drafts_with_model: bool, target_on_cpu: bool, gain: Callable[[], float]) -> bool:
    """`--overlap on` and `off` say so; auto overlaps where a draft model drafts (prompt lookup
    has nothing to prepare) and the target leaves the CPU to it (it computes on a GPU), and
    where both compute on the CPU only if `gain()` (measure_overlap's, measured once and kept)
    says overlapping pays."""
    if setting != "auto":
        return setting == "on"
    if not drafts_with_model:
        return False
    return not target_on_cpu or gain() >= OVERLAP_PAYS


def measure_overlap(target: Engine, target_cache: Cache, draft: Engine, draft_cache: Cache, tokens: Sequence[int],
                    nodes: int = 32, draft_nodes: int = 8, clock: Callable[[], float] = time.perf_counter) -> float:
    """How much faster drafting and verifying go overlapped than one after the other, on this
    machine: (a target pass over `nodes` tokens alone + the draft calls over `draft_nodes`
    made during an overlapped pass, each timed alone) / that overlapped pass. About 1 where
    both compute on the same saturated cores; up to 2 where the target leaves the CPU idle
    (a GPU). `tokens`: a prompt both vocabularies hold, longer than `nodes`. Leaves both
    caches empty."""
    nodes, draft_nodes = min(nodes, target.max_tree_nodes), min(draft_nodes, draft.max_tree_nodes)
    parents, depths = [-1] + list(range(nodes - 1)), list(range(nodes))

    def tree_pass() -> float:
        t0 = clock()
        target.eval_tree(target_cache, tokens[:nodes], parents, depths)
        target.commit_path(target_cache, [])
        return clock() - t0

    def draft_call() -> float:
        t0 = clock()
        draft.eval_tree(draft_cache, tokens[:draft_nodes], [-1] * draft_nodes, [0] * draft_nodes)
        draft.commit_path(draft_cache, [])
        return clock() - t0

    try:
        target.sync(target_cache, tokens)
        draft.sync(draft_cache, tokens)
        alone = min(tree_pass() for _ in range(2))
        call = min(draft_call() for _ in range(3))
        gains = []
        for _ in range(2):
            t0, calls = clock(), 0
            pending = target.submit_tree(target_cache, tokens[:nodes], parents, depths)
            while not pending.done():
                draft_call()
                calls += 1
            pending.result()
            together = clock() - t0
            target.commit_path(target_cache, [])
            gains.append((alone + calls * call) / together)
        return max(gains)
    finally:
        target.rewind(target_cache, 0)
        draft.rewind(draft_cache, 0)


class Search(Protocol):
    """A draft tree in the making that can grow a call at a time (draft_model._Search)."""

    tree: DraftTree  # the nodes evaluated so far, the root first
    context: list[int]  # what its root ends
    cfg: Any  # ModelDraftConfig: nodes_per_pass, min_prob
    max_depth: int
    started: bool  # its root was evaluated: it can grow
    busy: bool  # a call was cut short: the engine and its arrays may disagree
    calls: int  # draft calls since its draft began
    mark: int  # nodes evaluated before the pass that verified their tree returned

    def limit(self, depth: int, min_prob: float) -> None: ...
    def grow(self, room: int | None, width: int | None = None) -> int: ...
    def path(self, tokens: Sequence[int]) -> list[int]: ...
    def reroot(self, path: list[int], context: Sequence[int]) -> None: ...


class Preparation:
    """The prepare/resume state machine of a drafter's last search. After a draft, `prepare`
    grows it while the target's pass is out; `accepted` hears what the target accepted, and
    after a prepared pass waits for the next draft (`resume`) to learn the target's own next
    token too: if the search evaluated that outcome it is re-rooted there and drafting goes on
    from it, else what it can keep of the accepted tokens is committed and it is dropped.
    `commit(nodes)` commits the search's nodes (a path from below its root) in the draft cache;
    `clock` times the draft calls (tests pass a fake one)."""

    def __init__(self, commit: Callable[[list[int]], None], *, clock: Callable[[], float] = time.perf_counter) -> None:
        self.commit = commit
        self.clock = clock
        self.search: Search | None = None
        self._prepared = False  # `prepare` ran since the last draft: its outcome is worth keeping
        self._accepted: list[int] | None = None  # what the target accepted of a prepared search
        self._call_s: dict[int, float] = {}  # frontier width -> seconds of a draft call while the target works

    def drafted(self, search: Search) -> None:
        """A draft came from `search`: the one `prepare` grows next."""
        self.search, self._prepared = search, False

    def prepare(self, until: Callable[[], bool], deadline: float | None, n_ctx: int) -> float:
        """Grow the last draft's tree until `until()` (the target's pass is back), nothing
        likely enough is left, or no call fits before `deadline`; the seconds it drafted."""
        search, t0 = self.search, self.clock()
        if search is None or search.busy or not search.started or self._accepted is not None:
            return 0.0
        self._prepared = True
        # Below the leaves of the tree under verification (where the next one starts when all
        # of it is accepted), and less likely nodes than a draft would wait for: this is free.
        search.limit(min(2 * search.max_depth, n_ctx - len(search.context)), search.cfg.min_prob / 4)
        while not until():
            width = search.cfg.nodes_per_pass
            if deadline is not None:
                left = deadline - self.clock()
                while width > 1 and self._call_seconds(width) > left:
                    width //= 2  # a narrower call that ends in time
                if self._call_seconds(width) > left:
                    break  # the step would wait for it: what the outcome needs is drafted after
            t_call = self.clock()
            grown = search.grow(None, width)
            if not grown:
                break
            seconds, before = self.clock() - t_call, self._call_s.get(grown)
            self._call_s[grown] = seconds if before is None else before + 0.3 * (seconds - before)
        return self.clock() - t0

    def _call_seconds(self, width: int) -> float:
        """A draft call's expected seconds over `width` nodes while the target works, as
        measured; for a width not measured yet, the dearest narrower call (calls cost more the
        wider they are), 0.0 if none: optimistic, so the width is tried once and measured."""
        if width in self._call_s:
            return self._call_s[width]
        return max((s for w, s in self._call_s.items() if w < width), default=0.0)

    def accepted(self, tokens: Sequence[int]) -> None:
        """The target accepted `tokens` after the root: keep their draft KV where it exists.
        After `prepare`, wait for the next draft to learn the target's next token too."""
        self.resume(None)  # an outcome no draft came for (a planner resting): settle it
        search, self.search = self.search, None
        if search is None or search.busy:
            self.commit([])
        elif self._prepared:
            self.search, self._accepted = search, list(tokens)
        else:
            self.commit(search.path(tokens))
        self._prepared = False

    def resume(self, context: Sequence[int] | None) -> bool | None:
        """Re-root a prepared search at the target's outcome, the last token of `context`, when
        the draft evaluated it (True: `search` is it); else commit what it can of the accepted
        tokens and drop it (False); None: nothing prepared."""
        search, accepted, self._accepted = self.search, self._accepted, None
        if accepted is None or search is None:
            return None
        self.search = None
        if search.busy:
            self.commit([])
            return False
        if context is not None:
            path = search.path(accepted + [context[-1]])
            if (len(path) == len(accepted) + 1 and len(context) == len(search.context) + len(path)
                    and list(context[:len(search.context)]) == search.context
                    and list(context[len(search.context):-1]) == accepted):
                search.reroot(path, context)
                search.calls = 0
                search.mark = len(search.tree)  # all of it was grown before the pass returned
                self.search = search
                return True
        self.commit(search.path(accepted))
        return False
