"""Pre-norm Transformer layer."""

from __future__ import annotations

from torch import Tensor, nn

from tarflow.nn.attention import CausalSelfAttention, KVCache


class MLP(nn.Module):
    """Two-layer perceptron with a GELU between, widening by ``ratio``."""

    def __init__(self, width: int, ratio: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, ratio * width)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(ratio * width, width)

    def forward(self, h: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(h)))


class TransformerLayer(nn.Module):
    """Pre-norm causal Transformer layer: h + attn(norm(h)), then h + mlp(norm(h))."""

    def __init__(self, width: int, heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_ratio)

    def forward(
        self, h: Tensor, cache: KVCache | None = None, position: Tensor | None = None
    ) -> Tensor:
        h = h + self.attn(self.norm1(h), cache, position)
        return h + self.mlp(self.norm2(h))
