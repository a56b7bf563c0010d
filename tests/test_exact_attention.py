"""--exact's attention (engines/torch_engine/exact_attention.py): each row of a pass, whatever
else the pass carries, equals that row computed alone over a cache holding just what it sees,
in order, as plain decoding would have laid it out; and it is softmax attention (a float64
reference, computed the obvious way)."""

from __future__ import annotations

import pytest
import torch

from specrun.engines.torch_engine import exact_attention
from specrun.engines.torch_engine.exact_attention import attention_exact, product_floor, rows_seen


def tree_mask(context: int, parents: list[int]) -> torch.Tensor:
    """[n, context + n] bool: node i sees the context, its ancestors and itself."""
    n = len(parents)
    mask = torch.zeros(n, context + n, dtype=torch.bool)
    mask[:, :context] = True
    for i in range(n):
        j = i
        while j >= 0:
            mask[i, context + j] = True
            j = parents[j]
    return mask


def causal_mask(base: int, n: int) -> torch.Tensor:
    """[n, base + n] bool: a prefill chunk's rows, each seeing the slots up to its own."""
    return torch.arange(base + n)[None, :] <= (base + torch.arange(n))[:, None]


def random_parents(n: int, gen: torch.Generator) -> list[int]:
    return [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, n)]


def alone(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor, n_ctx: int) -> torch.Tensor:
    """Row q [1, n_head, d] in a cache of its own holding only the slots `visible` [m], in order
    (as decoding that path token by token lays it out; the slots beyond hold other values)."""
    m = len(visible)
    k = torch.randn(keys.shape[0], n_ctx, keys.shape[2], generator=torch.Generator().manual_seed(m))
    v = torch.randn_like(k)
    k[:, :m], v[:, :m] = keys[:, visible], values[:, visible]
    return attention_exact(q, [(k, v)], rows_seen([(None, 1, m)]))


def reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Softmax attention of one row over `visible` slots, float64: [n_head, d] -> [n_head * d]."""
    n_head, d = q.shape
    group = n_head // keys.shape[0]
    k = keys[:, visible].double().repeat_interleave(group, 0)  # [n_head, m, d]
    v = values[:, visible].double().repeat_interleave(group, 0)
    w = torch.softmax(torch.einsum("hd,hmd->hm", q.double(), k) / d ** 0.5, dim=-1)
    return torch.einsum("hm,hmd->hd", w, v).flatten()


CASES = [  # (n_head, n_kv, head_dim, n_ctx, context, what): a tree, a prefill chunk, every slot
    (12, 2, 128, 512, 233, "tree"), (4, 4, 16, 512, 120, "tree"), (6, 2, 64, 96, 40, "tree"),
    (8, 2, 32, 1024, 300, "prefill"), (12, 2, 128, 512, 0, "prefill"), (4, 1, 8, 256, 130, "all"),
]


@pytest.mark.parametrize("n_head,n_kv,d,n_ctx,context,what", CASES)
def test_every_row_equals_itself_alone_and_is_softmax_attention(n_head: int, n_kv: int, d: int, n_ctx: int,
                                                              context: int, what: str) -> None:
    gen = torch.Generator().manual_seed(n_head * d + context)
    keys = torch.randn(n_kv, n_ctx, d, generator=gen)  # [n_kv, n_ctx, d]: a cache layer, every slot
    values = torch.randn(n_kv, n_ctx, d, generator=gen)
    n = 23
    mask = {"tree": lambda: tree_mask(context, random_parents(n, gen)), "prefill": lambda: causal_mask(context, n),
            "all": lambda: None}[what]()
    end = context + n
    q = torch.randn(n, n_head, d, generator=gen) * 3
    out = attention_exact(q, [(keys, values)], rows_seen([(mask, n, end)]))  # [n, n_head * d]
    for t in range(n):
        visible = torch.arange(end) if mask is None else torch.nonzero(mask[t]).flatten()
        assert torch.equal(out[t], alone(q[t:t + 1], keys, values, visible, n_ctx)[0]), f"row {t} differs alone"
        torch.testing.assert_close(out[t].double(), reference(q[t], keys, values, visible), rtol=1e-5, atol=1e-5)


def test_a_row_does_not_depend_on_the_rows_or_sequences_beside_it() -> None:
    """The same tree node among 3 nodes or 40, and beside other sequences' rows in caches of
    their own (other contexts, other sizes), in one call: the same bits."""
    gen = torch.Generator().manual_seed(5)
    caches = [(torch.randn(2, n_ctx, 64, generator=gen), torch.randn(2, n_ctx, 64, generator=gen))
              for n_ctx in (512, 300, 96)]
    parents = random_parents(40, gen)
    q = torch.randn(40, 8, 64, generator=gen)
    full = attention_exact(q, caches[:1], rows_seen([(tree_mask(200, parents), 40, 240)]))
    few = attention_exact(q[:3], caches[:1], rows_seen([(tree_mask(200, parents[:3]), 3, 203)]))
    assert torch.equal(full[:3], few)
    others = [(causal_mask(250, 5), 5, 255), (None, 1, 71)]
    q_others = torch.randn(6, 8, 64, generator=gen)
    batch = attention_exact(torch.cat([q, q_others]), caches,
                            rows_seen([(tree_mask(200, parents), 40, 240)] + others))
    assert torch.equal(batch[:40], full)
    assert torch.equal(batch[40:45], attention_exact(q_others[:5], caches[1:2], rows_seen(others[:1])))
    assert torch.equal(batch[45:], attention_exact(q_others[5:], caches[2:], rows_seen(others[1:])))


def test_without_the_floor_thin_products_round_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    """Why product_floor exists: where this CPU's library takes other kernels for thin products,
    one query head per KV head and a row alone come out otherwise without the padding."""
    rows, cols = product_floor(16)
    assert 1 <= rows <= exact_attention.PROBE and 1 <= cols <= exact_attention.PROBE
    if (rows, cols) == (1, 1):
        pytest.skip("this CPU's products do not depend on their size")
    gen = torch.Generator().manual_seed(2)
    keys, values = torch.randn(4, 256, 16, generator=gen), torch.randn(4, 256, 16, generator=gen)
    q = torch.randn(30, 4, 16, generator=gen)
    mask = causal_mask(100, 30)

    def rows_alone() -> bool:
        out = attention_exact(q, [(keys, values)], rows_seen([(mask, 30, 130)]))
        return all(torch.equal(out[t], alone(q[t:t + 1], keys, values, torch.arange(101 + t), 256)[0])
                   for t in range(30))

    assert rows_alone()
    monkeypatch.setattr(exact_attention, "product_floor", lambda head_dim: (1, 1))
    assert not rows_alone()
