"""Fixed reorderings of a token sequence."""

from __future__ import annotations

import torch
from torch import Tensor

from tarflow.flows.base import Transform

ORDERS = ("raster", "reversed")


class TokenPermutation(Transform):
    """Reorders the T tokens of a (B, T, d) sequence by a fixed permutation π.

    Data → noise (:meth:`forward`) gathers ``z[:, t] = x[:, π(t)]``; :meth:`inverse`
    scatters back. Autoregressive blocks separated by a reversal see every token
    conditioned on every other. A permutation has |det| = 1, so its log-det is zero.

    Arguments:
        num_tokens: T.
        order: ``"raster"`` (identity) or ``"reversed"``.
    """

    def __init__(self, num_tokens: int, order: str = "reversed") -> None:
        super().__init__()
        if order not in ORDERS:
            raise ValueError(f"unknown token order {order!r}; choose one of {ORDERS}")
        self.order = order
        index = torch.arange(num_tokens)
        if order == "reversed":
            index = index.flip(0)
        self.register_buffer("index", index, persistent=False)
        self.register_buffer("inverse_index", torch.argsort(index), persistent=False)

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        z = x[:, self.index]
        return z, torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)

    def inverse(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        return z[:, self.inverse_index]
