"""Causal attention with the preallocated key/value cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tarflow.nn import CausalSelfAttention, KVCache
from tarflow.nn.attention import single_query_attention


def test_single_query_attention_matches_fused_attention():
    q = torch.randn(3, 2, 1, 8, dtype=torch.float64)
    k = torch.randn(3, 2, 5, 8, dtype=torch.float64)
    v = torch.randn(3, 2, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(
        single_query_attention(q, k, v), F.scaled_dot_product_attention(q, k, v)
    )


@pytest.mark.parametrize("step", [1, 3])
def test_cached_attention_equals_full_causal_attention(step):
    attn = CausalSelfAttention(16, 2).double()
    h = torch.randn(2, 6, 16, dtype=torch.float64)
    full = attn(h)
    cache = KVCache(2, 2, 6, 8, torch.float64, "cpu")
    parts = []
    for start in range(0, 6, step):
        parts.append(attn(h[:, start : start + step], cache))
        cache.advance(step)
    torch.testing.assert_close(torch.cat(parts, dim=1), full)


def test_cache_overflow_is_named():
    cache = KVCache(1, 1, 2, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="KVCache overflow"):
        cache.write(torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 3, 4))
