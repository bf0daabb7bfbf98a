"""Causal multi-head self-attention with a preallocated key/value cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class KVCache:
    """Keys and values of earlier tokens, stored in buffers allocated once.

    Incremental decoding writes the keys and values of new tokens at ``length`` and reads
    back everything up to them, so no step concatenates tensors. Writing does not move
    ``length``: the caller calls :meth:`advance` once the written tokens are final. This
    lets an iterative solver rewrite the same positions several times before committing.

    Arguments:
        batch: number of sequences.
        heads: attention heads.
        max_length: the longest sequence the cache holds.
        head_dim: channels per head.
        dtype: storage dtype (the dtype attention runs in).
        device: storage device.
    """

    def __init__(
        self,
        batch: int,
        heads: int,
        max_length: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (batch, heads, max_length, head_dim)
        # Zeros, not uninitialised memory: a masked position still multiplies its value by
        # a zero attention weight, and 0 · NaN would poison the output.
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def max_length(self) -> int:
        return self.keys.shape[2]

    def write(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Stores ``k`` and ``v`` (B, heads, n, head_dim) after the committed tokens.

        Returns:
            Views of all keys and values up to and including the new ones.
        """
        end = self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(
                f"KVCache overflow: {end} tokens requested but the cache holds "
                f"{self.max_length}; allocate a longer cache."
            )
        self.keys[:, :, self.length : end] = k
        self.values[:, :, self.length : end] = v
        return self.keys[:, :, :end], self.values[:, :, :end]

    def advance(self, n: int) -> None:
        """Commits the ``n`` tokens written last."""
        self.length += n

    def write_at(self, position: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Stores one token's ``k`` and ``v`` (B, heads, 1, head_dim) at ``position``, a
        one-element long tensor, ignoring ``length``.

        Shapes do not depend on the position, so a compiled decoding step is traced once
        for all positions (and can be replayed as a CUDA graph).

        Returns:
            The whole key and value buffers and a boolean mask (max_length,) of the
            positions up to and including ``position``.
        """
        self.keys.index_copy_(2, position, k)
        self.values.index_copy_(2, position, v)
        visible = torch.arange(self.max_length, device=position.device) <= position
        return self.keys, self.values, visible


def single_query_attention(
    q: Tensor, k: Tensor, v: Tensor, visible: Tensor | None = None
) -> Tensor:
    """softmax(q kᵀ / √d) v for one query per sequence, as two batched matrix products,
    over the keys where ``visible`` (a boolean vector over them) holds, or all.

    On CPUs the fused attention kernel is slow for a single query (about 2.4× slower than
    this on a 128 × 4-head × 49-token decode step).
    """
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    return scores.softmax(dim=-1) @ v


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where token t attends to tokens 0..t.

    Arguments:
        width: model width.
        heads: number of heads; must divide ``width``.
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads != 0:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.head_dim = width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(
        self, h: Tensor, cache: KVCache | None = None, position: Tensor | None = None
    ) -> Tensor:
        """Attends causally over ``h`` (B, L, width).

        With a cache, ``h`` holds the tokens that follow the committed ones; they attend to
        the cached tokens and causally among themselves. With a cache and ``position`` (a
        one-element long tensor), ``h`` is the one token at that position, written with
        :meth:`KVCache.write_at`: every shape is fixed, for compiled decoding.
        """
        b, n, _ = h.shape
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)

        if position is not None:
            if cache is None or n != 1:
                raise ValueError("attention at a position needs a cache and one token")
            k, v, visible = cache.write_at(position, k, v)
            out = single_query_attention(q, k, v, visible)
        elif cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            past = cache.length
            k, v = cache.write(k, v)
            if n == 1 and h.device.type == "cpu":
                out = single_query_attention(q, k, v)
            elif n == 1:
                out = F.scaled_dot_product_attention(q, k, v)
            else:
                rows = torch.arange(n, device=h.device)[:, None] + past
                mask = torch.arange(past + n, device=h.device)[None, :] <= rows
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

        return self.proj(out.transpose(1, 2).reshape(b, n, -1))
