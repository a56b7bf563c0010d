"""The forward pass of a decoder-only transformer (llama, Mistral, Qwen2, Qwen3).

Pure functions of the weights, the cache and the batch; no state of its own
beyond precomputed RoPE frequencies. A batch is n tokens with their positions,
the cache slots their keys and values go to, and which cache slots each may
attend to (a boolean mask, or None for "all slots before `end`"). Plain
decoding, prefill and tree verification are the same call.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol, Sequence

import torch
import torch.nn.functional as F

from specrun.engines.torch_engine.arch import ModelArgs
from specrun.engines.torch_engine.cache import KVCache
from specrun.engines.torch_engine.exact_attention import RowsSeen, attention_exact, rows_at_least, rows_seen
from specrun.engines.torch_engine.weights import LayerWeights, ModelWeights
from specrun.kernels.ggml_matmul import blocked_rows


@dataclass
class Batch:
    ids: torch.Tensor  # [n] int64 token ids
    positions: torch.Tensor  # [n] int64 RoPE positions
    slots: torch.Tensor  # [n] int64 cache slots the tokens' keys and values are written to
    end: int  # tokens attend to cache slots [0, end) ...
    mask: torch.Tensor | None  # ... where this is True: [n, end] bool; None: all of them
    out_rows: torch.Tensor | None = None  # rows whose logits are wanted (None: all)


class Rope:
    """Rotary position embedding, paired as llama.cpp pairs it for the architecture."""

    def __init__(self, args: ModelArgs, factors: torch.Tensor | None, device: torch.device) -> None:
        half = args.rope_dim // 2
        # theta_i = base^(-2i/d), the same float32 powers llama.cpp takes (divided by Llama 3.1's factors)
        inv = torch.pow(torch.tensor(args.rope_base, dtype=torch.float32),
                        -torch.arange(half, dtype=torch.float32) * 2.0 / args.rope_dim)
        if factors is not None:
            inv = inv / factors.float().cpu()
        self.inv_freq = (inv * args.rope_scale).to(device)  # [half]
        self.dim, self.neox = args.rope_dim, args.rope_neox

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [n, heads, head_dim] -> the same, its first rope_dim dims rotated by position."""
        angles = positions.float()[:, None] * self.inv_freq[None, :]  # [n, half]
        cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]  # [n, 1, half]
        rot, rest = x[..., :self.dim], x[..., self.dim:]
        if self.neox:  # dim i pairs with dim i + half
            a, b = rot[..., :self.dim // 2], rot[..., self.dim // 2:]
            out = torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)
        else:  # adjacent dims (2i, 2i + 1) pair
            a, b = rot[..., 0::2], rot[..., 1::2]
            out = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
        return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """llama.cpp's RMSNorm (float32 in, float32 out)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


class LayerSource(Protocol):
    """Where a pass gets its decoder layers and output matrix: resident weights, or a stream
    (streamed.StreamedSource) that brings each layer in while the previous one computes."""

    def layers(self) -> Iterable[LayerWeights]: ...

    def output(self, x: torch.Tensor) -> torch.Tensor:
        """Final hidden states [m, n_embd] -> float32 logits [m, n_vocab]; called once per pass,
        after the layers."""
        ...


class ResidentSource:
    def __init__(self, weights: ModelWeights) -> None:
        self.weights = weights

    def layers(self) -> Iterable[LayerWeights]:
        return self.weights.layers

    def output(self, x: torch.Tensor) -> torch.Tensor:
        assert self.weights.output is not None, "a streamed model's output comes from its stream"
        return self.weights.output(x)


class Transformer:
    """`exact`: every row comes out as a pass of its token alone, after the same tokens, would
    give it, whatever else the pass carries (tree nodes, other sequences, a prompt cut into other
    chunks), so speculative and batched output equals plain decoding's bit for bit. It costs
    compute: each matrix product gets at least ggml's blocked_rows() rows (from that many, ggml
    multiplies in kernels where a row's result does not depend on the rows beside it; fewer
    it multiplies row by row, rounding otherwise), and each row attends over exactly the slots
    it sees, in their order, as it would alone (exact_attention)."""

    def __init__(self, args: ModelArgs, weights: ModelWeights, device: torch.device,
                 source: LayerSource | None = None, exact: bool = False) -> None:
        self.args, self.weights = args, weights
        self.source = source or ResidentSource(weights)
        self.rope = Rope(args, weights.rope_factors, device)
        self.exact = exact

    def forward(self, batch: Batch, cache: KVCache) -> torch.Tensor:
        """One sequence's pass: `forward_many` with one part."""
        return self.forward_many([(batch, cache)])[0]

    @torch.inference_mode()
    def forward_many(self, parts: Sequence[tuple[Batch, KVCache]]) -> list[torch.Tensor]:
        """One pass for several sequences, each a batch in its own cache: the matrix products see
        all their tokens at once (weights read once), attention each part in its cache.
        Activations are float32 between the matrix products, which run in the weights' dtype.
        Per part, logits [m, n_vocab] float32 for its `out_rows` (m of n), after writing its
        keys and values into its cache."""
        a, w = self.args, self.weights
        batch = _joined([b for b, _ in parts])
        x = w.embed(batch.ids)  # [N, n_embd] float32: the residual stream stays in full precision
        spans = _spans([b.ids.shape[0] for b, _ in parts])
        group = a.n_head // a.n_head_kv
        attend = [(b, cache, None if b.mask is None or self.exact else _grouped_mask(b.mask, group), span)
                  for (b, cache), span in zip(parts, spans)]
        seen = rows_seen([(b.mask, b.ids.shape[0], b.end) for b, _ in parts]) if self.exact else None
        for i, layer in enumerate(self.source.layers()):
            x = self._layer(i, layer, x, batch.positions, attend, seen)
        rows = _out_rows(parts, spans, x.device)
        logits = self._product(self.source.output, rms_norm(x if rows is None else x[rows], w.norm, a.norm_eps))
        if len(parts) == 1:
            return [logits]
        sizes = [b.ids.shape[0] if b.out_rows is None else b.out_rows.shape[0] for b, _ in parts]
        return list(torch.split(logits, sizes))

    def _layer(self, i: int, w: LayerWeights, x: torch.Tensor, positions: torch.Tensor,
               attend: list[tuple[Batch, KVCache, torch.Tensor | None, slice]], seen: RowsSeen | None) -> torch.Tensor:
        a, n, mul = self.args, x.shape[0], self._product
        h = rms_norm(x, w.attn_norm, a.norm_eps)
        q = mul(w.q, h).view(n, a.n_head, a.head_dim)
        k = mul(w.k, h).view(n, a.n_head_kv, a.head_dim)
        v = mul(w.v, h).view(n, a.n_head_kv, a.head_dim)
        if w.q_norm is not None and w.k_norm is not None:
            q, k = rms_norm(q, w.q_norm, a.norm_eps), rms_norm(k, w.k_norm, a.norm_eps)
        q, k = self.rope(q, positions), self.rope(k, positions)
        outs = []
        for batch, cache, mask, span in attend:  # each sequence attends within its own cache
            cache.write(i, batch.slots, k[span], v[span])
            if seen is None:
                keys, values = cache.view(i, batch.end)  # [n_kv, end, head_dim]
                outs.append(_attention(q[span], keys, values, mask))  # [n_part, n_head * head_dim]
        if seen is not None:  # every part at once, each row as it would be alone
            attn = attention_exact(q, [cache.view(i, cache.n_ctx) for _, cache, _, _ in attend], seen)
        else:
            attn = outs[0] if len(outs) == 1 else torch.cat(outs)
        x = x + mul(w.o, attn)
        h = rms_norm(x, w.ffn_norm, a.norm_eps)
        return x + mul(w.down, F.silu(mul(w.gate, h)) * mul(w.up, h))

    def _product(self, linear: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """linear(x), with x padded to ggml's blocked_rows() when exact (see the class)."""
        if not self.exact:
            return linear(x)
        return linear(rows_at_least(x, blocked_rows()))[:x.shape[0]]


def _spans(sizes: list[int]) -> list[slice]:
    """Each part's rows in the joined batch."""
    ends = list(itertools.accumulate(sizes))
    return [slice(e - n, e) for n, e in zip(sizes, ends)]


def _joined(batches: list[Batch]) -> Batch:
    """The parts' tokens and positions end to end (what the matrix products need of them); a
    lone batch as it is, without a copy."""
    if len(batches) == 1:
        return batches[0]
    return Batch(ids=torch.cat([b.ids for b in batches]), positions=torch.cat([b.positions for b in batches]),
                 slots=torch.empty(0), end=0, mask=None)


def _out_rows(parts: Sequence[tuple[Batch, KVCache]], spans: list[slice], device: torch.device) -> torch.Tensor | None:
    """Rows of the joined batch whose logits are wanted (None: all)."""
    if len(parts) == 1 or all(b.out_rows is None for b, _ in parts):
        return parts[0][0].out_rows if len(parts) == 1 else None
    return torch.cat([torch.arange(s.start, s.stop, device=device) if b.out_rows is None else b.out_rows + s.start
                      for (b, _), s in zip(parts, spans)])


def _grouped_mask(mask: torch.Tensor, group: int) -> torch.Tensor:
    """[n, end] -> [group * n, end]: the queries of one KV head's group, stacked (see _attention)."""
    return mask.repeat(group, 1) if group > 1 else mask


def _attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Grouped-query attention without copying the cache per query head: the group of query
    heads sharing a KV head is folded into the query rows. q [n, n_head, d], keys/values
    [n_kv, end, d], mask [group * n, end] -> [n, n_head * d]."""
    n, n_head, d = q.shape
    n_kv = keys.shape[0]
    group = n_head // n_kv
    # head h uses KV head h // group: [n, n_kv, group, d] -> [n_kv, group * n, d]
    qg = q.view(n, n_kv, group, d).permute(1, 2, 0, 3).reshape(n_kv, group * n, d)
    out = F.scaled_dot_product_attention(qg.to(keys.dtype), keys, values, attn_mask=mask)  # [n_kv, group*n, d]
    return out.view(n_kv, group, n, d).permute(2, 0, 1, 3).reshape(n, n_head * d).float()
