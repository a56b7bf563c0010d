"""The torch engine: the engine contract on `model.Transformer`, each cache a static `KVCache`.

Trees of any size the cache has room for are verified in one pass: node i
writes its keys and values to slot kv_len + i, sits at position
kv_len + depth[i], and attends to the committed slots and its ancestors'
slots (a boolean mask for SDPA). `commit_path` moves the path's rows down
to follow the committed ones. Logits stay on the device until read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from specrun.engines.base import (Cache, EngineMixin, Transfer, TreeRequest, ancestor_mask, check_keep,
                                  check_requests)
from specrun.engines.prefill import prefill_passes
from specrun.engines.top_k import top_ids_of, top_k_of
from specrun.engines.model_shape import PREFILL_CHUNK  # prompt tokens per pass: what the memory plan counts
from specrun.engines.host_cpu import cpu_identity
from specrun.engines.torch_engine.cache import KVCache
from specrun.engines.torch_engine.config import TorchConfig, resolve_device, resolve_dtype
from specrun.engines.torch_engine.loading import LoadedModel, load_model
from specrun.engines.torch_engine.model import Batch, Transformer
from specrun.errors import UsageError



class TorchLogits:
    """Rows [n, n_vocab] float32 on the engine's device; a row reaches the host only when read."""

    def __init__(self, engine: "TorchEngine", rows: torch.Tensor) -> None:
        self._engine, self._epoch, self._rows = engine, engine._epoch, rows

    def _view(self, i: int) -> torch.Tensor:
        if self._engine._epoch != self._epoch:
            raise RuntimeError("logits read after the engine's next pass")
        return self._rows[i]

    def __len__(self) -> int:
        return self._rows.shape[0]

    def row(self, i: int) -> np.ndarray:
        return self._view(i).cpu().numpy().copy()

    def argmax(self, i: int) -> int:
        return int(torch.argmax(self._view(i)))  # the first maximum: the lowest id on ties

    def top_k(self, i: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        row = self._view(i)
        if row.device.type == "cpu":
            return top_k_of(row.numpy(), k)
        k = min(k, row.numel())
        values, ids = torch.topk(row, k)
        probs = torch.exp(values.double() - torch.logsumexp(row.double(), 0))
        ids_np, probs_np = ids.cpu().numpy(), probs.cpu().numpy()
        order = np.lexsort((ids_np, -probs_np))  # likeliest first, lowest id among equals
        return ids_np[order], probs_np[order]

    def top_ids(self, i: int, k: int) -> np.ndarray:
        row = self._view(i)
        if row.device.type == "cpu":
            return top_ids_of(row.numpy(), k)
        values, ids = torch.topk(row, min(k, row.numel()))
        ids_np, values_np = ids.cpu().numpy(), values.float().cpu().numpy()
        return ids_np[np.lexsort((ids_np, -values_np))]  # likeliest first, lowest id among equals


class TorchCache(Cache):
    """The committed tokens' keys and values, and a tree's beside them, in a static KVCache."""

    def __init__(self, kv: KVCache) -> None:
        super().__init__(kv.n_ctx)
        self.kv: KVCache | None = kv

    def free(self) -> None:
        self.kv = None


class TorchEngine(EngineMixin):
    def __init__(self, path: Path, config: TorchConfig = TorchConfig()) -> None:
        self.config, self.path = config, path
        self.device_obj = resolve_device(config.device)
        self.device = str(self.device_obj)
        self.dtype = resolve_dtype(config.dtype, self.device_obj)
        if self.device_obj.type == "cpu":
            torch.set_num_threads(config.threads or os.cpu_count() or 1)
        self.loaded: LoadedModel = load_model(path, self.device_obj, self.dtype, config.quant, config.offload)
        self.args = self.loaded.args
        self.vocab = self.loaded.vocab
        self.n_ctx_train = self.args.n_ctx_train
        if config.exact and (self.device_obj.type != "cpu" or path.is_dir()):
            raise UsageError("--exact computes a GGUF model's tokens as if alone on the CPU",
                             hint="leave out --exact, or use --device cpu with a GGUF file")
        self.model = Transformer(self.args, self.loaded.weights, self.device_obj, self.loaded.source, config.exact)
        self.stream = self.loaded.stream
        self.weight_bytes = self.loaded.weights.nbytes + (self.stream.buffer_bytes if self.stream else 0)
        self.notices: list[str] = list(self.stream.notices) if self.stream else []
        self._link_bps: float | None = None
        self._epoch = 0

    @property
    def on_cpu(self) -> bool:
        return self.device_obj.type == "cpu"

    def settings_key(self) -> str:
        where = self.device
        if self.device_obj.type == "cuda":
            where += f" {torch.cuda.get_device_name(self.device_obj)}"
        threads = self.config.threads or os.cpu_count()
        return (f"torch {torch.__version__}, engine torch, device {where}, dtype {str(self.dtype)[6:]}, "
                f"threads {threads}, weights {self.loaded.storage}{', exact rows' if self.model.exact else ''}, "
                f"cpu {cpu_identity()}")

    # --- streaming -------------------------------------------------------------------

    def transfer(self) -> Transfer | None:
        if self.stream is None:
            return None
        c = self.stream.snapshot()
        return Transfer(c.passes, c.bytes_read, c.wait_s, c.busy_s, self.stream.bytes_per_pass, self._link_bps)

    def measure_link(self) -> float | None:
        """The disk's (or link's) bytes per second for this placement's stream, measured by one
        pass of reads with no compute; None for resident weights."""
        self.settle()
        measure = getattr(self.stream, "measure_throughput", None)
        if measure is not None:
            self._link_bps = measure()
        return self._link_bps

    # --- caches ------------------------------------------------------------------

    def new_cache(self, n_ctx: int) -> TorchCache:
        self.settle()
        a = self.args
        cache = TorchCache(KVCache(a.n_layer, a.n_head_kv, n_ctx, a.head_dim, kv_dtype(self.device_obj),
                                   self.device_obj))
        return self._made(cache, cache.free)  # type: ignore[return-value]

    @property
    def max_tree_nodes(self) -> int:
        """Trees are bounded by cache room only; this is the size the session asked for."""
        return self.config.max_tree_nodes

    def _ready(self, cache: Cache) -> TorchCache:
        self.settle()
        self._own(cache)
        assert isinstance(cache, TorchCache) and cache.kv is not None
        return cache

    def _forward(self, cache: TorchCache, batch: Batch) -> TorchLogits:
        assert cache.kv is not None
        self._epoch += 1
        return TorchLogits(self, self.model.forward(batch, cache.kv))

    def _tensor(self, values: Sequence[int] | np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(values, dtype=np.int64), device=self.device_obj)

    def eval(self, cache: Cache, tokens: Sequence[int]) -> TorchLogits:
        c = self._ready(cache)
        if not tokens:
            raise ValueError("eval of no tokens")
        c.tree = []  # a tree left uncommitted: its rows sit after kv_len, where this pass overwrites them
        if c.kv_len + len(tokens) > c.n_ctx:
            raise UsageError(f"context full ({c.n_ctx} tokens)", hint="raise --ctx")
        logits: TorchLogits | None = None
        for start in range(0, len(tokens), PREFILL_CHUNK):
            chunk = list(tokens[start:start + PREFILL_CHUNK])
            base, n = c.kv_len, len(chunk)
            slots = self._tensor(np.arange(base, base + n))
            mask = None
            if n > 1:  # causal: token i sees slots up to base + i
                mask = torch.arange(base + n, device=self.device_obj)[None, :] <= slots[:, None]
            last = start + n == len(tokens)
            out = self._tensor([n - 1] if last else [])
            logits = self._forward(c, Batch(self._tensor(chunk), slots, slots, base + n, mask, out))
            c.appended(chunk)
        assert logits is not None
        return logits

    def rewind(self, cache: Cache, n_tokens: int) -> None:
        c = self._ready(cache)
        c.tree = []
        c.cut(n_tokens)  # the rows after it are overwritten by later passes

    def sync_many(self, requests: Sequence[tuple[Cache, Sequence[int]]]) -> list[TorchLogits]:
        """Every cache's missing prompt tokens in shared passes of PREFILL_CHUNK tokens (the
        weights read once a pass), each prompt's last token in the final one."""
        check_requests(requests)
        caches = [self._ready(cache) for cache, _ in requests]
        rest = [self._missing(c, tokens) for c, (_, tokens) in zip(caches, requests)]
        passes = prefill_passes([len(r) for r in rest], PREFILL_CHUNK)
        rows: list[torch.Tensor] = []
        for p in passes:
            parts = []
            for i, start, stop in p:
                c, n = caches[i], stop - start
                slots = self._tensor(np.arange(c.kv_len, c.kv_len + n))
                mask = None if n == 1 else (torch.arange(c.kv_len + n, device=self.device_obj)[None, :]
                                            <= slots[:, None])  # causal
                out = self._tensor([n - 1] if p is passes[-1] else [])
                parts.append((c, Batch(self._tensor(rest[i][start:stop]), slots, slots, c.kv_len + n, mask, out)))
            self._epoch += 1
            rows = self.model.forward_many([(batch, c.kv) for c, batch in parts])  # type: ignore[misc]
            for i, start, stop in p:
                caches[i].appended(rest[i][start:stop])
        return [TorchLogits(self, x) for x in rows]  # the final pass: one part per request, in order

    # --- trees -----------------------------------------------------------------------

    def eval_tree(self, cache: Cache, tokens: Sequence[int], parents: Sequence[int], depths: Sequence[int],
                  start: int = 0) -> TorchLogits:
        return self.eval_trees([TreeRequest(cache, tokens, parents, depths, start)])[0]

    def eval_trees(self, requests: Sequence[TreeRequest]) -> list[TorchLogits]:
        """All the requests' new nodes in one forward pass: the weights are read (streamed) once."""
        check_requests(requests)
        parts = [self._tree_part(r) for r in requests]
        self._epoch += 1
        rows = self.model.forward_many([(batch, c.kv) for c, batch in parts])  # type: ignore[misc]
        for (c, _), r in zip(parts, requests):
            c.evaluated_tree(r.tokens, r.parents)
        return [TorchLogits(self, x) for x in rows]

    def _tree_part(self, r: TreeRequest) -> tuple[TorchCache, Batch]:
        """One request's batch: node i writes slot kv_len + i, sits at position kv_len + depth[i],
        and sees the committed slots and its ancestors' slots."""
        c = self._ready(r.cache)
        n, base, start = len(r.tokens), c.kv_len, r.start
        if start != len(c.tree):
            raise ValueError(f"{len(c.tree)} nodes are evaluated; cannot continue from {start}")
        if not start < n:
            raise ValueError("eval_tree of no new nodes")
        if n > self.max_tree_nodes:
            raise ValueError(f"a tree of {n} nodes exceeds the {self.max_tree_nodes} this engine was opened for")
        if base + n > c.n_ctx:  # every node takes a slot of the cache
            raise UsageError(f"context full ({c.n_ctx} tokens)", hint="raise --ctx")
        mask = torch.ones((n - start, base + n), dtype=torch.bool)
        mask[:, base:] = torch.from_numpy(ancestor_mask(r.parents)[start:])
        batch = Batch(ids=self._tensor(r.tokens[start:]), positions=self._tensor(base + np.asarray(r.depths[start:])),
                      slots=self._tensor(base + np.arange(start, n)), end=base + n, mask=mask.to(self.device_obj))
        return c, batch

    def commit_path(self, cache: Cache, path: Sequence[int], keep: Sequence[int] = ()) -> None:
        c = self._ready(cache)
        assert c.kv is not None
        check_keep(c.tree_parents, path, keep)
        base, rows = c.kv_len, list(path) + list(keep)  # the path joins the cache, kept nodes follow
        if rows != list(range(len(rows))):  # a prefix of the slots is already in place
            c.kv.move(self._tensor(base + np.asarray(rows)), self._tensor(base + np.arange(len(rows))))
        c.committed(path, keep)

    def close(self) -> None:
        self.close_worker()
        self._epoch += 1
        self.close_caches()
        self.loaded.close()

    def __enter__(self) -> "TorchEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def kv_dtype(device: torch.device) -> torch.dtype:
    """float16 on a GPU, as llama.cpp keeps its cache; float32 on a CPU, where half-precision
    attention is emulated and slow, and the cache is small next to the weights."""
    return torch.float16 if device.type == "cuda" else torch.float32
