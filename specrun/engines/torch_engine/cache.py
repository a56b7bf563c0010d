"""A static KV cache: one preallocated tensor pair per model, rows addressed by slot.

The engine decides what each slot holds: committed tokens in slots [0, kv_len),
and during a tree pass node i of the tree in slot kv_len + i. Committing a
path moves its rows down to follow the committed ones (`move`), so nothing is
reallocated while generating, and a streamed model (weights arriving layer by
layer) writes each layer's rows as that layer runs.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layer: int, n_head_kv: int, n_ctx: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        shape = (n_layer, n_head_kv, n_ctx, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [n_layer, n_kv, n_ctx, head_dim]
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.n_ctx = n_ctx

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the keys and values of n tokens (k, v: [n, n_kv, head_dim]) in `slots` [n]."""
        self.k[layer].index_copy_(1, slots, k.transpose(0, 1).to(self.k.dtype))
        self.v[layer].index_copy_(1, slots, v.transpose(0, 1).to(self.v.dtype))

    def view(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of slots [0, end): [n_kv, end, head_dim] each (views, no copy)."""
        return self.k[layer, :, :end], self.v[layer, :, :end]

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy the rows of slots `src` to slots `dst` in every layer (a committed tree path).
        The source rows are gathered before any is overwritten, so the slots may overlap."""
        for t in (self.k, self.v):
            t[:, :, dst] = t[:, :, src]
