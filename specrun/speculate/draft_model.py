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
with the 0.5B Qwen2.5-Coder draft on 2 CPU cores (llama.cpp): a call over k
frontier nodes costs about 15 ms for k = 1, 39 for 2, 48 for 4, 65 for 8, 85
for 16, 150 for 32 and 275 for 64. Against the 1.5B target on 3 HumanEval
prompts (greedy, depth 16) trees of 16, 64 and 255 nodes got 7.6, 10.9 and
12.7 tokens per target pass from 8.7, 12.4 and 14.2 draft calls (the
previous fixed 4 calls of 4 nodes: 4.6 at any size). Nodes carry a planner key
(draft probability bucket, depth): the planner learns how often the target
really accepts nodes the draft was that sure of.
"""

from __future__ import annotations

import heapq
import itertools
import time
from dataclasses import dataclass
from typing import Hashable, Sequence

import numpy as np

from specrun.engines.base import Engine, Logits, Vocab
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
class DraftStep:
    """What one draft cost and grew (`ModelDrafter.last`), for bench and --verbose."""

    budget: int  # nodes asked for, root included
    nodes: int  # nodes drafted, root included
    evaluated: int  # nodes the draft model evaluated (the root excluded: the context call covers it)
    calls: int  # draft model calls: bringing its cache to the context, then one per level
    per_pass: int  # frontier nodes evaluated per call at most
    depth: int  # the deepest node
    seconds: float  # wall time of the draft


def _key(prob: float, depth: int) -> Hashable:
    return ("model", sum(prob >= edge for edge in _BUCKETS), min(depth, 4))


class ModelDrafter:
    """The draft model's cache holds the committed text (`engine.tokens`); each draft brings
    it up to the context, then grows the tree beside it."""

    costly = True  # a draft model pass per tree level

    def __init__(self, engine: Engine, config: ModelDraftConfig = ModelDraftConfig()) -> None:
        self.engine, self.config = engine, config
        self._tree: DraftTree | None = None
        self._evaluated = 0  # tree nodes (root excluded) evaluated by the draft model: 1.._evaluated
        self.last: DraftStep | None = None  # the latest draft's figures
        self.drafts = 0  # drafts so far (a planner resting between drafts leaves `last` as it was)

    def draft(self, context: Sequence[int], max_nodes: int, max_depth: int) -> tuple[DraftTree, list[Hashable]]:
        t0 = time.perf_counter()
        engine = self.engine
        tree, keys, logp = DraftTree.rooted(context[-1]), [("root",)], [0.0]
        self._tree, self._evaluated = tree, 0
        room = engine.n_ctx - len(context)  # cache cells beside the context: one per evaluated node
        max_depth = min(max_depth, room)
        cfg = self.config.sized(max_nodes, max_depth)
        calls, widest = 0, 0
        if max_nodes > 1 and max_depth > 0:
            # Evaluated nodes take cells and sequence ids of the draft engine; leaves take none.
            evaluable = min(engine.max_tree_nodes, room)
            tie = itertools.count()
            heap: list[tuple[float, int, int, int, float]] = []  # (-cum logp, tie, parent, token, prob)
            leaves: list[tuple[float, int, int, int, float]] = []  # popped, never to be evaluated

            def offer(node: int, logits: Logits, row: int) -> None:
                if tree.depths[node] < max_depth:
                    for tok, p in zip(*logits.top_k(row, cfg.top_k)):
                        cum = logp[node] + float(np.log(max(p, 1e-30)))
                        heapq.heappush(heap, (-cum, next(tie), node, int(tok), float(p)))

            def place(item: tuple[float, int, int, int, float]) -> None:
                neg, _, parent, tok, p = item
                node = tree.add(tok, parent)
                logp.append(-neg)
                keys.append(_key(p, tree.depths[node]))

            min_logp = float(np.log(cfg.min_prob)) if cfg.min_prob > 0 else -np.inf
            offer(0, engine.sync(context), 0)  # the root is always evaluated: its logits start the tree
            calls = 1
            for _ in range(cfg.max_passes):
                # Evaluate the best candidates, leaving room in the tree for their children.
                batch: list[tuple[float, int, int, int, float]] = []
                while (heap and len(batch) < min(cfg.nodes_per_pass, evaluable - (len(tree) - 1))
                       and 2 * (len(batch) + 1) <= max_nodes - len(tree) - len(leaves)):
                    if -heap[0][0] < min_logp:
                        break  # the best candidate is too unlikely to be worth a draft call
                    item = heapq.heappop(heap)
                    if tree.depths[item[2]] + 1 >= max_depth:
                        leaves.append(item)  # its children would be too deep: a leaf
                    else:
                        batch.append(item)
                if not batch:
                    break
                first_new = len(tree)
                for item in batch:
                    place(item)
                logits = engine.eval_tree(tree.tokens[1:], [q - 1 for q in tree.parents[1:]],
                                          [d - 1 for d in tree.depths[1:]], start=first_new - 1)
                self._evaluated, calls, widest = len(tree) - 1, calls + 1, max(widest, len(batch))
                for row, node in enumerate(range(first_new, len(tree))):
                    offer(node, logits, row)
            for item in heapq.nsmallest(max_nodes - len(tree), heap + leaves):
                place(item)  # the best candidates left, evaluated or not, as leaves
        self.drafts += 1
        self.last = DraftStep(max_nodes, len(tree), self._evaluated, calls, widest, max(tree.depths),
                              time.perf_counter() - t0)
        return tree, keys

    def accepted(self, tokens: Sequence[int]) -> None:
        """The target accepted `tokens` after the root: keep their draft KV where it exists."""
        tree, path, node = self._tree, [], 0
        if tree is not None:
            for tok in tokens:
                child = tree.child(node, tok)
                if child is None or child - 1 >= self._evaluated:
                    break
                path.append(child - 1)  # draft-side index: the root lives in the committed cache
                node = child
        self.engine.commit_path(path)
        self._tree, self._evaluated = None, 0


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
