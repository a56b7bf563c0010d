"""Where a llama.cpp engine keeps a sequence: a range of sequence ids in a llama.cpp context.

A context holds KV cells, a batch and a logits buffer. A cache may have one of its own,
or share one with the other sequences of a batch, each in a range of ids (its committed
tokens under the first, its tree's nodes under the rest), so that one llama_decode
evaluates all their trees and the weights are read once for them.
"""

from __future__ import annotations

import ctypes

import llama_cpp as C

from specrun.engines.base import Cache


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
