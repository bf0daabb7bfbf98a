"""Transformer parts used by the autoregressive flow blocks."""

from tarflow.nn.attention import CausalSelfAttention, KVCache
from tarflow.nn.transformer import MLP, TransformerLayer

__all__ = ["MLP", "CausalSelfAttention", "KVCache", "TransformerLayer"]
