"""The engine contract: a vocabulary, a loaded model, and KV caches; tokens in, logits out.

Every backend (llama.cpp, torch) implements `Engine`; the generation loop, the
drafters and the calibration talk to nothing else. Four choices keep the
contract fit for GPUs, for drafting while the target works, and for serving
several sequences from one loaded model:

- The engine holds the weights; a `Cache` (the tokens one sequence has
  evaluated, with their keys and values) is an object the engine makes, any
  number of them, and every call names the cache it works on (as mlx-lm passes
  its cache). A chat keeps its cache between turns; another conversation on the
  same model gets its own.
- `Logits` is a handle, not an array: the engine keeps the logits where it
  computed them and hands out only the rows a caller reads (a tree walk reads
  depth + 1 rows of a tree of hundreds).
- A cache knows the tokens it holds, so `sync` can keep the common prefix of any
  request; callers never mirror it.
- `submit_tree` starts a tree pass and returns at once (`Pending`), so a
  draft model can work while the target verifies.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from specrun.errors import UsageError


class Vocab(Protocol):
    """A model's tokenizer and token table."""

    n_vocab: int

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of `text`, BOS (EOS) added where the model wants them if `add_special`;
        special tokens written in the text (`<|im_end|>`) parsed as such only if `parse_special`:
        what a user typed is text (see ChatTemplate.tokens)."""
        ...

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


class Logits(Protocol):
    """Rows of float32 logits [n, n_vocab] that stay where the engine computed them.

    Valid until the engine's next evaluation: read what you need first."""

    def __len__(self) -> int: ...

    def row(self, i: int) -> np.ndarray:
        """A copy of row i: float32 [n_vocab]."""
        ...

    def argmax(self, i: int) -> int:
        """The likeliest token of row i (lowest id on ties)."""
        ...

    def top_k(self, i: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(token ids [k], softmax probabilities [k]) of row i's k likeliest tokens, likeliest first."""
        ...

    def top_ids(self, i: int, k: int) -> np.ndarray:
        """top_k's ids alone (lowest id among equals), without the softmax's pass over the row."""
        ...


class Pending(Protocol):
    """A tree pass under way (`Engine.submit_tree`)."""

    def done(self) -> bool: ...

    def result(self) -> Logits:
        """Wait for the pass; its logits, or the exception it raised."""
        ...


class Cache:
    """One sequence's KV cache on the engine that made it (`Engine.new_cache`): room for
    `n_ctx` tokens, the tokens it holds, and the draft tree evaluated beside them since the
    last `commit_path`. Engines keep the keys and values in a subclass; this part is the
    bookkeeping they share."""

    def __init__(self, n_ctx: int) -> None:
        self.n_ctx = n_ctx
        self._tokens: list[int] = []  # committed: their keys and values are in cells [0, kv_len)
        self.tree: list[int] = []  # tokens of the tree evaluated since the last commit
        self.tree_parents: list[int] = []  # and their parents
        self._release: Callable[[], None] | None = None  # frees the engine's part (EngineMixin._made)

    @property
    def tokens(self) -> tuple[int, ...]:
        """The tokens whose keys and values the cache holds, in order (a copy: a caller may keep
        it while the cache moves on)."""
        return tuple(self._tokens)

    @property
    def kv_len(self) -> int:
        return len(self._tokens)

    def appended(self, tokens: Sequence[int]) -> None:
        """`eval`'s bookkeeping: these tokens were evaluated after the committed ones."""
        self._tokens.extend(tokens)

    def cut(self, n_tokens: int) -> None:
        """`rewind`'s bookkeeping: only the first `n_tokens` stay."""
        del self._tokens[n_tokens:]

    def evaluated_tree(self, tokens: Sequence[int], parents: Sequence[int]) -> None:
        """`eval_tree`'s bookkeeping: the tree beside the cache is now these nodes."""
        self.tree, self.tree_parents = list(tokens), list(parents)

    def committed(self, path: Sequence[int], keep: Sequence[int]) -> None:
        """`commit_path`'s bookkeeping, once the engine has moved the keys and values: the
        path's tokens join the committed ones and the kept nodes are the tree now."""
        self._tokens += [self.tree[i] for i in path]
        self.tree = [self.tree[i] for i in keep]
        self.tree_parents = reindexed_parents(self.tree_parents, keep)

    def close(self) -> None:
        """Free what the engine allocated for it (llama.cpp: a context); the engine's other
        caches stay. Closing twice is harmless."""
        release, self._release = self._release, None
        if release is not None:
            release()

    @property
    def closed(self) -> bool:
        """Closed, or its engine is (an engine's caches are made open: `EngineMixin._made`)."""
        return self._release is None


@dataclass(frozen=True)
class TreeRequest:
    """One sequence's share of a pass that several share (`Engine.eval_trees`): the arguments
    `eval_tree` would take for it."""

    cache: Cache
    tokens: Sequence[int]
    parents: Sequence[int]
    depths: Sequence[int]
    start: int = 0


def check_requests(requests: Sequence[TreeRequest] | Sequence[tuple[Cache, Sequence[int]]]) -> None:
    """ValueError unless there is a request and no cache is named twice (one pass writes each
    cache's tree, or prompt, once)."""
    if not requests:
        raise ValueError("a shared pass of no requests")
    caches = [r.cache if isinstance(r, TreeRequest) else r[0] for r in requests]
    if len({id(c) for c in caches}) != len(caches):
        raise ValueError("a cache named twice in one shared pass")


class Engine(Protocol):
    """A loaded model. Its caches (`new_cache`, any number) hold what sequences evaluated:
    `eval` appends to one, `rewind` cuts it back, `sync` does both to reach a wanted token
    list, and a draft tree is evaluated beside it (`eval_tree`) until `commit_path` keeps
    one root-to-node path of it. One call at a time, whichever cache it names: while a
    `submit_tree` is pending, wait for it before the next call."""

    vocab: Vocab
    n_ctx_train: int
    notices: Sequence[str]  # one-line notes from loading (a fallback taken), for the user
    on_cpu: bool  # its passes compute on this machine's CPU cores (a draft working beside it shares them)

    def settings_key(self) -> str:
        """What a measured cost depends on besides the model file: backend, build, placement."""
        ...

    def new_cache(self, n_ctx: int) -> Cache:
        """An empty KV cache of `n_ctx` tokens to evaluate in with this engine (freed by its
        `close()`, or the engine's)."""
        ...

    @property
    def max_tree_nodes(self) -> int:
        """The most nodes one `eval_tree` call takes (0: this engine was opened for no trees)."""
        ...

    def eval(self, cache: Cache, tokens: Sequence[int]) -> Logits:
        """Append `tokens` to the cache; one row: the logits after the last of them."""
        ...

    def sync(self, cache: Cache, tokens: Sequence[int]) -> Logits:
        """Make the cache hold `tokens`, keeping what it shares with them and evaluating the
        rest (at least the last token); one row: the logits after the last token."""
        ...

    def rewind(self, cache: Cache, n_tokens: int) -> None:
        """Keep only the first `n_tokens` cache entries."""
        ...

    def sync_many(self, requests: Sequence[tuple[Cache, Sequence[int]]]) -> list[Logits]:
        """`sync` for several caches, each named once, in as few passes as the engine can (a
        batch's joining sequences: their prefills share the weights' reads); result i is the row
        after request i's last token, valid until the engine's next call."""
        ...

    def eval_tree(self, cache: Cache, tokens: Sequence[int], parents: Sequence[int], depths: Sequence[int],
                  start: int = 0) -> Logits:
        """Evaluate tree nodes start..n-1 after the cache in one pass; rows [n - start]. Node i
        sits at position kv_len + depths[i] and attends to the cache and its ancestors only
        (parents[i] < i, -1 for a root); nodes before `start` come from earlier calls since
        the last commit (a tree grown in steps). The cache is unchanged until `commit_path`."""
        ...

    def submit_tree(self, cache: Cache, tokens: Sequence[int], parents: Sequence[int], depths: Sequence[int],
                    start: int = 0) -> Pending:
        """`eval_tree`, started and returned at once."""
        ...

    def submit_sync(self, cache: Cache, tokens: Sequence[int]) -> Pending:
        """`sync` (a prompt's prefill), started and returned at once."""
        ...

    def eval_trees(self, requests: Sequence[TreeRequest]) -> list[Logits]:
        """`eval_tree` for several caches, each named once, in as few passes as the engine can:
        the weights are read once for all of them where the backend batches sequences (a streamed
        pass costs its transfer whatever it carries). Result i is what request i alone would give
        (rows equal within float rounding); every result stays valid until the engine's next call."""
        ...

    def submit_trees(self, requests: Sequence[TreeRequest]) -> Pending:
        """`eval_trees`, started and returned at once (its result is the list)."""
        ...

    def commit_path(self, cache: Cache, path: Sequence[int], keep: Sequence[int] = ()) -> None:
        """Keep the tree nodes `path` (root first, each the parent of the next) in the cache
        after the last `eval_tree`, and drop every other node but those in `keep`: increasing
        descendants of path[-1], closed under parents below it. They stay evaluated beside the
        longer cache as the nodes 0.. of a tree a later `eval_tree` continues (their depths
        less len(path)): a drafter whose guess came true keeps the work it did below it."""
        ...

    def transfer(self) -> "Transfer | None":
        """What streaming the weights has cost so far; None where they stay where they compute."""
        ...

    def measure_link(self) -> float | None:
        """Bytes per second of the disk (or link) the weights stream over, measured now by one
        pass of transfers with no compute; None where they do not stream."""
        ...

    def close(self) -> None:
        """Free the model and every cache it made."""
        ...


@dataclass
class Transfer:
    """Totals of an offloaded placement since the engine loaded: weights brought to the compute
    unit by unit every pass (from disk, or from RAM to a GPU)."""

    passes: int = 0
    bytes: int = 0  # bytes streamed (read or copied)
    wait_s: float = 0.0  # time passes stood waiting for weights to arrive
    busy_s: float = 0.0  # wall time with a read or copy in flight
    bytes_per_pass: int = 0
    link_bps: float | None = None  # the disk's (or link's) measured bytes per second, once measured

    def minus(self, earlier: "Transfer") -> "Transfer":
        """What happened between `earlier` and this snapshot."""
        return replace(self, passes=self.passes - earlier.passes, bytes=self.bytes - earlier.bytes,
                       wait_s=self.wait_s - earlier.wait_s, busy_s=self.busy_s - earlier.busy_s)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences: how much of a KV cache
    holding `a` serves a request for `b`."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def check_keep(parents: Sequence[int], path: Sequence[int], keep: Sequence[int]) -> None:
    """ValueError unless `keep` (for `commit_path`) is increasing and each kept node's parent is
    the path's last node (the prefix where the path is empty) or a kept node before it."""
    top = path[-1] if path else -1
    seen = {top}
    for i, node in enumerate(keep):
        if not 0 <= node < len(parents) or (i and node <= keep[i - 1]) or parents[node] not in seen:
            raise ValueError(f"cannot keep node {node}: kept nodes must increase and descend from "
                             f"node {top} through kept nodes")
        seen.add(node)


def reindexed_parents(parents: Sequence[int], keep: Sequence[int]) -> list[int]:
    """The kept nodes' parents as indices into `keep` (-1: the new end of the cache)."""
    index = {old: new for new, old in enumerate(keep)}
    return [index.get(parents[old], -1) for old in keep]


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


class EngineMixin:
    """What every engine does the same way on top of its own eval, rewind and eval_tree:
    `sync`, the caches it made (closed with it), and `submit_tree` on one worker thread
    (llama.cpp's C calls and torch's ops release the GIL, so the caller's thread runs on
    meanwhile). An engine calls `settle()` first in each of its own calls, so a call made
    while a pass is pending waits for it instead of racing it, and `close_worker()` and
    `close_caches()` in close()."""

    notices: Sequence[str] = ()
    _epoch = 0  # passes so far, and caches freed: a Logits handle is valid only within its own
    _worker: ThreadPoolExecutor | None = None
    _pending: Future | None = None
    _worker_lock = threading.Lock()

    def _made(self, cache: Cache, free: Callable[[], None] = lambda: None) -> Cache:
        """Hand out a new cache; `free` releases what the engine allocated for it, when the
        cache is closed or the engine is."""
        caches: set[Cache] = self.__dict__.setdefault("_caches", set())

        def release() -> None:
            self.settle()  # a pass under way may be using it
            caches.discard(cache)
            self._epoch += 1  # logits read from its buffers go stale with it
            free()

        cache._release = release
        caches.add(cache)
        return cache

    def _own(self, cache: Cache) -> None:
        """ValueError unless `cache` is one of this engine's open caches: a cache holds keys and
        values that only its own engine's model computed."""
        if cache not in self.__dict__.get("_caches", ()):
            raise ValueError("this cache was made by another engine, or closed")

    def close_caches(self) -> None:
        for cache in list(self.__dict__.get("_caches", ())):
            cache.close()

    def sync(self, cache: Cache, tokens: Sequence[int]) -> Logits:
        return self.eval(cache, self._missing(cache, tokens))  # type: ignore[attr-defined]

    def _missing(self, cache: Cache, tokens: Sequence[int]) -> list[int]:
        """`sync`'s first half, for one cache or several (`sync_many`): the cache cut back to what
        it shares with `tokens` (all but the last at most), and the tokens it still needs."""
        if not tokens:
            raise ValueError("sync to no tokens")
        if len(tokens) > cache.n_ctx:
            raise UsageError(f"context full ({cache.n_ctx} tokens)", hint="raise --ctx")
        keep = min(common_prefix(cache.tokens, tokens), len(tokens) - 1)
        self.rewind(cache, keep)  # type: ignore[attr-defined]
        return list(tokens[keep:])

    def submit_tree(self, cache: Cache, tokens: Sequence[int], parents: Sequence[int], depths: Sequence[int],
                    start: int = 0) -> Future:
        return self._submit(self.eval_tree, cache, list(tokens), list(parents), list(depths), start)  # type: ignore[attr-defined]

    def submit_sync(self, cache: Cache, tokens: Sequence[int]) -> Future:
        return self._submit(self.sync, cache, list(tokens))

    def submit_trees(self, requests: Sequence[TreeRequest]) -> Future:
        return self._submit(self.eval_trees, list(requests))  # type: ignore[attr-defined]

    def _submit(self, call: Callable[..., Logits], *args: Any) -> Future:
        self.settle()
        with self._worker_lock:
            if self._worker is None:
                self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="specrun-engine")
        self._pending = self._worker.submit(call, *args)
        return self._pending

    def transfer(self) -> Transfer | None:
        return None

    def measure_link(self) -> float | None:
        return None

    def settle(self) -> None:
        """Wait for a pass under way on the worker (its outcome goes to its own `result()`)."""
        pending = self._pending
        if pending is not None and not threading.current_thread().name.startswith("specrun-engine"):
            wait([pending])
            self._pending = None

    def close_worker(self) -> None:
        """Wait for a pass under way and end the worker thread: none outlives the engine."""
        self.settle()
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
