"""The engine contract: one model, one KV cache, tokens in, logits out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np


@dataclass(frozen=True)
class EngineConfig:
    """How to run a model. `None` means: decide from the model and the machine."""

    n_ctx: int | None = None  # KV cache size; None fits the request (>= 4096, <= training context)
    n_threads: int | None = None  # None: every core
    n_gpu_layers: int | None = None  # None: all layers if the build can offload, else 0; -1: all
    n_batch: int = 512  # tokens per llama_decode while prefilling
    n_seq_max: int = 1  # sequences in the KV cache (draft trees need many)


def ancestor_mask(parents: Sequence[int]) -> np.ndarray:
    """bool [n, n] for a tree given as parent indices (parents[i] < i, -1 for the root):
    mask[i, j] iff node j is node i or one of its ancestors, i.e. token i attends to j.
    Built row by row: a node's row is its parent's row plus itself."""
    n = len(parents)
    mask = np.zeros((n, n), dtype=bool)
    for i, p in enumerate(parents):
        if p >= 0:
            mask[i] = mask[p]
        mask[i, i] = True
    return mask


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences: how much of a KV cache
    holding `a` serves a request for `b`."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Engine(Protocol):
    """A loaded model. The KV cache holds one sequence of `kv_len` tokens; `eval`
    appends to it and `rewind` cuts it back, so callers can reuse a prefix."""

    n_vocab: int
    n_ctx_train: int

    def tokenize(self, text: str, add_special: bool = True) -> list[int]: ...

    def piece(self, token: int) -> bytes:
        """The bytes a token stands for in generated text (b'' for control tokens)."""
        ...

    def is_eog(self, token: int) -> bool:
        """End of generation (EOS, EOT and the like)."""
        ...

    def vocab_type(self) -> int: ...

    def special_tokens(self) -> tuple[int, int]:
        """(BOS, EOS) ids; -1 where the vocabulary has none."""
        ...

    def token_text(self, token: int) -> bytes:
        """The token's text as stored in the vocabulary (for tokenizer comparisons)."""
        ...

    def open(self, n_ctx: int) -> None:
        """Allocate a KV cache of `n_ctx` tokens (replacing any previous one)."""
        ...

    @property
    def n_ctx(self) -> int: ...

    @property
    def kv_len(self) -> int: ...

    def eval(self, tokens: Sequence[int]) -> np.ndarray:
        """Append `tokens` to the cache; float32 logits [n_vocab] after the last one."""
        ...

    def rewind(self, n_tokens: int) -> None:
        """Keep only the first `n_tokens` cache entries."""
        ...

    def eval_tree(self, tokens: Sequence[int], parents: Sequence[int], depths: Sequence[int],
                  start: int = 0) -> np.ndarray:
        """Evaluate tree nodes start..n-1 after the cached sequence in one pass; float32 logits
        [n - start, n_vocab]. Node i sits at position kv_len + depths[i] and attends to the
        cache and to its ancestors only; nodes before `start` come from earlier calls since
        the last commit. The committed cache is unchanged until `commit_path`."""
        ...

    def commit_path(self, path: Sequence[int]) -> None:
        """Keep the tree nodes `path` (root first, each the parent of the next) in the
        cache after the last `eval_tree`, and drop every other node."""
        ...

    def close(self) -> None: ...
