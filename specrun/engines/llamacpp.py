"""The llama.cpp engine, on llama-cpp-python's C API (ctypes).

The C API rather than the `Llama` class because speculative decoding needs what
that class hides: batches with per-token sequence ids and positions, logits for
chosen rows, and KV cache surgery (`llama_memory_seq_*`). The engine holds the
model and its vocabulary; each cache is a llama.cpp context of its own on that
model (its KV cells, batch and logits), so one loaded model serves any number
of sequences.
"""

from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import llama_cpp as C
import numpy as np

from specrun.engines.base import Cache, EngineMixin, TreeRequest, check_keep, check_requests
from specrun.engines.ggml_devices import has_gpu
from specrun.engines.top_k import top_ids_of, top_k_of
from specrun.engines.host_cpu import cpu_identity
from specrun.errors import EngineError, UsageError
from specrun.memory_limit import locked_bytes, swap_enabled

MAX_SEQ = 256  # llama.cpp's LLAMA_MAX_SEQ: a tree node needs a sequence id of its own, so trees hold <= 255
LOAD_MODES = {"mmap": C.LLAMA_LOAD_MODE_MMAP, "resident": C.LLAMA_LOAD_MODE_NONE, "locked": C.LLAMA_LOAD_MODE_MLOCK}

_log_lock = threading.Lock()
_recent_log: list[str] = []


@C.llama_log_callback
def _log_to_buffer(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """llama.cpp writes a lot to stderr; keep the last lines for error messages instead."""
    with _log_lock:
        _recent_log.append(text.decode("utf-8", "replace"))
        del _recent_log[:-50]


_backend_ready = False


def init_backend() -> None:
    global _backend_ready
    if not _backend_ready:
        C.llama_log_set(_log_to_buffer, ctypes.c_void_p(0))
        C.llama_backend_init()
        _backend_ready = True


def _last_log_error() -> str:
    with _log_lock:
        lines = "".join(_recent_log).strip().splitlines()
    errors = [ln for ln in lines if "error" in ln.lower() or "failed" in ln.lower()]
    return (errors or lines or [""])[-1].strip()


@dataclass(frozen=True)
class LlamaCppConfig:
    """How llama.cpp runs one model. `None` means: decide from the model and the machine."""

    n_threads: int | None = None  # None: every core
    n_gpu_layers: int | None = None  # None: all layers if the build can offload, else 0; -1: all
    n_batch: int = 512  # tokens per llama_decode while prefilling
    max_tree_nodes: int = 0  # nodes per eval_tree call (0: no trees); each needs a KV sequence id
    load: str = "mmap"  # "mmap": the page cache holds the file (shared, evictable); "resident": read into
    # anonymous memory, which other reads cannot evict; "locked": that, and mlock'd (Placement.load)
    repack: bool = True  # llama.cpp's repacked copies for its CPU kernels (anonymous memory): off when
    # the file is paged from disk because it does not fit, where such copies would not fit either


class LlamaCppVocab:
    """The vocabulary of a loaded llama.cpp model."""

    def __init__(self, vocab: ctypes.c_void_p) -> None:
        self._vocab = vocab
        self.n_vocab: int = C.llama_vocab_n_tokens(vocab)
        self._pieces: dict[int, bytes] = {}

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8", "replace")  # lone surrogates (undecodable input bytes) become '?'
        cap = len(data) + 8
        for _ in range(2):
            buf = (C.llama_token * cap)()
            n = C.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, parse_special)
            if n >= 0:
                return list(buf[:n])
            cap = -n
        raise EngineError("tokenization failed")

    def piece(self, token: int) -> bytes:
        cached = self._pieces.get(token)
        if cached is None:
            buf = ctypes.create_string_buffer(64)
            n = C.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = C.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            cached = self._pieces[token] = buf.raw[:n]
        return cached

    def is_eog(self, token: int) -> bool:
        return bool(C.llama_vocab_is_eog(self._vocab, token))

    def vocab_type(self) -> int:
        return int(C.llama_vocab_type(self._vocab))

    def special_tokens(self) -> tuple[int, int]:
        return int(C.llama_vocab_bos(self._vocab)), int(C.llama_vocab_eos(self._vocab))

    def token_text(self, token: int) -> bytes:
        return C.llama_vocab_get_text(self._vocab, token) or b""


class _Logits:
    """Rows of llama.cpp's own logits buffer, read in place; stale after the engine's next pass."""

    def __init__(self, engine: "LlamaCppEngine", ptr: ctypes._Pointer, n: int) -> None:
        self._engine, self._epoch = engine, engine._epoch
        self._rows = np.ctypeslib.as_array(ptr, shape=(n, engine.vocab.n_vocab))  # [n, n_vocab] float32, a view

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


class LlamaCppCache(Cache):
    """A llama.cpp context on the engine's model: sequence 0 holds the committed tokens, and
    sequences 1.. a draft tree's nodes (`eval_tree`)."""

    def __init__(self, n_ctx: int, ctx: ctypes.c_void_p, batch: C.llama_batch, n_batch: int) -> None:
        super().__init__(n_ctx)
        self.ctx: ctypes.c_void_p | None = ctx
        self.batch: C.llama_batch | None = batch
        self.n_batch = n_batch  # tokens per llama_decode

    def free(self) -> None:
        if self.batch is not None:
            C.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx is not None:
            C.llama_free(self.ctx)
            self.ctx = None


class LlamaCppEngine(EngineMixin):
    def __init__(self, path: Path, config: LlamaCppConfig = LlamaCppConfig()) -> None:
        if not 0 <= config.max_tree_nodes < MAX_SEQ:
            raise UsageError(f"llama.cpp verifies trees of at most {MAX_SEQ - 1} nodes, not {config.max_tree_nodes}",
                             hint=f"use --budget {MAX_SEQ - 1} or less")
        init_backend()
        self.config, self.path = config, path
        params = C.llama_model_default_params()
        params.n_gpu_layers = _gpu_layers(config.n_gpu_layers)
        params.load_mode = LOAD_MODES[config.load]
        params.use_extra_bufts = config.repack
        self._model = C.llama_model_load_from_file(str(path).encode(), params)
        if not self._model:
            raise EngineError(f"llama.cpp could not load {path}: {_last_log_error() or 'unknown error'}")
        self.notices: list[str] = []
        if config.load == "locked" and locked_bytes() < path.stat().st_size // 2 and swap_enabled():
            self.notices.append(f"{path.name} could not be locked in RAM (mlock refused): it is held in memory, "
                                "but with swap on the system may page it out")
        self.vocab = LlamaCppVocab(C.llama_model_get_vocab(self._model))
        self.n_ctx_train: int = C.llama_model_n_ctx_train(self._model)
        self._epoch = 0  # passes so far: a Logits handle is valid only within its own
        self._n_seq = config.max_tree_nodes + 1 if config.max_tree_nodes else 1  # sequence 0 is the cache

    @property
    def on_cpu(self) -> bool:
        return _gpu_layers(self.config.n_gpu_layers) == 0 or not has_gpu()

    def settings_key(self) -> str:
        threads = self.config.n_threads or os.cpu_count()
        return (f"llama-cpp-python {C.__version__}, threads {threads}, gpu layers {self.config.n_gpu_layers}, "
                f"gpu {has_gpu()}, cpu {cpu_identity()}")

    # --- caches and decoding -------------------------------------------------------

    def new_cache(self, n_ctx: int) -> LlamaCppCache:
        self.settle()
        if not self._model:
            raise RuntimeError("new_cache after close()")
        params = C.llama_context_default_params()
        n_seq = self._n_seq
        # llama.cpp reserves outputs for n_seq_max tokens per batch, clamps the batch to the
        # context, and aborts (GGML_ASSERT) when a batch outgrows either: so even a small
        # context gets a batch, and room, for a whole tree.
        batch = max(min(self.config.n_batch, n_ctx), n_seq)
        params.n_ctx = max(n_ctx, batch)
        params.n_batch = params.n_ubatch = batch
        params.n_outputs_max = n_seq  # logits for every node of a tree (a row is n_vocab floats)
        params.n_seq_max = n_seq
        threads = self.config.n_threads or os.cpu_count() or 1
        params.n_threads = params.n_threads_batch = threads
        params.kv_unified = n_seq > 1
        params.no_perf = True
        ctx = C.llama_init_from_model(self._model, params)
        if not ctx:
            raise EngineError(
                f"llama.cpp could not create a {n_ctx}-token context: {_last_log_error() or 'out of memory?'}",
                hint="try a smaller --ctx",
            )
        cache = LlamaCppCache(C.llama_n_ctx(ctx), ctx, C.llama_batch_init(params.n_batch, 0, n_seq),
                              min(C.llama_n_batch(ctx), batch))
        return self._made(cache, cache.free)  # type: ignore[return-value]

    @property
    def max_tree_nodes(self) -> int:
        """Sequence ids bound a tree (its nodes go in one llama_decode, and every cache's batch
        has room for them)."""
        return self._n_seq - 1

    def _ready(self, cache: Cache, call: str) -> LlamaCppCache:
        self.settle()
        self._own(cache)
        assert isinstance(cache, LlamaCppCache) and cache.ctx is not None, call
        return cache

    def _decode(self, cache: LlamaCppCache, n_tokens: int, what: str) -> None:
        assert cache.batch is not None
        cache.batch.n_tokens = n_tokens
        self._epoch += 1
        rc = C.llama_decode(cache.ctx, cache.batch)
        if rc != 0:
            raise EngineError(f"llama_decode of {what} failed ({rc}): {_last_log_error()}")

    def eval(self, cache: Cache, tokens: Sequence[int]) -> _Logits:
        c = self._ready(cache, "eval")
        if not tokens:
            raise ValueError("eval of no tokens")
        self._drop_tree(c)
        if c.kv_len + len(tokens) > c.n_ctx:
            raise UsageError(f"context full ({c.n_ctx} tokens)", hint="raise --ctx")
        batch, step = c.batch, c.n_batch
        assert batch is not None
        for start in range(0, len(tokens), step):
            chunk = tokens[start:start + step]
            for i, tok in enumerate(chunk):
                batch.token[i] = tok
                batch.pos[i] = c.kv_len + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = False
            batch.logits[len(chunk) - 1] = start + len(chunk) == len(tokens)
            self._decode(c, len(chunk), f"{len(chunk)} tokens")
            c.appended(chunk)
        return _Logits(self, C.llama_get_logits_ith(c.ctx, -1), 1)

    def rewind(self, cache: Cache, n_tokens: int) -> None:
        c = self._ready(cache, "rewind")
        self._drop_tree(c)
        if n_tokens >= c.kv_len:
            return
        mem = C.llama_get_memory(c.ctx)
        if not C.llama_memory_seq_rm(mem, 0, n_tokens, -1):
            raise EngineError("llama.cpp could not trim the KV cache")
        c.cut(n_tokens)

    # --- trees: one llama_decode for a whole draft tree -----------------------

    def eval_tree(self, cache: Cache, tokens: Sequence[int], parents: Sequence[int], depths: Sequence[int],
                  start: int = 0) -> _Logits:
        """Node i gets sequence id i + 1 and its cell is tagged with the ids of i and all its
        descendants. A query attends to the cells carrying its first id at positions <= its
        own: the prefix and its ancestors. Nodes before `start` were evaluated by earlier
        calls since the last commit (a tree grown step by step, as a drafter does); each new
        node's sequence starts as a copy of its nearest evaluated ancestor's (or the prefix)."""
        c = self._ready(cache, "eval_tree")
        n = len(tokens)
        if n > self._n_seq - 1 or n - start > c.n_batch:
            raise ValueError(f"a tree of {n} nodes ({n - start} new) exceeds this engine's limits "
                             f"({self._n_seq - 1} nodes, {c.n_batch} per call)")
        if start != len(c.tree):
            raise ValueError(f"{len(c.tree)} nodes are evaluated; cannot continue from {start}")
        if c.kv_len + n > c.n_ctx:  # every node takes a cell of the cache
            raise UsageError(f"context full ({c.n_ctx} tokens)", hint="raise --ctx")
        mem = C.llama_get_memory(c.ctx)
        for i in range(start, n):
            source = parents[i]
            while source >= start:  # nearest ancestor from an earlier call, or the prefix
                source = parents[source]
            C.llama_memory_seq_rm(mem, i + 1, -1, -1)
            C.llama_memory_seq_cp(mem, source + 1, i + 1, -1, -1)
        seq_ids = tree_seq_ids(parents)
        batch, base = c.batch, c.kv_len
        assert batch is not None
        for b, i in enumerate(range(start, n)):
            batch.token[b] = tokens[i]
            batch.pos[b] = base + depths[i]
            ids = [s for s in seq_ids[i] if s > start]  # this node and its descendants in this call
            batch.n_seq_id[b] = len(ids)
            for k, s in enumerate(ids):
                batch.seq_id[b][k] = s
            batch.logits[b] = True
        self._decode(c, n - start, f"a {n - start}-node tree")
        c.evaluated_tree(tokens, parents)
        return _Logits(self, C.llama_get_logits(c.ctx), n - start)

    def eval_trees(self, requests: Sequence[TreeRequest]) -> list[_Logits]:
        """One llama_decode per cache, in turn: each cache is a context of its own, so their
        nodes cannot share a decode (that needs the caches as sequence ids of one context).
        Each context keeps its own logits, so every result stays valid until the next call."""
        check_requests(requests)
        for r in requests:
            self._ready(r.cache, "eval_trees")
        out = [self.eval_tree(r.cache, r.tokens, r.parents, r.depths, r.start) for r in requests]
        for logits in out:
            logits._epoch = self._epoch  # another context's decode leaves this one's rows as they were
        return out

    def commit_path(self, cache: Cache, path: Sequence[int], keep: Sequence[int] = ()) -> None:
        c = self._ready(cache, "commit_path")
        check_keep(c.tree_parents, path, keep)
        mem = C.llama_get_memory(c.ctx)
        if path:
            C.llama_memory_seq_cp(mem, path[-1] + 1, 0, c.kv_len, -1)  # the path's cells join seq 0
        kept = set(keep)
        for s in range(1, len(c.tree) + 1):
            if s - 1 not in kept:
                C.llama_memory_seq_rm(mem, s, -1, -1)
        # A kept node's sequence (the cells it sees: the prefix, the path, its kept ancestors)
        # moves to its new index's id. In increasing order every target id is free by then:
        # it belonged to a dropped node or to a kept one already moved down.
        for new, old in enumerate(keep):
            if new != old:
                C.llama_memory_seq_cp(mem, old + 1, new + 1, -1, -1)
                C.llama_memory_seq_rm(mem, old + 1, -1, -1)
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
        if self._model:
            C.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> "LlamaCppEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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



class VocabOnly:
    """A GGUF file's vocabulary through llama.cpp without its weights (`vocab_only`): another
    engine running the same file tokenizes exactly as the llama.cpp engine does."""

    def __init__(self, path: Path) -> None:
        init_backend()
        params = C.llama_model_default_params()
        params.vocab_only = True
        params.n_gpu_layers = 0
        self._model = C.llama_model_load_from_file(str(path).encode(), params)
        if not self._model:
            raise EngineError(f"llama.cpp could not read the vocabulary of {path}: {_last_log_error() or 'unknown error'}")
        self.vocab = LlamaCppVocab(C.llama_model_get_vocab(self._model))

    def close(self) -> None:
        if self._model:
            C.llama_model_free(self._model)
            self._model = None
