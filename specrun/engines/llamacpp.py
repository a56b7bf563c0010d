"""The llama.cpp engine, on llama-cpp-python's C API (ctypes).

The C API rather than the `Llama` class because speculative decoding needs what
that class hides: batches with per-token sequence ids and positions, logits for
chosen rows, and KV cache surgery (`llama_memory_seq_*`). State lives in this
object only: model, vocabulary, context, batch, and the cache length.
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path
from typing import Sequence

import llama_cpp as C
import numpy as np

from specrun.engines.base import EngineConfig, ancestor_mask
from specrun.errors import EngineError, UsageError

DEFAULT_CTX = 4096

_log_lock = threading.Lock()
_recent_log: list[str] = []


@C.llama_log_callback
def _log_to_buffer(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """llama.cpp writes a lot to stderr; keep the last lines for error messages instead."""
    with _log_lock:
        _recent_log.append(text.decode("utf-8", "replace"))
        del _recent_log[:-50]


_backend_ready = False


def _init_backend() -> None:
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


class LlamaCppEngine:
    def __init__(self, path: Path, config: EngineConfig = EngineConfig()) -> None:
        _init_backend()
        self.config = config
        self.path = path
        params = C.llama_model_default_params()
        params.n_gpu_layers = _gpu_layers(config.n_gpu_layers)
        self._model = C.llama_model_load_from_file(str(path).encode(), params)
        if not self._model:
            raise EngineError(f"llama.cpp could not load {path}: {_last_log_error() or 'unknown error'}")
        self._vocab = C.llama_model_get_vocab(self._model)
        self.n_vocab: int = C.llama_vocab_n_tokens(self._vocab)
        self.n_ctx_train: int = C.llama_model_n_ctx_train(self._model)
        self._ctx: ctypes.c_void_p | None = None
        self._batch: C.llama_batch | None = None
        self._n_ctx = 0
        self._kv_len = 0
        self._tree_size = 0  # nodes of the last eval_tree, until commit_path
        self._pieces: dict[int, bytes] = {}

    def settings_key(self) -> str:
        """What a measured cost depends on besides the model: the build and how it runs."""
        threads = self.config.n_threads or os.cpu_count()
        return (f"llama-cpp-python {C.__version__}, threads {threads}, gpu layers {self.config.n_gpu_layers}, "
                f"gpu {bool(C.llama_supports_gpu_offload())}")

    # --- vocabulary ------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        for _ in range(2):
            buf = (C.llama_token * cap)()
            n = C.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, True)
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
        """(BOS, EOS) ids; -1 where the vocabulary has none."""
        return int(C.llama_vocab_bos(self._vocab)), int(C.llama_vocab_eos(self._vocab))

    def token_text(self, token: int) -> bytes:
        return C.llama_vocab_get_text(self._vocab, token) or b""

    # --- context and decoding --------------------------------------------------

    def open(self, n_ctx: int) -> None:
        self._free_context()
        params = C.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = min(self.config.n_batch, n_ctx)
        params.n_seq_max = self.config.n_seq_max
        threads = self.config.n_threads or os.cpu_count() or 1
        params.n_threads = params.n_threads_batch = threads
        params.kv_unified = self.config.n_seq_max > 1
        params.no_perf = True
        self._ctx = C.llama_init_from_model(self._model, params)
        if not self._ctx:
            raise EngineError(
                f"llama.cpp could not create a {n_ctx}-token context: {_last_log_error() or 'out of memory?'}",
                hint="try a smaller --ctx",
            )
        self._n_ctx = C.llama_n_ctx(self._ctx)
        self._batch = C.llama_batch_init(params.n_batch, 0, self.config.n_seq_max)
        self._kv_len = 0

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    @property
    def kv_len(self) -> int:
        return self._kv_len

    def eval(self, tokens: Sequence[int]) -> np.ndarray:
        if self._ctx is None or self._batch is None:
            raise RuntimeError("eval before open()")
        if not tokens:
            raise ValueError("eval of no tokens")
        if self._kv_len + len(tokens) > self._n_ctx:
            raise UsageError(f"context full ({self._n_ctx} tokens)", hint="raise --ctx")
        batch, step = self._batch, self.config.n_batch
        for start in range(0, len(tokens), step):
            chunk = tokens[start:start + step]
            batch.n_tokens = len(chunk)
            for i, tok in enumerate(chunk):
                batch.token[i] = tok
                batch.pos[i] = self._kv_len + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = False
            batch.logits[len(chunk) - 1] = start + len(chunk) == len(tokens)
            rc = C.llama_decode(self._ctx, batch)
            if rc != 0:
                raise EngineError(f"llama_decode failed ({rc}): {_last_log_error()}")
            self._kv_len += len(chunk)
        ptr = C.llama_get_logits_ith(self._ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()  # [n_vocab] float32

    def rewind(self, n_tokens: int) -> None:
        if self._ctx is None or n_tokens >= self._kv_len:
            return
        mem = C.llama_get_memory(self._ctx)
        if not C.llama_memory_seq_rm(mem, 0, n_tokens, -1):
            raise EngineError("llama.cpp could not trim the KV cache")
        self._kv_len = n_tokens

    # --- trees: one llama_decode for a whole draft tree -----------------------

    def eval_tree(self, tokens: Sequence[int], parents: Sequence[int], depths: Sequence[int],
                  start: int = 0) -> np.ndarray:
        """Node i gets sequence id i + 1 and its cell is tagged with the ids of i and all its
        descendants. A query attends to the cells carrying its first id at positions <= its
        own: the prefix and its ancestors. Nodes before `start` were evaluated by earlier
        calls since the last commit (a tree grown step by step, as a drafter does); each new
        node's sequence starts as a copy of its nearest evaluated ancestor's (or the prefix)."""
        if self._ctx is None or self._batch is None:
            raise RuntimeError("eval_tree before open()")
        n = len(tokens)
        if n + 1 > self.config.n_seq_max or n - start > self.config.n_batch:
            raise ValueError(f"a tree of {n} nodes needs n_seq_max > {n} and n_batch >= {n - start}")
        if start != self._tree_size:
            raise ValueError(f"{self._tree_size} nodes are evaluated; cannot continue from {start}")
        if self._kv_len + max(depths) + 1 > self._n_ctx:
            raise UsageError(f"context full ({self._n_ctx} tokens)", hint="raise --ctx")
        mem = C.llama_get_memory(self._ctx)
        for i in range(start, n):
            source = parents[i]
            while source >= start:  # nearest ancestor from an earlier call, or the prefix
                source = parents[source]
            C.llama_memory_seq_rm(mem, i + 1, -1, -1)
            C.llama_memory_seq_cp(mem, source + 1, i + 1, -1, -1)
        seq_ids = tree_seq_ids(parents)
        batch, base = self._batch, self._kv_len
        batch.n_tokens = n - start
        for b, i in enumerate(range(start, n)):
            batch.token[b] = tokens[i]
            batch.pos[b] = base + depths[i]
            ids = [s for s in seq_ids[i] if s > start]  # this node and its descendants in this call
            batch.n_seq_id[b] = len(ids)
            for k, s in enumerate(ids):
                batch.seq_id[b][k] = s
            batch.logits[b] = True
        rc = C.llama_decode(self._ctx, batch)
        if rc != 0:
            raise EngineError(f"llama_decode of a {n - start}-node tree failed ({rc}): {_last_log_error()}")
        self._tree_size = n
        ptr = C.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(ptr, shape=(n - start, self.n_vocab)).copy()  # [n - start, n_vocab]

    def commit_path(self, path: Sequence[int]) -> None:
        mem = C.llama_get_memory(self._ctx)
        if path:
            C.llama_memory_seq_cp(mem, path[-1] + 1, 0, self._kv_len, -1)  # the path's cells join seq 0
        for s in range(1, self._tree_size + 1):
            C.llama_memory_seq_rm(mem, s, -1, -1)
        self._kv_len += len(path)
        self._tree_size = 0

    # --- lifetime -----------------------------------------------------------------

    def _free_context(self) -> None:
        if self._batch is not None:
            C.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            C.llama_free(self._ctx)
            self._ctx = None

    def close(self) -> None:
        self._free_context()
        if self._model:
            C.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> "LlamaCppEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def tree_seq_ids(parents: Sequence[int]) -> list[list[int]]:
    """Sequence ids for node j's cell, its own id (j + 1) first, then those of its
    descendants: exactly the nodes whose queries may attend to j (see ancestor_mask)."""
    mask = ancestor_mask(parents)  # mask[i, j]: j is an ancestor-or-self of i
    return [[j + 1] + [int(i) + 1 for i in np.flatnonzero(mask[:, j]) if i != j] for j in range(len(parents))]


def _gpu_layers(requested: int | None) -> int:
    """-1 (or None on a GPU build) offloads every layer; a CPU build ignores the value."""
    if requested is None:
        return -1 if C.llama_supports_gpu_offload() else 0
    return requested


def default_ctx(n_ctx_train: int, needed: int) -> int:
    """A KV cache big enough for `needed` tokens: at least DEFAULT_CTX, at most the training context."""
    ctx = max(DEFAULT_CTX, needed)
    return min(ctx, n_ctx_train) if n_ctx_train > 0 else ctx
