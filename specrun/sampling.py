"""Turning logits into a next token: greedy, or temperature with nucleus (top-p).

Pure numpy and deterministic for a given seed. The same `distribution` serves
plain sampling and (later) speculative verification, whose exactness rests on
both drawing from one and the same target distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_TOPK_FAST = 1024  # candidates examined before falling back to a full sort


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.8  # 0 = greedy
    top_p: float = 0.95  # 1 = no truncation
    seed: int | None = None  # None: fresh entropy each run

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)


def distribution(logits: np.ndarray, cfg: SamplingConfig) -> tuple[np.ndarray, np.ndarray]:
    """(token ids [k] ascending, probabilities [k]) of the sampling distribution, zero-probability tokens left out.

    Top-p keeps the smallest set of most likely tokens whose mass reaches `top_p`
    (ties at the boundary broken by token id). Usually that set lies inside the
    top `_TOPK_FAST` logits, which avoids sorting the whole vocabulary.
    """
    z = logits.astype(np.float64) / cfg.temperature  # [vocab]
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    if cfg.top_p >= 1.0:
        ids = np.flatnonzero(p)
        return ids, p[ids]
    k = min(_TOPK_FAST, p.size)
    cand = np.argpartition(-p, k - 1)[:k] if k < p.size else np.arange(p.size)
    if p[cand].sum() < cfg.top_p:
        cand = np.arange(p.size)
    order = cand[np.lexsort((cand, -p[cand]))]  # by probability desc, then id asc
    cum = np.cumsum(p[order])
    keep = min(int(np.searchsorted(cum, cfg.top_p)) + 1, order.size)  # first prefix reaching top_p
    ids = np.sort(order[:keep])  # id order: see `sample`
    probs = p[ids] / p[ids].sum()
    return ids, probs


def sample(logits: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator) -> int:
    """One token from `logits` [vocab]; argmax (lowest id on ties) when greedy.

    The uniform draw is inverted over the kept tokens in id order, not probability order:
    a batched pass perturbs logits slightly, and in probability order that would swap
    near-tied tokens and change which token the same draw picks. In id order the draw
    changes only when it falls within that perturbation of a boundary, so seeded
    speculative output stays the plain output."""
    if cfg.greedy:
        return int(np.argmax(logits))
    ids, probs = distribution(logits, cfg)
    u = rng.random()
    i = int(np.searchsorted(np.cumsum(probs), u, side="right"))
    return int(ids[min(i, ids.size - 1)])
