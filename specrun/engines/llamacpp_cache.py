"""Where a llama.cpp engine keeps a sequence: a range of sequence ids in a llama.cpp context.

A context holds KV cells, a batch and a logits buffer. A cache may have one of its own,
or share one with the other sequences of a batch, each in a range of ids (its committed
tokens under the first, its tree's nodes under the rest), so that one llama_decode
evaluates all their trees and the weights are read once for them.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from specrun.engines.base import Cache
from specrun.engines.llama_lib import llama_cpp as C
from specrun.engines.top_k import top_ids_of, top_k_of


class LlamaCppContext:
    """A llama.cpp context on the engine's model, its batch, and the caches it holds: `slots`
    ranges of `ids` sequence ids, one range per cache (its committed tokens under the first id,
    its tree's nodes under the rest), all sharing `cells` KV cells. A cache of its own is a
    context of one slot; caches in one context have their trees verified in one llama_decode."""

    def __init__(self, ctx: ctypes.c_void_p, batch: C.llama_batch, n_batch: int, cells: int, slots: int,
                 ids: int) -> None:
        self.ctx: ctypes.c_void_p | None = ctx
        self.batch: C.llama_batch | None = batch
        self.n_batch, self.cells, self.ids = n_batch, cells, ids  # tokens per llama_decode; KV cells; ids a slot
        self.free_slots = list(range(slots - 1, -1, -1))  # popped from the end: slot 0 first
        self.used_cells = 0  # reserved by the caches it holds (each its n_ctx)

    @property
    def empty(self) -> bool:
        return self.used_cells == 0

    def take(self, n_ctx: int) -> int | None:
        """A slot's first sequence id for a cache of `n_ctx` cells; None when no slot or room is left."""
        if not self.free_slots or self.used_cells + n_ctx > self.cells:
            return None
        self.used_cells += n_ctx
        return self.free_slots.pop() * self.ids

    def give_back(self, seq0: int, n_ctx: int) -> None:
        """A cache's slot, its cells emptied, for the next cache."""
        if self.ctx is not None:
            mem = C.llama_get_memory(self.ctx)
            for s in range(seq0, seq0 + self.ids):
                C.llama_memory_seq_rm(mem, s, -1, -1)
        self.used_cells -= n_ctx
        self.free_slots.append(seq0 // self.ids)

    def close(self) -> None:
        if self.batch is not None:
            C.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx is not None:
            C.llama_free(self.ctx)
            self.ctx = None


class LlamaCppCache(Cache):
    """One sequence in a llama.cpp context: sequence `seq0` holds its committed tokens, and
    seq0 + 1.. its draft tree's nodes (`eval_tree`)."""

    def __init__(self, n_ctx: int, context: LlamaCppContext, seq0: int) -> None:
        super().__init__(n_ctx)
        self.context, self.seq0 = context, seq0

    @property
    def ctx(self) -> ctypes.c_void_p | None:
        return self.context.ctx

    @property
    def n_batch(self) -> int:
        return self.context.n_batch


class ContextLogits:
    """Rows of a context's logits buffer, read in place; stale after the engine's next pass (its
    `_epoch` counts them)."""

    def __init__(self, engine: Any, ptr: ctypes._Pointer, n: int, first: int = 0) -> None:
        self._engine, self._epoch = engine, engine._epoch
        rows = np.ctypeslib.as_array(ptr, shape=(first + n, engine.vocab.n_vocab))  # float32, a view
        self._rows = rows[first:]  # [n, n_vocab]: rows first.. of the context's outputs

    def _view(self, i: int) -> np.ndarray:
        if self._engine._epoch != self._epoch:
            raise RuntimeError("logits read after the engine's next pass")
        return self._rows[i]

    def __len__(self) -> int:
        return len(self._rows)

    def row(self, i: int) -> np.ndarray:
        return self._view(i).copy()

    def argmax(self, i: int) -> int:
        return int(np.argmax(self._view(i)))

    def top_k(self, i: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        return top_k_of(self._view(i), k)

    def top_ids(self, i: int, k: int) -> np.ndarray:
        return top_ids_of(self._view(i), k)
