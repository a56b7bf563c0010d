"""Attention for `--exact` (model.Transformer): every row comes out as a pass of its token
alone would give it, whatever else the pass carries, at about the cost of one batched
attention rather than one attention call per row.

Three facts about float32 products and softmax on the CPU make it possible, each checked
by the tests against rows computed one at a time:
- an element of a matrix product is computed the same way whatever the product's other
  rows and columns are, once it has at least a few of each (`product_floor` measures how
  many, once a process; fewer, the library takes other kernels that round otherwise);
- softmax over a row padded with -inf to a multiple of CHUNK slots gives the visible
  slots the same weights whatever the padded length (the padding adds exact zeros);
- a weighted sum taken CHUNK slots at a time, the chunks' products added in order, does
  not depend on which other rows share the products.
So each row's scores are gathered, in the order it sees its slots (its context, then a tree
node's ancestors), from one product of its sequence's queries with that sequence's keys
(every sequence of the pass in one batched product), and its weighted sum runs over the
same order: where a row sees a chunk's own slots it shares that chunk's product with every
such row; a chunk where it sees other slots (a tree node's ancestors, after its context)
multiplies values gathered for it. One call serves every sequence of a pass: its cost is
a few dozen tensor operations a layer, not a few per row.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

CHUNK = 64  # slots a row's weighted sum takes at a time (and the multiple its padding rounds to)
PROBE = 48  # product_floor looks for the library's switch of kernels below this many rows or columns


@dataclass
class RowsSeen:
    """What each row of a pass's parts (sequences, each in a cache of its own) sees, in order:
    worked out once a pass from their masks, used by every layer. Parts are padded to R rows
    of L slots (L: a multiple of CHUNK); a padding row sees slot 0."""

    slots: torch.Tensor  # [P, R, L] int64: row r of part p's visible cache slots in order, then 0
    hidden: torch.Tensor  # [P, R, L] bool: past a row's visible slots
    rows: torch.Tensor  # [N] int64: where the pass's rows are among the P * R
    moved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]  # per chunk: the rows that read other
    # slots than the chunk's own there (a tree node's ancestors after its context): (parts [M], rows [M],
    # their slots [M, CHUNK]); None: no row
    end: int  # slots [0, end) of each cache hold what any row sees


def rows_seen(parts: list[tuple[torch.Tensor | None, int, int]]) -> RowsSeen:
    """What the rows of each part see: (mask [n, end] bool, or None: every row all of [0, end);
    n; end) per part, in the pass's order."""
    n_parts, most = len(parts), max(n for _, n, _ in parts)
    end = max(e for _, _, e in parts)
    width = -(-end // CHUNK) * CHUNK  # L
    places = torch.arange(width)
    slots = torch.zeros((n_parts, most, width), dtype=torch.int64)
    seen = torch.ones((n_parts, most), dtype=torch.int64)  # padding rows see slot 0
    for p, (mask, n, e) in enumerate(parts):
        if mask is None:
            seen[p, :n] = e
            slots[p, :n, :e] = places[:e]
        else:
            mask = mask.cpu()
            seen[p, :n] = mask.sum(1)
            slots[p, :n, :e] = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # visible first, in order
    hidden = places >= seen[..., None]  # [P, R, L]
    slots.masked_fill_(hidden, 0)
    moved = ((slots != places) & ~hidden).view(n_parts, most, width // CHUNK, CHUNK).any(3)  # [P, R, chunks]
    per_chunk: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = []
    for c in range(width // CHUNK):
        at_part, at_row = torch.nonzero(moved[:, :, c], as_tuple=True)
        per_chunk.append((at_part, at_row, slots[at_part, at_row, c * CHUNK:(c + 1) * CHUNK]) if len(at_part) else None)
    rows = torch.cat([p * most + torch.arange(n) for p, (_, n, _) in enumerate(parts)])
    return RowsSeen(slots, hidden, rows, per_chunk, end)


def attention_exact(q: torch.Tensor, layers: list[tuple[torch.Tensor, torch.Tensor]], seen: RowsSeen) -> torch.Tensor:
    """Softmax attention of each row over exactly the slots it sees, in their order, every row
    computed as it would be alone. q [N, n_head, d] float32, the parts' rows one after the
    other; layers: per part, a layer of its cache, every slot: keys, values [n_kv, n_ctx, d]
    float32 -> [N, n_head * d]."""
    n_head, d = q.shape[1], q.shape[2]
    n_kv = layers[0][0].shape[0]
    (n_parts, most, width), g = seen.slots.shape, n_head // n_kv
    rows, cols = product_floor(d)
    keys, values = _stacked([k for k, _ in layers], width), _stacked([v for _, v in layers], width)  # [P, n_kv, L, d]
    qg = q.new_zeros(n_parts * most, n_head, d)
    qg[seen.rows] = q  # head h uses KV head h // g: -> [P, n_kv, R * g, d]
    qg = qg.view(n_parts, most, n_kv, g, d).permute(0, 2, 1, 3, 4).reshape(n_parts, n_kv, most * g, d)
    cut = min(width, max(seen.end, cols))
    scores = torch.matmul(rows_at_least(qg, rows), keys[:, :, :cut].transpose(2, 3))[:, :, :most * g]
    scores.mul_(d ** -0.5)  # [P, n_kv, R*g, cut]
    picked = scores.view(n_parts, n_kv, most, g, cut).gather(
        4, seen.slots.view(n_parts, 1, most, 1, width).expand(n_parts, n_kv, most, g, width))
    weights = torch.softmax(picked.masked_fill_(seen.hidden.view(n_parts, 1, most, 1, width), float("-inf")), -1)
    # weights [P, n_kv, R, g, L]
    # The weighted sum a chunk at a time, in order, over the cache's own slots (out += w @ v in one
    # call gives the bits of adding the product) ...
    flat = n_parts * n_kv
    w_all = rows_at_least(weights.view(flat, most * g, width // CHUNK, CHUNK).transpose(1, 2), rows)
    w_all = w_all.contiguous()  # [P*n_kv, chunks, M, CHUNK]: each chunk's weights, every row
    v_all = _cols_at_least(values.reshape(flat, width, d), cols)  # [P*n_kv, L, d']
    out = torch.bmm(w_all[:, 0], v_all[:, :CHUNK])  # [P*n_kv, M, d']
    by_row = out[:, :most * g].view(n_parts, n_kv, most, g, -1)  # [P, n_kv, R, g, d']
    heads = torch.arange(n_kv)[None, :, None]
    for c, moved in enumerate(seen.moved):
        lo, hi = c * CHUNK, (c + 1) * CHUNK
        before = by_row[moved[0], :, moved[1]] if moved is not None and c else None  # [M, n_kv, g, d'] so far
        if c:
            out.baddbmm_(w_all[:, c], v_all[:, lo:hi])
        if moved is None:
            continue
        # ... and where a row sees other slots, over values gathered in its order, added to its sum so far
        at_part, at_row, slots = moved
        v = _cols_at_least(values[at_part[:, None, None], heads, slots[:, None, :]], cols)  # [M, n_kv, CHUNK, d']
        # each row's product needs `rows` rows to be computed as a lone row's is
        w = rows_at_least(weights[at_part, :, at_row, :, lo:hi], rows)  # [M, n_kv, g', CHUNK]
        own = torch.matmul(w, v)[:, :, :g]
        by_row[at_part, :, at_row] = own if before is None else before + own
    out = out[:, :most * g, :d].reshape(n_parts, n_kv, most, g, d)
    return out.permute(0, 2, 1, 3, 4).reshape(n_parts * most, n_head * d)[seen.rows]


def _stacked(layers: list[torch.Tensor], width: int) -> torch.Tensor:
    """The parts' cache layers [n_kv, n_ctx, d] as [P, n_kv, width, d]: slots past a cache's
    end are zeros (a view, not a copy, for one part whose cache is wide enough)."""
    if len(layers) == 1 and layers[0].shape[1] >= width:
        return layers[0][None, :, :width]
    if all(t.shape[1] >= width for t in layers):
        return torch.stack([t[:, :width] for t in layers])
    out = layers[0].new_zeros(len(layers), layers[0].shape[0], width, layers[0].shape[2])
    for p, t in enumerate(layers):
        out[p, :, :min(width, t.shape[1])] = t[:, :width]
    return out


def rows_at_least(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x [..., m, k] with zero rows appended up to `rows` (product_floor here; ggml's
    blocked_rows for the model's quantized products)."""
    if x.shape[-2] >= rows:
        return x
    return torch.cat([x, x.new_zeros(*x.shape[:-2], rows - x.shape[-2], x.shape[-1])], dim=-2)


def _cols_at_least(x: torch.Tensor, cols: int) -> torch.Tensor:
    """x [..., k, d] with zero columns appended up to `cols` (product_floor; a small model's head)."""
    if x.shape[-1] >= cols:
        return x
    return torch.cat([x, x.new_zeros(*x.shape[:-1], cols - x.shape[-1])], dim=-1)


@functools.cache
def product_floor(head_dim: int) -> tuple[int, int]:
    """(rows, columns): from this many of each, an element of a float32 matrix product on this
    CPU comes out the same whatever the product's other rows and columns (the library takes
    other kernels for thinner products: on the 2-core EPYC 4 rows and 12 columns). Measured
    once a process for the inner sizes attention uses (head_dim and CHUNK): products of 1
    to PROBE - 1 rows or columns against the same elements of a wide one."""
    gen = torch.Generator().manual_seed(0)
    rows = cols = 1
    for inner in sorted({head_dim, CHUNK}):
        a = torch.randn(2, 4 * PROBE, inner, generator=gen)  # [2, 4 * PROBE, inner]
        b = torch.randn(2, inner, 4 * PROBE, generator=gen)  # [2, inner, 4 * PROBE]
        full = torch.matmul(a, b)
        for m in range(PROBE - 1, 0, -1):
            if not torch.equal(torch.matmul(a[:, :m], b), full[:, :m]):
                rows = max(rows, m + 1)
                break
        for k in range(PROBE - 1, 0, -1):
            if not all(torch.equal(torch.matmul(a[:, :PROBE], b[:, :, s:s + k]), full[:, :PROBE, s:s + k])
                       for s in (0, 7)):
                cols = max(cols, k + 1)
                break
    return rows, cols
