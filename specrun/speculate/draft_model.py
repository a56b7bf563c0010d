"""Drafting with a smaller model of the same tokenizer: SpecExec-style best-first trees.

The draft model keeps its own KV cache of the committed text. Each draft call
evaluates a batch of frontier nodes (one batched pass), and every evaluated
node offers its `top_k` likeliest continuations as candidates. The likeliest
candidates by cumulative draft probability are evaluated next, so the tree
grows where the draft is confident, a level deeper per call, while some
candidate is likely enough to be worth a call (`min_prob`). Leaves need no
evaluation: the best candidates left fill the tree, so a tree can hold more
nodes than the draft engine evaluates at once (llama.cpp: 255). A chain
(classic speculative decoding) is the case top_k = 1, one node per call.

`ModelDraftConfig.sized` derives all of this from the tree asked for. Measured
with the 0.5B Qwen2.5-Coder draft on 2 CPU cores of an earlier machine
(llama.cpp): a call over k frontier nodes costs about 15 ms for k = 1, 39 for
2, 48 for 4, 65 for 8, 85 for 16, 150 for 32 and 275 for 64 (on 2 cores of a
Sapphire Rapids Xeon: 38 ms for one node, 94 for one in each of a batch's 8
caches). Against the 1.5B target on 3 HumanEval prompts (greedy, depth 16)
trees of 16, 64 and 255 nodes got 7.6, 10.9 and 12.7 tokens per target pass
from 8.7, 12.4 and 14.2 draft calls (the previous fixed 4 calls of 4 nodes:
4.6 at any size). Nodes carry a planner key (draft probability bucket,
depth): the planner learns how often the target really accepts nodes the draft
was that sure of.
"""

from __future__ import annotations

import heapq
import itertools
import time
from dataclasses import dataclass
from typing import Callable, Hashable, Sequence

import numpy as np

from specrun.engines.base import Cache, Engine, Logits, TreeRequest, Vocab, common_prefix
from specrun.speculate.base import Draft, Verified
from specrun.speculate.overlap import Preparation
from specrun.speculate.tree import DraftTree

_BUCKETS = (0.1, 0.3, 0.6, 0.9)  # draft probability bucket edges for planner keys
MAX_PER_PASS = 64  # frontier nodes per draft call at most: beyond, a call costs about its nodes


@dataclass(frozen=True)
class ModelDraftConfig:
    """How the draft model grows a tree; None: sized from the tree asked for (`sized`)."""

    top_k: int | None = None  # continuations offered per evaluated node
    nodes_per_pass: int | None = None  # frontier nodes evaluated per draft call at most
    max_passes: int | None = None  # draft calls per tree after the context's
    min_prob: float | None = None  # candidates less likely than this (cumulative) are never evaluated

    @classmethod
    def chain(cls, passes: int = 4) -> "ModelDraftConfig":
        return cls(top_k=1, nodes_per_pass=1, max_passes=passes, min_prob=0.0)

    def sized(self, max_nodes: int, max_depth: int) -> "ModelDraftConfig":
        """Every field set, for a tree of `max_nodes` nodes (root included) at most `max_depth`
        deep. A call per level down to `max_depth`, while some candidate is at least
        `min_prob` likely: 4 / max_nodes, since in a tree of n nodes the least likely are
        about that sure (a 16-node tree expands only nodes the draft gives 25% or more, a
        256-node one down to 1.6%). Up to an eighth of the tree per call, and enough
        continuations per evaluated node for the leaves to fill the tree."""
        return ModelDraftConfig(
            self.top_k or min(32, max(4, max_nodes // 8)),
            self.nodes_per_pass or min(MAX_PER_PASS, max(1, (max_nodes - 1) // 8)),
            self.max_passes if self.max_passes is not None else max(max_depth - 1, 0),
            self.min_prob if self.min_prob is not None else min(0.25, 4 / max(max_nodes, 1)))


@dataclass(frozen=True)
class DraftModel:
    """A loaded draft model and the cache it drafts in (the committed text, and trees beside it)."""

    engine: Engine
    cache: Cache


def _key(prob: float, depth: int) -> Hashable:
    return ("model", sum(prob >= edge for edge in _BUCKETS), min(depth, 4))


Candidate = tuple[float, int, int, int, float]  # (-cumulative logp, tie, parent node, token, prob)


class _Search:
    """A best-first draft tree in the making, rooted at context[-1]: `tree` holds the nodes
    the draft engine evaluated, in its order (tree node i is engine tree node i - 1), and
    `heap` the candidates they offered. It outlives a draft when the caller lets it grow
    while the target verifies (`ModelDrafter.prepare`)."""

    def __init__(self, draft: DraftModel, context: Sequence[int], cfg: ModelDraftConfig, max_depth: int) -> None:
        self.engine, self.cache = draft.engine, draft.cache
        self.context, self.cfg, self.max_depth = list(context), cfg, max_depth
        self.tree = DraftTree.rooted(context[-1])
        self.logp, self.probs = [0.0], [1.0]  # per node: cumulative log probability, own probability
        self.heap: list[Candidate] = []
        self.leaves: list[Candidate] = []  # popped: too deep to evaluate
        self.tie = itertools.count()
        self.min_logp = float(np.log(cfg.min_prob)) if cfg.min_prob > 0 else -np.inf
        # Evaluated nodes take cells and sequence ids of the draft engine; leaves take none.
        self.evaluable = min(self.engine.max_tree_nodes, self.cache.n_ctx - len(context))
        self.calls = 0  # draft calls since the last draft began
        self.mark = 0  # nodes evaluated before the pass that verified their tree returned (prepared)
        self.started = False  # the root was evaluated: the tree can grow
        self.busy = False  # set while the engine and these arrays may disagree (a Ctrl-C mid-call)

    def offer(self, node: int, logits: Logits, row: int) -> None:
        if self.tree.depths[node] < self.max_depth:
            for tok, p in zip(*logits.top_k(row, self.cfg.top_k)):
                cum = self.logp[node] + float(np.log(max(p, 1e-30)))
                heapq.heappush(self.heap, (-cum, next(self.tie), node, int(tok), float(p)))

    def start(self) -> None:
        self.started_with(self.engine.sync(self.cache, self.context))  # the root is always evaluated

    def started_with(self, row: Logits) -> None:
        """The draft cache holds the context: `row` (after its last token) offers the root's children."""
        self.offer(0, row, 0)
        self.calls, self.started = 1, True

    def limit(self, depth: int, min_prob: float) -> None:
        """Grow down to `depth` and expand candidates at least `min_prob` likely from here on
        (popped leaves go back to the candidates: the new depth may let them grow)."""
        self.max_depth = depth
        self.min_logp = float(np.log(min_prob)) if min_prob > 0 else -np.inf
        for item in self.leaves:
            heapq.heappush(self.heap, item)
        self.leaves = []

    def grow(self, room: int | None, width: int | None = None) -> int:
        """One draft call over the likeliest candidates (at most `room` nodes counting room for
        their children; None: no bound but the engine's), `width` of them at most (None: the
        config's); how many it evaluated."""
        first = self.add(self.choose(room, width))
        if first is None:
            return 0
        self.take(first, self.engine.eval_tree(self.cache, *self.request(first)))
        return len(self.tree) - first

    def request(self, first: int) -> tuple[list[int], list[int], list[int], int]:
        """The draft engine's tree (tokens, parents, depths, start) for the nodes `first`.. added."""
        tree = self.tree
        return tree.tokens[1:], [q - 1 for q in tree.parents[1:]], [d - 1 for d in tree.depths[1:]], first - 1

    def choose(self, room: int | None, width: int | None = None) -> list[Candidate]:
        """The candidates the next draft call would evaluate, taken from the heap (`add` them, or
        `put_back`)."""
        batch: list[Candidate] = []
        cap = min(width or self.cfg.nodes_per_pass, self.cfg.nodes_per_pass, self.evaluable - (len(self.tree) - 1))
        while self.heap and len(batch) < cap and (room is None or 2 * (len(batch) + 1) <= room - len(self.leaves)):
            if -self.heap[0][0] < self.min_logp:
                break  # the best candidate is too unlikely to be worth a draft call
            item = heapq.heappop(self.heap)
            if self.tree.depths[item[2]] + 1 >= self.max_depth:
                self.leaves.append(item)  # its children would be too deep: a leaf
            else:
                batch.append(item)
        return batch

    def put_back(self, batch: list[Candidate]) -> None:
        for item in batch:
            heapq.heappush(self.heap, item)

    def add(self, batch: list[Candidate]) -> int | None:
        """The chosen candidates join the tree as a draft call's nodes (from the index returned)."""
        if not batch:
            return None
        tree, first = self.tree, len(self.tree)
        self.busy = True
        for neg, _, parent, tok, p in batch:
            tree.add(tok, parent)
            self.logp.append(-neg)
            self.probs.append(p)
        return first

    def take(self, first: int, logits: Logits) -> None:
        """The rows of the draft call over the nodes `add` added from `first`: their continuations offered."""
        for row, node in enumerate(range(first, len(self.tree))):
            self.offer(node, logits, row)
        self.busy = False
        self.calls += 1

    def proposal(self, max_nodes: int, max_depth: int) -> tuple[DraftTree, list[Hashable], list[bool]]:
        """The `max_nodes` likeliest nodes at most `max_depth` deep, evaluated or candidates (as
        leaves): evaluated first, in their order, so the drafter finds them again by token. Per
        node, whether it was found before `mark` (offered by a node evaluated by then)."""
        tree = DraftTree(list(self.tree.tokens), list(self.tree.parents), list(self.tree.depths))
        keys: list[Hashable] = [("root",)] + [_key(p, d) for p, d in zip(self.probs[1:], tree.depths[1:])]
        origin = list(range(len(tree)))  # per node of `tree`: its index in self.tree
        if len(tree) > max_nodes or max(tree.depths) > max_depth:  # grown past the tree asked for
            fits = [i for i in range(len(tree)) if tree.depths[i] <= max_depth]
            origin = sorted(sorted(fits, key=lambda i: (-self.logp[i], tree.depths[i]))[:max_nodes])  # parents first
            tree, keys = tree.subtree(origin), [keys[i] for i in origin]
        found = [False] + [self.tree.parents[i] < self.mark for i in origin[1:]]
        candidates = [c for c in self.heap + self.leaves if self.tree.depths[c[2]] < max_depth]
        for _, _, parent, tok, p in heapq.nsmallest(max_nodes - len(tree), candidates) if len(tree) == len(self.tree) else ():
            node = tree.add(tok, parent)  # the best candidates left, evaluated or not, as leaves
            keys.append(_key(p, tree.depths[node]))
            found.append(parent < self.mark)
        return tree, keys, found

    def path(self, tokens: Sequence[int]) -> list[int]:
        """The evaluated nodes spelling `tokens` below the root, as far as they go."""
        path, node = [], 0
        for tok in tokens:
            child = self.tree.child(node, tok)
            if child is None:
                break
            path.append(child)
            node = child
        return path

    def reroot(self, path: list[int], context: Sequence[int]) -> None:
        """Make path[-1] the root (the context grew by the path's tokens): the engine commits
        the path and keeps its subtree; depths, probabilities and candidates follow."""
        tree, top = self.tree, path[-1]
        below = [i for i in range(top + 1, len(tree)) if self._descends(i, top)]
        self.engine.commit_path(self.cache, [i - 1 for i in path], [i - 1 for i in below])
        index = {old: new for new, old in enumerate([top] + below)}
        base = self.logp[top]
        self.tree = tree.subtree([top] + below)
        self.logp = [self.logp[i] - base for i in index]
        self.probs = [1.0] + [self.probs[i] for i in below]
        self.heap = [(neg + base, t, index[parent], tok, p) for neg, t, parent, tok, p in self.heap + self.leaves
                     if parent in index]
        heapq.heapify(self.heap)
        self.leaves, self.context = [], list(context)
        self.evaluable = min(self.engine.max_tree_nodes, self.cache.n_ctx - len(context))

    def _descends(self, node: int, top: int) -> bool:
        while node > top:
            node = self.tree.parents[node]
        return node == top


class ModelDrafter:
    """The draft model's cache holds the committed text (`cache.tokens`); each draft brings
    it up to the context, then grows the tree beside it.

    While the target verifies, `prepare` grows the same tree further, and the next draft
    picks it up where the target's outcome was evaluated (overlap.Preparation)."""

    costly = True  # a draft model pass per tree level

    def __init__(self, draft: DraftModel, config: ModelDraftConfig = ModelDraftConfig(), *,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.model, self.engine, self.cache, self.config = draft, draft.engine, draft.cache, config
        self.clock = clock  # times drafts and draft calls (tests pass a fake one)
        # Its searches' node i is the engine's tree node i - 1 (the root is the cache's last token).
        self.preparation = Preparation(lambda nodes: self.engine.commit_path(self.cache, [i - 1 for i in nodes]),
                                       clock=clock)

    def draft(self, context: Sequence[int], max_nodes: int, max_depth: int) -> Draft:
        catch_up_s = 0.0  # prefilling a new prompt (not a step's few tokens)
        reused = self.preparation.resume(context)
        search: _Search | None = self.preparation.search if reused else None  # type: ignore[assignment]
        levels = 0  # levels already grown (below a guess that came true)
        if search is None:
            room = self.cache.n_ctx - len(context)  # cache cells beside the context
            depth = min(max_depth, room)
            search = _Search(self.model, context, self.config.sized(max_nodes, depth), depth)
            if max_nodes > 1 and depth > 0:
                behind = len(context) - common_prefix(self.cache.tokens, context)
                t_start = self.clock()
                search.start()
                if behind > max_depth + 1:  # more than a step accepts: a new prompt's prefill
                    catch_up_s = self.clock() - t_start
        else:  # grown below the target's outcome already: on with a fresh draft's limits
            levels = max(search.tree.depths)
            depth = min(max_depth, self.cache.n_ctx - len(context))
            search.cfg = self.config.sized(max_nodes, depth)  # the tree asked for may have changed
            search.limit(depth, search.cfg.min_prob)
        if search.started:
            # As deep as a fresh draft would grow (a level a call), less what was prepared.
            for _ in range(search.cfg.max_passes - levels):
                if not search.grow(max_nodes - len(search.tree)):
                    break
        return self.drafted(search, max_nodes, max_depth, reused, catch_up_s)

    def fresh(self, context: Sequence[int], max_nodes: int, max_depth: int) -> _Search:
        """A search for `context` not started yet: a batch starts and grows several sequences'
        together (`draft_together`), then hands each its own back (`drafted`)."""
        self.preparation.resume(None)
        depth = min(max_depth, self.cache.n_ctx - len(context))
        return _Search(self.model, context, self.config.sized(max_nodes, depth), depth)

    def drafted(self, search: _Search, max_nodes: int, max_depth: int, reused: bool | None = None,
                catch_up_s: float = 0.0) -> Draft:
        """The draft `search` grew: its `max_nodes` likeliest nodes at most `max_depth` deep."""
        if max_nodes > 1 and search.started and max_depth > 0:
            tree, keys, prepared = search.proposal(max_nodes, max_depth)
        else:
            tree, keys, prepared = DraftTree.rooted(search.context[-1]), [("root",)], [False]
        self.preparation.drafted(search)
        return Draft(tree, keys, reused, prepared, catch_up_s, search.calls, len(search.tree) - 1)

    def warm(self, context: Sequence[int]) -> float:
        """Prefill the draft's cache with `context`, after settling what the last generation
        left prepared (its tree would not survive the prefill): the first draft then
        evaluates its root alone."""
        t0 = self.clock()
        self.preparation.resume(None)
        if context and common_prefix(self.cache.tokens, context) < len(context):
            self.engine.sync(self.cache, context)
        return self.clock() - t0

    def prepare(self, until: Callable[[], bool], deadline: float | None = None) -> float:
        return self.preparation.prepare(until, deadline, self.cache.n_ctx)

    def accepted(self, verified: Verified) -> None:
        self.preparation.accepted(verified.tokens[1:])


def warm_together(jobs: Sequence[tuple[ModelDrafter, Sequence[int]]]) -> None:
    """`ModelDrafter.warm` for several sequences joining a batch: their prompts prefilled in the
    draft's caches in as few passes as its engine can, with the target's prefill, not in the
    first step's draft."""
    todo = []
    for drafter, context in jobs:
        drafter.preparation.resume(None)
        if context and common_prefix(drafter.cache.tokens, context) < len(context):
            todo.append((drafter.cache, context))
    if todo:
        jobs[0][0].engine.sync_many(todo)


CHILD_SHARE = 0.7  # what a draft call adds below a node it evaluates: its likeliest child, about this sure


def draft_together(jobs: Sequence[tuple[ModelDrafter, Sequence[int], int, int]], pass_s: float,
                   clock: Callable[[], float] = time.perf_counter) -> list[Draft]:
    """Draft-model trees for several sequences sharing the target's passes, (drafter, context,
    nodes, depth) each, every level of all of them in one draft call (their caches share the
    draft engine's passes as the target's do: on 2 cores one node in each of 8 caches costs
    2.5x one node alone). Levels go on while the next is worth its time: the chance it adds
    (the picked candidates' cumulative probability, times CHILD_SHARE) per second of the last
    call beats the tokens the trees are expected to give per second of the step so far, the
    target's pass (`pass_s`) included. A drafted tree beyond what pays is cut by the batch's
    plan."""
    searches = [drafter.fresh(context, nodes, depth) for drafter, context, nodes, depth in jobs]
    pairs = [(s, nodes) for s, (_, _, nodes, _) in zip(searches, jobs) if nodes > 1 and s.max_depth > 0]
    live = [s for s, _ in pairs]
    if live:
        engine = live[0].engine
        t0 = clock()
        for s, row in zip(live, engine.sync_many([(s.cache, s.context) for s in live])):
            s.started_with(row)
        spent, call_s = pass_s + clock() - t0, None
        for _ in range(max(s.cfg.max_passes for s in live)):
            chosen = [(s, batch) for s, nodes in pairs if (batch := s.choose(nodes - len(s.tree)))]
            adds = CHILD_SHARE * sum(float(np.exp(-c[0])) for _, batch in chosen for c in batch)
            expected = sum(1.0 + sum(float(np.exp(lp)) for lp in s.logp[1:]) +
                           max((float(np.exp(-c[0])) for c in s.heap[:1] + s.leaves), default=0.0) for s in live)
            if not chosen or call_s is not None and adds * spent <= expected * call_s:
                for s, batch in chosen:
                    s.put_back(batch)
                break
            picked = [(s, s.add(batch)) for s, batch in chosen]
            t1 = clock()
            rows = engine.eval_trees([TreeRequest(s.cache, *s.request(first)) for s, first in picked])
            for (s, first), logits in zip(picked, rows):
                s.take(first, logits)
            call_s = clock() - t1
            spent += call_s
    return [drafter.drafted(s, nodes, depth) for s, (drafter, _, nodes, depth) in zip(searches, jobs)]


class VocabMismatch(ValueError):
    pass


def check_vocab_compatible(target: Vocab, draft: Vocab) -> None:
    """The draft must tokenize like the target (llama.cpp's speculative example's rules):
    same vocabulary type and special tokens, sizes within 128, same token texts."""
    if target.vocab_type() != draft.vocab_type():
        raise VocabMismatch("the draft's tokenizer type differs from the target's")
    if target.special_tokens() != draft.special_tokens():
        raise VocabMismatch("the draft's special tokens (BOS/EOS) differ from the target's")
    if abs(target.n_vocab - draft.n_vocab) > 128:
        raise VocabMismatch(f"vocabulary sizes differ too much ({target.n_vocab} vs {draft.n_vocab})")
    for i in range(5, min(target.n_vocab, draft.n_vocab)):
        if target.token_text(i) != draft.token_text(i):
            raise VocabMismatch(f"token {i} differs ({target.token_text(i)!r} vs {draft.token_text(i)!r})")
