"""The llama.cpp engine, on llama-cpp-python's C API (ctypes).

The C API rather than the `Llama` class because speculative decoding needs what
that class hides: batches with per-token sequence ids and positions, logits for
chosen rows, and KV cache surgery (`llama_memory_seq_*`). The engine holds the
model and its vocabulary; a cache is a range of sequence ids in a llama.cpp
context on that model: a context of its own (its KV cells, batch and logits), or
one that a batch's caches share (`sequences`), so that one llama_decode verifies
all their trees and the weights are read once for them.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from specrun.engines.base import Cache, EngineMixin, TreeRequest, check_keep, check_requests
from specrun.engines.ggml_devices import devices, has_gpu
from specrun.engines.llama_lib import llama_cpp as C
from specrun.engines.rpc import on_lost_worker, parse_endpoint, worker_devices
from specrun.engines.llamacpp_cache import ContextLogits, LlamaCppCache, LlamaCppContext
from specrun.engines.llamacpp_backend import LlamaCppVocab, init_backend, last_log_error
from specrun.engines.prefill import prefill_passes
from specrun.engines.host_cpu import cpu_identity
from specrun.errors import EngineError, UsageError
from specrun.memory_limit import locked_bytes, swap_enabled

MAX_SEQ = 256  # llama.cpp's LLAMA_MAX_SEQ: a tree node needs a sequence id of its own, so trees hold <= 255
LOAD_MODES = {"mmap": C.LLAMA_LOAD_MODE_MMAP, "resident": C.LLAMA_LOAD_MODE_NONE, "locked": C.LLAMA_LOAD_MODE_MLOCK}

@dataclass(frozen=True)
class LlamaCppConfig:
    """How llama.cpp runs one model. `None` means: decide from the model and the machine."""

    n_threads: int | None = None  # None: every core
    n_gpu_layers: int | None = None  # None: all layers if the build can offload, else 0; -1: all
    n_batch: int = 512  # tokens per llama_decode while prefilling
    max_tree_nodes: int = 0  # nodes per eval_tree call (0: no trees); each needs a KV sequence id
    load: str = "mmap"  # "mmap": the page cache holds the file (shared, evictable); "resident": read into
    # anonymous memory, which other reads cannot evict; "locked": that, and mlock'd (Placement.load)
    rpc: tuple[str, ...] = ()  # RPC workers ("HOST:PORT") that hold and compute the layers (engines.rpc)
    sequences: int = 1  # caches sharing one context, their trees verified in one llama_decode (a batch's)
    repack: bool = True  # llama.cpp's repacked copies for its CPU kernels (anonymous memory): off when
    # the file is paged from disk because it does not fit, where such copies would not fit either


class LlamaCppEngine(EngineMixin):
    def __init__(self, path: Path, config: LlamaCppConfig = LlamaCppConfig()) -> None:
        if not 0 <= config.max_tree_nodes < MAX_SEQ:
            raise UsageError(f"llama.cpp verifies trees of at most {MAX_SEQ - 1} nodes, not {config.max_tree_nodes}",
                             hint=f"use --budget {MAX_SEQ - 1} or less")
        if not 1 <= config.sequences <= MAX_SEQ // 2:
            raise UsageError(f"llama.cpp decodes at most {MAX_SEQ // 2} sequences together, not {config.sequences}",
                             hint=f"use --parallel {MAX_SEQ // 2} or less")
        init_backend()
        self.config, self.path = config, path
        params = C.llama_model_default_params()
        params.n_gpu_layers = _gpu_layers(config.n_gpu_layers)
        # With --rpc the layers go to the workers and this machine's GPUs (by their free memory;
        # --gpu-layers N keeps all but N on this CPU); once workers are added, any other model
        # (the draft) is offered this machine's own devices only.
        offered = None
        if config.rpc:
            workers = [parse_endpoint(e, "--rpc") for e in config.rpc]
            on_lost_worker(workers)  # first: a worker that fails the handshake aborts too
            offered = [d.handle for d in devices() if d.is_gpu] + worker_devices(workers)
            params.n_gpu_layers = -1 if config.n_gpu_layers is None else config.n_gpu_layers
        elif any(d.remote for d in devices()):
            offered = [d.handle for d in devices() if d.is_gpu]
        if offered is not None:
            listed = (ctypes.c_void_p * (len(offered) + 1))(*offered, None)  # NULL-terminated
            params.devices = ctypes.cast(listed, ctypes.c_void_p)
        params.load_mode = LOAD_MODES[config.load]
        params.use_extra_bufts = config.repack
        self._model = C.llama_model_load_from_file(str(path).encode(), params)
        if not self._model:
            raise EngineError(f"llama.cpp could not load {path}: {last_log_error() or 'unknown error'}")
        self.notices: list[str] = []
        if config.load == "locked" and locked_bytes() < path.stat().st_size // 2 and swap_enabled():
            self.notices.append(f"{path.name} could not be locked in RAM (mlock refused): it is held in memory, "
                                "but with swap on the system may page it out")
        self.vocab = LlamaCppVocab(C.llama_model_get_vocab(self._model))
        self.n_ctx_train: int = C.llama_model_n_ctx_train(self._model)
        self._epoch = 0  # passes so far: a Logits handle is valid only within its own
        self._ids = slot_ids(config.max_tree_nodes, config.sequences)
        self._shared: LlamaCppContext | None = None  # the context a batch's caches share (config.sequences > 1)

    @property
    def on_cpu(self) -> bool:
        if self.config.rpc:  # workers on this machine compute on its cores
            return all(parse_endpoint(e, "--rpc").loopback for e in self.config.rpc)
        return _gpu_layers(self.config.n_gpu_layers) == 0 or not has_gpu()

    def settings_key(self) -> str:
        threads = self.config.n_threads or os.cpu_count()
        return (f"llama-cpp-python {C.__version__}, threads {threads}, gpu layers {self.config.n_gpu_layers}, "
                f"gpu {has_gpu()}, cpu {cpu_identity()}" + (f", rpc {','.join(self.config.rpc)}" if self.config.rpc else ""))

    # --- caches and decoding -------------------------------------------------------

    def new_cache(self, n_ctx: int) -> LlamaCppCache:
        """A slot of the shared context where the engine serves a batch (made for `sequences`
        caches of this size when the first is asked for, or remade larger while it holds none),
        else a context of its own."""
        self.settle()
        if not self._model:
            raise RuntimeError("new_cache after close()")
        context, seq0 = None, None
        if self.config.sequences > 1:
            shared = self._shared
            if shared is not None and shared.empty and shared.cells < n_ctx * self.config.sequences:
                shared.close()  # too small for this batch's caches, and holding none
                shared = self._shared = None
            if shared is None:
                shared = self._shared = self._context(n_ctx * self.config.sequences, self.config.sequences)
            if (seq0 := shared.take(n_ctx)) is not None:
                context = shared
        if context is None or seq0 is None:
            context, seq0 = self._context(n_ctx, 1), 0
            n_ctx = context.cells  # all of it: llama.cpp may round a context up, or make room for a tree
            context.take(n_ctx)
        cache = LlamaCppCache(n_ctx, context, seq0)

        def free() -> None:
            context.give_back(seq0, n_ctx)
            if context is not self._shared:
                context.close()

        return self._made(cache, free)  # type: ignore[return-value]

    def _context(self, cells: int, slots: int) -> LlamaCppContext:
        params = C.llama_context_default_params()
        n_seq = slots * self._ids
        # llama.cpp reserves outputs for n_seq_max tokens per batch, clamps the batch to the
        # context, and aborts (GGML_ASSERT) when a batch outgrows either: so even a small
        # context gets a batch, and room, for every slot's whole tree.
        batch = max(min(self.config.n_batch, cells), n_seq)
        params.n_ctx = max(cells, batch)
        params.n_batch = params.n_ubatch = batch
        params.n_outputs_max = n_seq  # logits for every node of every tree (a row is n_vocab floats)
        params.n_seq_max = n_seq
        threads = self.config.n_threads or os.cpu_count() or 1
        params.n_threads = params.n_threads_batch = threads
        params.kv_unified = n_seq > 1
        params.no_perf = True
        ctx = C.llama_init_from_model(self._model, params)
        if not ctx:
            raise EngineError(
                f"llama.cpp could not create a {cells}-token context: {last_log_error() or 'out of memory?'}",
                hint="try a smaller --ctx",
            )
        return LlamaCppContext(ctx, C.llama_batch_init(params.n_batch, 0, self._ids), min(C.llama_n_batch(ctx), batch),
                        C.llama_n_ctx(ctx), slots, self._ids)

    @property
    def max_tree_nodes(self) -> int:
        """Sequence ids bound a tree (its nodes go in one llama_decode, and every cache's batch
        has room for them)."""
        return self._ids - 1

    def _ready(self, cache: Cache, call: str) -> LlamaCppCache:
        self.settle()
        self._own(cache)
        assert isinstance(cache, LlamaCppCache) and cache.ctx is not None, call
        return cache

    def _decode(self, context: LlamaCppContext, n_tokens: int, what: str) -> None:
        assert context.batch is not None
        context.batch.n_tokens = n_tokens
        self._epoch += 1
        rc = C.llama_decode(context.ctx, context.batch)
        if rc != 0:
            raise EngineError(f"llama_decode of {what} failed ({rc}): {last_log_error()}")

    def eval(self, cache: Cache, tokens: Sequence[int]) -> ContextLogits:
        c = self._ready(cache, "eval")
        if not tokens:
            raise ValueError("eval of no tokens")
        self._drop_tree(c)
        if c.kv_len + len(tokens) > c.n_ctx:
            raise UsageError(f"context full ({c.n_ctx} tokens)", hint="raise --ctx")
        batch, step = c.context.batch, c.n_batch
        assert batch is not None
        for start in range(0, len(tokens), step):
            chunk = tokens[start:start + step]
            for i, tok in enumerate(chunk):
                batch.token[i] = tok
                batch.pos[i] = c.kv_len + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = c.seq0
                batch.logits[i] = False
            batch.logits[len(chunk) - 1] = start + len(chunk) == len(tokens)
            self._decode(c.context, len(chunk), f"{len(chunk)} tokens")
            c.appended(chunk)
        return ContextLogits(self, C.llama_get_logits_ith(c.ctx, -1), 1)

    def rewind(self, cache: Cache, n_tokens: int) -> None:
        c = self._ready(cache, "rewind")
        self._drop_tree(c)
        if n_tokens >= c.kv_len:
            return
        mem = C.llama_get_memory(c.ctx)
        if not C.llama_memory_seq_rm(mem, c.seq0, n_tokens, -1):
            raise EngineError("llama.cpp could not trim the KV cache")
        c.cut(n_tokens)

    def sync_many(self, requests: Sequence[tuple[Cache, Sequence[int]]]) -> list[ContextLogits]:
        """Caches sharing a context take their missing prompt tokens in shared decodes of the
        context's batch (each prompt's last token in the final one); a cache with a context of
        its own, in turn. Each context keeps its own logits, so every result stays valid until
        the next call."""
        check_requests(requests)
        caches = [self._ready(cache, "sync_many") for cache, _ in requests]
        rest = [self._missing(c, tokens) for c, (_, tokens) in zip(caches, requests)]
        out: list[ContextLogits | None] = [None] * len(requests)
        for ks in _by_context(caches):
            context = caches[ks[0]].context
            batch = context.batch
            assert batch is not None
            passes = prefill_passes([len(rest[k]) for k in ks], context.n_batch)
            for p in passes:
                b = 0
                for j, start, stop in p:
                    c = caches[ks[j]]
                    for t, tok in enumerate(rest[ks[j]][start:stop]):
                        batch.token[b], batch.pos[b], batch.n_seq_id[b] = tok, c.kv_len + t, 1
                        batch.seq_id[b][0] = c.seq0
                        batch.logits[b] = p is passes[-1] and start + t == len(rest[ks[j]]) - 1
                        b += 1
                self._decode(context, b, f"{len(p)} prompts' {b} tokens")
                for j, start, stop in p:
                    caches[ks[j]].appended(rest[ks[j]][start:stop])
            first = C.llama_get_logits(context.ctx)  # the final decode's rows: one per request, in order
            for r, k in enumerate(ks):
                out[k] = ContextLogits(self, first, 1, r)
        return self._valid_until_next_call(out)

    # --- trees: one llama_decode for a whole draft tree, or for several caches' trees ----

    def eval_tree(self, cache: Cache, tokens: Sequence[int], parents: Sequence[int], depths: Sequence[int],
                  start: int = 0) -> ContextLogits:
        """Node i gets sequence id seq0 + i + 1 and its cell is tagged with the ids of i and all
        its descendants. A query attends to the cells carrying its first id at positions <= its
        own: the prefix and its ancestors. Nodes before `start` were evaluated by earlier
        calls since the last commit (a tree grown step by step, as a drafter does); each new
        node's sequence starts as a copy of its nearest evaluated ancestor's (or the prefix)."""
        c = self._ready(cache, "eval_tree")
        n = self._put_tree(c, TreeRequest(c, tokens, parents, depths, start), 0)
        self._decode(c.context, n, f"a {n}-node tree")
        c.evaluated_tree(tokens, parents)
        return ContextLogits(self, C.llama_get_logits(c.ctx), n)

    def eval_trees(self, requests: Sequence[TreeRequest]) -> list[ContextLogits]:
        """One llama_decode per context: the caches of a batch share one (`sequences`), so their
        trees go in one decode, each under its own sequence ids; a cache with a context of its
        own is decoded in turn. Each context keeps its own logits, so every result stays valid
        until the next call."""
        check_requests(requests)
        caches = [self._ready(r.cache, "eval_trees") for r in requests]
        out: list[ContextLogits | None] = [None] * len(requests)
        for ks in _by_context(caches):
            context, rows, spans = caches[ks[0]].context, 0, []
            for k in ks:
                n = self._put_tree(caches[k], requests[k], rows)
                spans.append((k, rows, n))
                rows += n
            self._decode(context, rows, f"{len(ks)} trees of {rows} nodes")
            base = C.llama_get_logits(context.ctx)
            for k, first, n in spans:
                caches[k].evaluated_tree(requests[k].tokens, requests[k].parents)
                out[k] = ContextLogits(self, base, n, first)
        return self._valid_until_next_call(out)

    def _valid_until_next_call(self, out: list[ContextLogits | None]) -> list[ContextLogits]:
        """Results of decodes in several contexts: each context keeps its own logits, so another
        context's decode leaves a result's rows as they were."""
        for logits in out:
            assert logits is not None
            logits._epoch = self._epoch
        return out  # type: ignore[return-value]

    def _put_tree(self, c: LlamaCppCache, r: TreeRequest, row: int) -> int:
        """Check a tree against the cache's limits, give each new node's sequence the cells of
        its nearest evaluated ancestor, and write the new nodes into the context's batch from
        `row`: how many rows they take."""
        tokens, parents, depths, start = r.tokens, r.parents, r.depths, r.start
        n = len(tokens)
        if n > self._ids - 1 or row + n - start > c.n_batch:
            raise ValueError(f"a tree of {n} nodes ({n - start} new) exceeds this engine's limits "
                             f"({self._ids - 1} nodes, {c.n_batch - row} more in this call)")
        if start != len(c.tree):
            raise ValueError(f"{len(c.tree)} nodes are evaluated; cannot continue from {start}")
        if c.kv_len + n > c.n_ctx:  # every node takes a cell of the cache
            raise UsageError(f"context full ({c.n_ctx} tokens)", hint="raise --ctx")
        mem, s0 = C.llama_get_memory(c.ctx), c.seq0
        for i in range(start, n):
            source = parents[i]
            while source >= start:  # nearest ancestor from an earlier call, or the prefix
                source = parents[source]
            C.llama_memory_seq_rm(mem, s0 + i + 1, -1, -1)
            C.llama_memory_seq_cp(mem, s0 + source + 1, s0 + i + 1, -1, -1)
        seq_ids = tree_seq_ids(parents)
        batch, base = c.context.batch, c.kv_len
        assert batch is not None
        for b, i in enumerate(range(start, n), row):
            batch.token[b] = tokens[i]
            batch.pos[b] = base + depths[i]
            ids = [s for s in seq_ids[i] if s > start]  # this node and its descendants in this call
            batch.n_seq_id[b] = len(ids)
            for k, s in enumerate(ids):
                batch.seq_id[b][k] = s0 + s
            batch.logits[b] = True
        return n - start

    def commit_path(self, cache: Cache, path: Sequence[int], keep: Sequence[int] = ()) -> None:
        c = self._ready(cache, "commit_path")
        check_keep(c.tree_parents, path, keep)
        mem, s0 = C.llama_get_memory(c.ctx), c.seq0
        if path:
            C.llama_memory_seq_cp(mem, s0 + path[-1] + 1, s0, c.kv_len, -1)  # the path's cells join the cache's
        kept = set(keep)
        for s in range(1, len(c.tree) + 1):
            if s - 1 not in kept:
                C.llama_memory_seq_rm(mem, s0 + s, -1, -1)
        # A kept node's sequence (the cells it sees: the prefix, the path, its kept ancestors)
        # moves to its new index's id. In increasing order every target id is free by then:
        # it belonged to a dropped node or to a kept one already moved down.
        for new, old in enumerate(keep):
            if new != old:
                C.llama_memory_seq_cp(mem, s0 + old + 1, s0 + new + 1, -1, -1)
                C.llama_memory_seq_rm(mem, s0 + old + 1, -1, -1)
        c.committed(path, keep)

    def _drop_tree(self, cache: LlamaCppCache) -> None:
        """A tree left uncommitted (a step stopped by Ctrl-C or an error) leaves the cache as it was."""
        if cache.tree:
            self.commit_path(cache, [])

    # --- lifetime -----------------------------------------------------------------

    def close(self) -> None:
        self.close_worker()
        self._epoch += 1  # logits handles into freed contexts go stale
        self.close_caches()
        if self._shared is not None:
            self._shared.close()
            self._shared = None
        if self._model:
            C.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> "LlamaCppEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _by_context(caches: Sequence[LlamaCppCache]) -> list[list[int]]:
    """The indices of `caches`, grouped by the context they are in (one decode a group)."""
    groups: dict[int, list[int]] = {}
    for k, c in enumerate(caches):
        groups.setdefault(id(c.context), []).append(k)
    return list(groups.values())


def slot_ids(max_tree_nodes: int, sequences: int) -> int:
    """Sequence ids per cache: its own and one per tree node. The sequences of a batch share one
    context, and so llama.cpp's MAX_SEQ ids, so each one's tree is smaller."""
    return min(max_tree_nodes, MAX_SEQ // sequences - 1) + 1


def tree_seq_ids(parents: Sequence[int]) -> list[list[int]]:
    """Sequence ids for node j's cell, its own id (j + 1) first, then those of its
    descendants: exactly the nodes whose queries may attend to j. Children come after their
    parents, so one backward sweep hands each node's set up to its parent."""
    below: list[list[int]] = [[] for _ in parents]  # descendants' ids, per node
    for j in range(len(parents) - 1, -1, -1):
        p = parents[j]
        if p >= 0:
            below[p] += [j + 1] + below[j]
    return [[j + 1] + sorted(below[j]) for j in range(len(parents))]


def _gpu_layers(requested: int | None) -> int:
    """-1 (or None where llama.cpp sees a GPU) offloads every layer; with no GPU the value is moot."""
    if requested is None:
        return -1 if has_gpu() else 0
    return requested
