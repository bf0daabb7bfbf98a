"""Composition of transforms."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn

from tarflow.flows.base import Transform


class FlowSequence(Transform):
    """f = f_K ∘ … ∘ f_1: :meth:`forward` (data → noise) applies f_1 first and sums the
    members' per-sample log-determinants; :meth:`inverse` (noise → data) undoes f_K first.
    """

    def __init__(self, transforms: Iterable[Transform]) -> None:
        super().__init__()
        self.transforms = nn.ModuleList(transforms)

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        log_det = x.new_zeros(x.shape[0])
        for transform in self.transforms:
            x, ld = transform(x, y)
            log_det = log_det + ld
        return x, log_det

    def inverse(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        for transform in reversed(self.transforms):
            z = transform.inverse(z, y)
        return z
