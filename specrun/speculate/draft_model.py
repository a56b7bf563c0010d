"""Drafting with a smaller model of the same tokenizer: SpecExec-style best-first trees.

The draft model keeps its own KV cache of the committed text. Each draft pass
evaluates the newest tree nodes (many frontier nodes per pass: one batched
call), and every evaluated node offers its `top_k` likeliest continuations as
candidates. Candidates enter the tree best-first by cumulative draft
log-probability, so the tree grows where the draft is confident. A chain
(classic speculative decoding) is the case top_k = 1, one node per pass.

Nodes carry a planner key (draft probability bucket, depth): the planner
learns how often the target really accepts nodes the draft was that sure of.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from typing import Hashable, Sequence

import numpy as np

from specrun.engines.base import Engine, Logits, Vocab
from specrun.speculate.tree import DraftTree

_BUCKETS = (0.1, 0.3, 0.6, 0.9)  # draft probability bucket edges for planner keys


@dataclass(frozen=True)
class ModelDraftConfig:
    top_k: int = 4  # continuations offered per evaluated node
    nodes_per_pass: int = 4  # frontier nodes evaluated per draft call
    max_passes: int = 4  # draft calls per step

    @classmethod
    def chain(cls, passes: int = 4) -> "ModelDraftConfig":
        return cls(top_k=1, nodes_per_pass=1, max_passes=passes)


def _key(prob: float, depth: int) -> Hashable:
    return ("model", sum(prob >= edge for edge in _BUCKETS), min(depth, 4))


class ModelDrafter:
    """The draft model's cache holds the committed text (`engine.tokens`); each draft brings
    it up to the context, then grows the tree beside it."""

    costly = True  # a draft model pass per tree level

    def __init__(self, engine: Engine, config: ModelDraftConfig = ModelDraftConfig()) -> None:
        self.engine, self.config = engine, config
        self._tree: DraftTree | None = None
        self._evaluated = 0  # tree nodes (root excluded) evaluated by the draft model

    def draft(self, context: Sequence[int], max_nodes: int, max_depth: int) -> tuple[DraftTree, list[Hashable]]:
        cfg = self.config
        tree, keys, logp = DraftTree.rooted(context[-1]), [("root",)], [0.0]
        self._tree, self._evaluated = tree, 0
        # Tree nodes below the root take cells of the draft's cache and sequence ids of its own.
        max_depth = min(max_depth, self.engine.n_ctx - len(context))
        max_nodes = min(max_nodes, self.engine.max_tree_nodes + 1, self.engine.n_ctx - len(context) + 1)
        if max_nodes <= 1 or max_depth <= 0:
            return tree, keys
        tie = itertools.count()
        heap: list[tuple[float, int, int, int, float]] = []  # (-cum logp, tie, parent, token, prob)

        def offer(node: int, logits: Logits, row: int) -> None:
            if tree.depths[node] >= max_depth:
                return
            for tok, p in zip(*logits.top_k(row, cfg.top_k)):
                heapq.heappush(heap, (-(logp[node] + float(np.log(max(p, 1e-30)))), next(tie), node, int(tok), float(p)))

        offer(0, self.engine.sync(context), 0)  # the root is always evaluated: its logits start the tree
        for _ in range(cfg.max_passes):
            first_new = len(tree)
            while heap and len(tree) < max_nodes and len(tree) - first_new < cfg.nodes_per_pass:
                neg, _, parent, tok, p = heapq.heappop(heap)
                if tree.child(parent, tok) is None:
                    node = tree.add(tok, parent)
                    logp.append(-neg)
                    keys.append(_key(p, tree.depths[node]))
            if len(tree) == first_new or len(tree) >= max_nodes:
                break  # nothing new, or full: leaves need no draft pass
            logits = self.engine.eval_tree(tree.tokens[1:], [q - 1 for q in tree.parents[1:]],
                                           [d - 1 for d in tree.depths[1:]], start=first_new - 1)
            self._evaluated = len(tree) - 1
            for row, node in enumerate(range(first_new, len(tree))):
                offer(node, logits, row)
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
