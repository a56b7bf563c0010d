"""The engine contract, the same for every backend (parametrized over engine factories).

Each factory opens a tiny f32 model with room for trees; references are the
same engine kind evaluating plain sequences, so what is checked is the
contract (trees, commits, prefix reuse, lazy logits), not one backend's maths.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from specrun.engines import Cache, Engine, Placement, open_engine
from specrun.engines.top_k import top_ids_of, top_k_of
from specrun.engines.host_cpu import cpu_identity
from specrun.engines.llamacpp import LlamaCppConfig, LlamaCppEngine
from tests.conftest import torch_devices

TOL = dict(rtol=1e-3, atol=2e-3)  # batch shapes change f32 rounding only

EngineFactory = Callable[[Path, int], Engine]


def _llamacpp(sequences: int = 1) -> EngineFactory:
    def factory(path: Path, max_tree_nodes: int) -> Engine:
        return LlamaCppEngine(path, LlamaCppConfig(n_threads=1, n_batch=64, max_tree_nodes=max_tree_nodes,
                                                   sequences=sequences))

    return factory


def _torch(device: str, offload: str = "none") -> EngineFactory:
    def factory(path: Path, max_tree_nodes: int) -> Engine:
        from specrun.engines.torch_engine import TorchConfig, TorchEngine
        from specrun.engines.torch_engine.config import OffloadConfig

        return TorchEngine(path, TorchConfig(device=device, dtype="float32", threads=1, max_tree_nodes=max_tree_nodes,
                                             offload=OffloadConfig(mode=offload, slots=2)))

    return factory


# llama.cpp-shared: up to 3 caches in one context (sequence-id ranges), the rest in contexts of their own;
# torch-disk: every layer read from the file each pass, through two buffers
ENGINES: dict[str, EngineFactory] = {"llama.cpp": _llamacpp(), "llama.cpp-shared": _llamacpp(3), "torch": _torch("cpu"),
                                     "torch-disk": _torch("cpu", "disk")}
if torch_devices()[1:]:  # on a machine with a GPU, the torch engine there too, resident and streamed from RAM
    ENGINES["torch-cuda"] = _torch("cuda")
    ENGINES["torch-cuda-ram"] = _torch("cuda", "ram")


@pytest.fixture(params=sorted(ENGINES))
def factory(request: pytest.FixtureRequest) -> EngineFactory:
    return ENGINES[request.param]


@pytest.fixture
def engine(factory: EngineFactory, tiny_model: Path):
    e = factory(tiny_model, 16)
    yield e
    e.close()


@pytest.fixture
def cache(engine: Engine) -> Cache:
    """A 256-token cache on `engine` (closed with it)."""
    return engine.new_cache(256)


def fresh_logits(factory: EngineFactory, path: Path, tokens: list[int]) -> np.ndarray:
    """Reference: a new engine evaluating `tokens` as one plain sequence; the last row."""
    e = factory(path, 0)
    try:
        return e.eval(e.new_cache(256), tokens).row(0)
    finally:
        e.close()


TREE_TOKENS = [40, 41, 42, 43, 44, 45, 46, 47, 48]
TREE_PARENTS = [-1, 0, 0, 1, 1, 2, 3, 5, 7]  # node 0 is the root (the pending token)


def _depths(parents: list[int]) -> list[int]:
    d: list[int] = []
    for p in parents:
        d.append(0 if p < 0 else d[p] + 1)
    return d


def _path(parents: list[int], node: int) -> list[int]:
    path = []
    while node != -1:
        path.append(node)
        node = parents[node]
    return path[::-1]


def test_vocabulary_round_trips(engine: Engine) -> None:
    vocab = engine.vocab
    assert vocab.n_vocab == 272 and engine.n_ctx_train == 2048
    for text in ("hello wörld", "def fib(n):\n\treturn 1 € 😀", "  spaces  "):
        tokens = vocab.tokenize(text, add_special=False)
        assert b"".join(vocab.piece(t) for t in tokens).decode() in (text, " " + text)
    assert vocab.tokenize("hi")[0] == 1  # BOS added for this model
    assert vocab.is_eog(2) and not vocab.is_eog(100)
    assert vocab.piece(1) == b""  # control tokens print nothing
    assert vocab.special_tokens() == (1, 2) and vocab.token_text(2) == b"</s>"


def test_eval_in_pieces_equals_one_batch(factory: EngineFactory, engine: Engine, cache: Cache,
                                         tiny_model: Path) -> None:
    tokens = engine.vocab.tokenize("def fib(n): return the world " * 6)  # longer than one n_batch
    engine.eval(cache, tokens[:-3])
    for t in tokens[-3:]:
        last = engine.eval(cache, [t])
    assert cache.kv_len == len(tokens) and list(cache.tokens) == tokens
    np.testing.assert_allclose(last.row(0), fresh_logits(factory, tiny_model, tokens), **TOL)


def test_sync_keeps_the_common_prefix(factory: EngineFactory, engine: Engine, cache: Cache,
                                      tiny_model: Path) -> None:
    a = engine.vocab.tokenize("hello world, hello world")
    b = a[:6] + engine.vocab.tokenize(" the a def", add_special=False)
    engine.sync(cache, a)
    logits = engine.sync(cache, b).row(0)
    assert list(cache.tokens) == b
    np.testing.assert_allclose(logits, fresh_logits(factory, tiny_model, b), **TOL)
    again = engine.sync(cache, b)  # all of it cached: the last token is evaluated again for its logits
    assert cache.kv_len == len(b)
    np.testing.assert_allclose(again.row(0), logits, **TOL)
    engine.rewind(cache, 3)
    assert list(cache.tokens) == b[:3]


def test_context_overflow_is_a_usage_error(engine: Engine, cache: Cache) -> None:
    from specrun.errors import UsageError

    with pytest.raises(UsageError, match="context full"):
        engine.eval(cache, [5] * 300)


def test_tree_pass_equals_sequential_evaluation_along_every_path(factory: EngineFactory, engine: Engine, cache: Cache,
                                                                 tiny_model: Path) -> None:
    prefix = engine.vocab.tokenize("def fib(n): return")
    engine.eval(cache, prefix)
    logits = engine.eval_tree(cache, TREE_TOKENS, TREE_PARENTS, _depths(TREE_PARENTS))
    assert len(logits) == len(TREE_TOKENS)
    assert cache.kv_len == len(prefix)  # nothing committed yet
    for node in range(len(TREE_TOKENS)):
        expected = fresh_logits(factory, tiny_model, prefix + [TREE_TOKENS[i] for i in _path(TREE_PARENTS, node)])
        np.testing.assert_allclose(logits.row(node), expected, **TOL, err_msg=f"node {node}")


def test_logits_rows_agree_with_full_rows(engine: Engine, cache: Cache) -> None:
    engine.eval(cache, engine.vocab.tokenize("hello world"))
    logits = engine.eval_tree(cache, TREE_TOKENS, TREE_PARENTS, _depths(TREE_PARENTS))
    for i in range(len(logits)):
        row = logits.row(i).astype(np.float64)  # [vocab]
        assert row.shape == (272,)
        assert logits.argmax(i) == int(np.argmax(row))
        p = np.exp(row - row.max())
        p /= p.sum()
        ids, probs = logits.top_k(i, 5)
        np.testing.assert_array_equal(ids, np.argsort(-p, kind="stable")[:5])
        np.testing.assert_allclose(probs, p[ids], rtol=1e-5)
        np.testing.assert_array_equal(logits.top_ids(i, 5), ids)
    engine.commit_path(cache, [])
    engine.eval(cache, [5])
    with pytest.raises(RuntimeError, match="next pass"):
        logits.row(0)  # a handle is valid until the engine's next pass, and says so after
    again = engine.eval(cache, [6])
    cache.close()
    with pytest.raises(RuntimeError, match="next pass"):
        again.argmax(0)  # also after its cache was closed (llama.cpp: its logits buffer freed)


def test_commit_keeps_exactly_the_accepted_path(factory: EngineFactory, engine: Engine, cache: Cache,
                                                tiny_model: Path) -> None:
    prefix = engine.vocab.tokenize("hello world")
    engine.eval(cache, prefix)
    for _ in range(2):  # twice: a second tree must find the cache clean
        engine.eval_tree(cache, TREE_TOKENS, TREE_PARENTS, _depths(TREE_PARENTS))
        path = _path(TREE_PARENTS, 8)  # 0 -> 2 -> 5 -> 7 -> 8
        engine.commit_path(cache, path)
        prefix = prefix + [TREE_TOKENS[i] for i in path]
        assert list(cache.tokens) == prefix
    after = engine.eval(cache, [50]).row(0)
    np.testing.assert_allclose(after, fresh_logits(factory, tiny_model, prefix + [50]), **TOL)


def test_an_uncommitted_tree_leaves_the_cache_as_it_was(factory: EngineFactory, engine: Engine, cache: Cache,
                                                       tiny_model: Path) -> None:
    """A step stopped between eval_tree and commit_path (Ctrl-C): the next sync finds the
    cache as it was, and the next tree starts afresh on it."""
    prefix = engine.vocab.tokenize("the a def")
    engine.eval(cache, prefix)
    engine.eval_tree(cache, TREE_TOKENS, TREE_PARENTS, _depths(TREE_PARENTS))  # then a Ctrl-C, say
    after = engine.sync(cache, prefix + [60]).row(0)
    np.testing.assert_allclose(after, fresh_logits(factory, tiny_model, prefix + [60]), **TOL)
    tree = engine.eval_tree(cache, TREE_TOKENS[:3], TREE_PARENTS[:3], _depths(TREE_PARENTS[:3]))
    expected = fresh_logits(factory, tiny_model, prefix + [60, TREE_TOKENS[0], TREE_TOKENS[2]])
    np.testing.assert_allclose(tree.row(2), expected, **TOL)


def test_a_tree_grown_over_several_calls_equals_one_call(engine: Engine, cache: Cache) -> None:
    prefix = engine.vocab.tokenize("def fib(n): return")
    engine.eval(cache, prefix)
    depths = _depths(TREE_PARENTS)
    whole = engine.eval_tree(cache, TREE_TOKENS, TREE_PARENTS, depths)
    whole_rows = np.stack([whole.row(i) for i in range(len(whole))])
    engine.commit_path(cache, [])
    parts = []
    for start, end in [(0, 2), (2, 5), (5, 9)]:
        part = engine.eval_tree(cache, TREE_TOKENS[:end], TREE_PARENTS[:end], depths[:end], start)
        parts += [part.row(i) for i in range(len(part))]
    np.testing.assert_allclose(np.stack(parts), whole_rows, **TOL)
    with pytest.raises(ValueError, match="evaluated"):
        engine.eval_tree(cache, TREE_TOKENS, TREE_PARENTS, depths, 3)
    engine.commit_path(cache, _path(TREE_PARENTS, 6))  # 0 -> 1 -> 3 -> 6
    assert cache.kv_len == len(prefix) + 4


def test_a_commit_can_keep_the_subtree_below_the_path(factory: EngineFactory, engine: Engine, cache: Cache,
                                                     tiny_model: Path) -> None:
    """A drafter whose guess came true keeps what it evaluated below it: the kept nodes stay
    a tree beside the longer cache, a later call grows it, and its logits are what a fresh
    engine gives along every path."""
    prefix = engine.vocab.tokenize("def fib(n): return")
    engine.eval(cache, prefix)
    engine.eval_tree(cache, TREE_TOKENS, TREE_PARENTS, _depths(TREE_PARENTS))
    with pytest.raises(ValueError, match="keep"):
        engine.commit_path(cache, [0, 2], [7])  # 7's parent, 5, is neither the path's end nor kept
    engine.commit_path(cache, [0, 2], [5, 7, 8])  # 0 -> 2 joins the cache; 2's subtree 5 -> 7 -> 8 stays
    committed = prefix + [TREE_TOKENS[0], TREE_TOKENS[2]]
    assert list(cache.tokens) == committed
    tokens, parents = [45, 47, 48, 60, 61], [-1, 0, 1, 1, 0]  # kept 0..2, new 3 and 4
    grown = engine.eval_tree(cache, tokens, parents, _depths(parents), start=3)
    for row, node in enumerate((3, 4)):
        path = [tokens[i] for i in _path(parents, node)]
        np.testing.assert_allclose(grown.row(row), fresh_logits(factory, tiny_model, committed + path), **TOL)
    engine.commit_path(cache, [0, 1, 3])
    after = engine.eval(cache, [62]).row(0)
    np.testing.assert_allclose(after, fresh_logits(factory, tiny_model, committed + [45, 47, 60, 62]), **TOL)


def test_submit_tree_gives_the_logits_of_eval_tree(engine: Engine, cache: Cache) -> None:
    prefix = engine.vocab.tokenize("hello world hello")
    engine.eval(cache, prefix)
    depths = _depths(TREE_PARENTS)
    direct = engine.eval_tree(cache, TREE_TOKENS, TREE_PARENTS, depths)
    direct_rows = [direct.row(i) for i in range(len(direct))]
    engine.commit_path(cache, [])
    pending = engine.submit_tree(cache, TREE_TOKENS, TREE_PARENTS, depths)
    submitted = pending.result()
    assert pending.done()
    for i, row in enumerate(direct_rows):
        np.testing.assert_allclose(submitted.row(i), row, **TOL)
    engine.commit_path(cache, _path(TREE_PARENTS, 4))
    assert cache.kv_len == len(prefix) + 3


def test_a_call_while_a_pass_is_pending_waits_for_it(engine: Engine, cache: Cache) -> None:
    prefix = engine.vocab.tokenize("hello world")
    engine.eval(cache, prefix)
    pending = engine.submit_tree(cache, TREE_TOKENS, TREE_PARENTS, _depths(TREE_PARENTS))
    engine.commit_path(cache, _path(TREE_PARENTS, 3))  # no race: it runs after the pass
    assert pending.done() and list(cache.tokens) == prefix + [TREE_TOKENS[i] for i in _path(TREE_PARENTS, 3)]
    engine.close()  # and no worker thread outlives the engine
    import threading

    assert not any(t.name.startswith("specrun-engine") for t in threading.enumerate())


# Two sequences' calls, as (call, arguments): trees kept in part and grown, rewinds, syncs.
PROMPT_A, PROMPT_B = "def fib(n): return", "hello world, hello world"


def _script_a(prompt: list[int]) -> list[tuple]:
    return [("eval", prompt), ("tree", TREE_TOKENS, TREE_PARENTS, 0),
            ("commit", [0, 2], [5, 7, 8]),  # 2's subtree stays beside the cache...
            ("tree", [45, 47, 48, 60, 61], [-1, 0, 1, 1, 0], 3),  # ...and grows
            ("commit", [0, 1, 3], []), ("rewind", len(prompt) + 1), ("eval", [50, 51]),
            ("tree", TREE_TOKENS[:5], TREE_PARENTS[:5], 0), ("commit", _path(TREE_PARENTS, 4), []),
            ("sync", prompt + [52, 53]), ("eval", [54])]


def _script_b(prompt: list[int]) -> list[tuple]:
    return [("eval", prompt[:5]), ("eval", prompt[5:]), ("tree", TREE_TOKENS, TREE_PARENTS, 0),
            ("commit", _path(TREE_PARENTS, 8), []), ("rewind", 4), ("eval", [60, 61, 62]),
            ("tree", TREE_TOKENS[:3], TREE_PARENTS[:3], 0), ("rewind", 6),  # a tree dropped by a rewind
            ("tree", TREE_TOKENS[:4], TREE_PARENTS[:4], 0), ("commit", [0, 1, 3], []),
            ("sync", prompt[:3] + [63]), ("eval", [64, 65])]


def _apply(engine: Engine, cache: Cache, step: tuple) -> list[np.ndarray]:
    """Make one call of a script; the rows it returned, read at once (a handle is valid until
    the engine's next pass, whichever cache that is in)."""
    call, *args = step
    if call == "eval":
        logits = engine.eval(cache, args[0])
    elif call == "sync":
        logits = engine.sync(cache, args[0])
    elif call == "tree":
        tokens, parents, start = args
        logits = engine.eval_tree(cache, tokens, parents, _depths(parents), start)
    elif call == "commit":
        engine.commit_path(cache, args[0], args[1])
        return []
    else:
        engine.rewind(cache, args[0])
        return []
    return [logits.row(i) for i in range(len(logits))]


def test_caches_on_one_engine_are_independent_sequences(factory: EngineFactory, tiny_model: Path) -> None:
    """Two caches on one engine, their calls interleaved (a tree left open in one while the
    other evaluates, commits and rewinds): each gives the logits and holds the tokens that
    the same calls give on an engine of its own."""
    shared = factory(tiny_model, 16)
    alone = [factory(tiny_model, 16), factory(tiny_model, 16)]
    try:
        vocab = shared.vocab
        scripts = [_script_a(vocab.tokenize(PROMPT_A)), _script_b(vocab.tokenize(PROMPT_B))]
        caches = [shared.new_cache(256), shared.new_cache(256)]
        own = [e.new_cache(256) for e in alone]
        got: list[list] = [[], []]  # per sequence, per step: (rows, tokens after it)
        for i in range(max(map(len, scripts))):
            for seq in (0, 1):  # alternately: a call on one cache, then one on the other
                if i < len(scripts[seq]):
                    rows = _apply(shared, caches[seq], scripts[seq][i])
                    got[seq].append((rows, caches[seq].tokens))
        # Caches sharing a llama.cpp context attend over each other's (masked) cells too, which
        # changes f32 rounding only; elsewhere the rows are equal to the last bits.
        pooled = isinstance(shared, LlamaCppEngine) and shared.config.sequences > 1
        tol = TOL if pooled else dict(rtol=1e-6, atol=1e-6)
        for seq in (0, 1):
            for i, step in enumerate(scripts[seq]):
                rows = _apply(alone[seq], own[seq], step)
                want_rows, want_tokens = rows, own[seq].tokens
                got_rows, got_tokens = got[seq][i]
                assert got_tokens == want_tokens, f"sequence {seq}, step {i} {step[0]}"
                assert len(got_rows) == len(want_rows)
                for r, (a, b) in enumerate(zip(got_rows, want_rows)):
                    assert np.allclose(a, b, **tol), f"sequence {seq}, step {i} {step[0]}, row {r}"
        assert caches[0].tokens != caches[1].tokens and caches[0].n_ctx == caches[1].n_ctx == own[0].n_ctx
    finally:
        for e in [shared] + alone:
            e.close()


def test_a_cache_serves_only_its_own_engine_while_open(factory: EngineFactory, tiny_model: Path) -> None:
    """A cache holds keys and values its own engine's model computed: another engine refuses it
    (leaving it as it was), and so does its own once the cache is closed; closing one cache
    leaves the engine's others working."""
    one, other = factory(tiny_model, 16), factory(tiny_model, 16)
    try:
        cache, kept = one.new_cache(64), one.new_cache(64)
        prefix = one.vocab.tokenize(PROMPT_A)
        one.eval(cache, prefix)
        depths = _depths(TREE_PARENTS)
        calls = [lambda e, c: e.eval(c, [5]), lambda e, c: e.sync(c, prefix + [5]), lambda e, c: e.rewind(c, 2),
                 lambda e, c: e.eval_tree(c, TREE_TOKENS, TREE_PARENTS, depths),
                 lambda e, c: e.commit_path(c, []),
                 lambda e, c: e.submit_tree(c, TREE_TOKENS, TREE_PARENTS, depths).result(),
                 lambda e, c: e.submit_sync(c, prefix + [5]).result()]
        for call in calls:
            with pytest.raises(ValueError):
                call(other, cache)
        assert list(cache.tokens) == prefix
        expected = one.eval(cache, [5]).row(0)  # still its own engine's
        np.testing.assert_allclose(expected, fresh_logits(factory, tiny_model, prefix + [5]), **TOL)
        cache.close()
        cache.close()  # twice: harmless
        for call in calls:
            with pytest.raises(ValueError):
                call(one, cache)
        np.testing.assert_allclose(one.eval(kept, prefix + [5]).row(0), expected, **TOL)
        one.close()  # the engine's caches close with it
        with pytest.raises(ValueError):
            one.eval(kept, [5])
    finally:
        one.close()
        other.close()


def test_trees_are_bounded_by_what_the_engine_was_opened_for(factory: EngineFactory, tiny_model: Path) -> None:
    e = factory(tiny_model, 4)
    try:
        cache = e.new_cache(64)
        assert e.max_tree_nodes == 4
        e.eval(cache, [1, 2, 3])
        with pytest.raises(ValueError, match="exceeds"):
            e.eval_tree(cache, TREE_TOKENS, TREE_PARENTS, _depths(TREE_PARENTS))
    finally:
        e.close()


def _shared_pass_requests(engine: Engine) -> list[tuple[Cache, list[int], list[int], list[int]]]:
    """Three sequences of different lengths and trees: (cache, prefix, tokens, parents)."""
    texts = ("def fib(n): return", "hello world, hello world", "the a")
    trees = ((TREE_TOKENS, TREE_PARENTS), ([7], [-1]), ([50, 51, 52], [-1, 0, 0]))
    out = []
    for text, (tokens, parents) in zip(texts, trees):
        cache, prefix = engine.new_cache(256), engine.vocab.tokenize(text)
        engine.eval(cache, prefix)
        out.append((cache, prefix, list(tokens), list(parents)))
    return out


def test_a_shared_pass_gives_each_cache_what_it_would_get_alone(factory: EngineFactory, engine: Engine,
                                                                tiny_model: Path) -> None:
    from specrun.engines import TreeRequest

    seqs = _shared_pass_requests(engine)
    alone = []
    for cache, _, tokens, parents in seqs:
        logits = engine.eval_tree(cache, tokens, parents, _depths(parents))
        alone.append([logits.row(i) for i in range(len(logits))])
        engine.commit_path(cache, [])
    shared = engine.eval_trees([TreeRequest(c, t, p, _depths(p)) for c, _, t, p in seqs])
    for k, (logits, rows) in enumerate(zip(shared, alone)):  # every result readable after the call
        assert len(logits) == len(rows)
        for i, row in enumerate(rows):
            np.testing.assert_allclose(logits.row(i), row, **TOL, err_msg=f"sequence {k}, node {i}")
    for cache, prefix, tokens, parents in seqs:  # each cache took its own tree and keeps its own path
        path = _path(parents, len(parents) - 1)
        engine.commit_path(cache, path)
        assert list(cache.tokens) == prefix + [tokens[i] for i in path]
    for cache, _, _, _ in seqs:
        after = engine.eval(cache, [9]).row(0)
        np.testing.assert_allclose(after, fresh_logits(factory, tiny_model, list(cache.tokens)), **TOL)


def test_a_shared_pass_continues_grown_trees_and_can_be_submitted(engine: Engine) -> None:
    from specrun.engines import TreeRequest

    seqs = _shared_pass_requests(engine)
    first = [(c, t[:2] if len(t) > 1 else t, p[:2] if len(p) > 1 else p) for c, _, t, p in seqs]
    engine.eval_trees([TreeRequest(c, t, p, _depths(p)) for c, t, p in first])
    grown = [TreeRequest(c, t, p, _depths(p), start=len(f[1])) for (c, _, t, p), f in zip(seqs, first)
             if len(t) > len(f[1])]  # a sequence whose tree is whole sits this pass out
    submitted = engine.submit_trees(grown).result()
    rows = [[logits.row(i) for i in range(len(logits))] for logits in submitted]
    for r, got in zip(grown, rows):
        engine.commit_path(r.cache, [])
        whole = engine.eval_tree(r.cache, r.tokens, r.parents, r.depths)
        for i, row in enumerate(got):
            np.testing.assert_allclose(row, whole.row(r.start + i), **TOL)
        engine.commit_path(r.cache, [])


def test_a_shared_pass_names_each_cache_once(engine: Engine, cache: Cache) -> None:
    from specrun.engines import TreeRequest

    engine.eval(cache, [5, 6])
    with pytest.raises(ValueError, match="named twice"):
        engine.eval_trees([TreeRequest(cache, [7], [-1], [0]), TreeRequest(cache, [8], [-1], [0])])
    with pytest.raises(ValueError, match="no requests"):
        engine.eval_trees([])


def test_open_engine_needs_no_backend_name(tiny_model: Path) -> None:
    e = open_engine(tiny_model, Placement(threads=1), max_tree_nodes=8)
    try:
        cache = e.new_cache(128)
        assert e.max_tree_nodes == 8 and cpu_identity() in e.settings_key() and cache.n_ctx >= 128
        assert e.eval(cache, e.vocab.tokenize("hello")).argmax(0) >= 0
    finally:
        e.close()


def test_top_k_of_matches_a_full_softmax() -> None:
    rng = np.random.default_rng(0)
    row = (rng.standard_normal(1000) * 3).astype(np.float32)
    p = np.exp(row.astype(np.float64) - row.max())
    p /= p.sum()
    ids, probs = top_k_of(row, 7)
    np.testing.assert_array_equal(ids, np.argsort(-p, kind="stable")[:7])
    np.testing.assert_allclose(probs, p[ids], rtol=1e-5)


@pytest.mark.parametrize("seed", range(12))
def test_top_k_of_a_vocabulary_sized_row_matches_a_full_sort(seed: int) -> None:
    """The two-pass path (column maxima first) against a full sort, ties and a ragged tail
    included, down to rows too small for it."""
    rng = np.random.default_rng(seed)
    size = int(rng.integers(20_000, 160_000)) if seed < 10 else int(rng.integers(2, 3000))
    row = np.round(rng.standard_normal(size) * 4, 1).astype(np.float32)  # many ties
    if seed % 2:
        row[-3:] = row.max() + 1  # the best entries in the ragged last block
    for k in (1, 4, 8, 32):
        ids, _ = top_k_of(row, k)
        np.testing.assert_array_equal(top_ids_of(row, k), ids)
        want = np.argsort(-row, kind="stable")[:k]
        np.testing.assert_array_equal(row[ids], row[want])  # the same values, likeliest first
        assert list(ids) == sorted(ids, key=lambda i: (-row[i], i))  # lowest id among equals


def test_prompts_synced_together_give_what_each_alone_gives(factory: EngineFactory, engine: Engine,
                                                           tiny_model: Path) -> None:
    """sync_many: a cache holding part of its prompt keeps it, one holding something else is cut
    back, and prompts longer than a pass (llama.cpp here: 64 tokens; torch: 512) take several;
    each cache ends holding its prompt, with the last token's row."""
    vocab = engine.vocab
    prompts = [vocab.tokenize(PROMPT_A), vocab.tokenize(PROMPT_B), [1] + [3 + i % 240 for i in range(300)],
               [1] + [7 + i % 200 for i in range(290)]]
    caches = [engine.new_cache(512) for _ in prompts]
    engine.eval(caches[0], prompts[0][:5])
    engine.eval(caches[1], [9, 9, 9])
    got = engine.sync_many(list(zip(caches, prompts)))
    rows = [g.row(0) for g in got]
    alone = factory(tiny_model, 0)
    try:
        for c, p, row in zip(caches, prompts, rows):
            assert c.tokens == tuple(p) and len(row) == vocab.n_vocab
            np.testing.assert_allclose(row, alone.eval(alone.new_cache(512), p).row(0), **TOL)
    finally:
        alone.close()
    with pytest.raises(ValueError, match="named twice"):
        engine.sync_many([(caches[0], [1, 2]), (caches[0], [1, 3])])
