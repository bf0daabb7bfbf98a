"""Invertible transforms. ``forward`` maps data → noise and returns (z, per-sample log-det
SUM); ``inverse`` maps noise → data."""

from tarflow.flows.autoregressive import AutoregressiveBlock
from tarflow.flows.base import Transform
from tarflow.flows.patchify import Patchify
from tarflow.flows.permutation import TokenPermutation
from tarflow.flows.prior import StandardGaussian
from tarflow.flows.sequence import FlowSequence

__all__ = [
    "AutoregressiveBlock",
    "FlowSequence",
    "Patchify",
    "StandardGaussian",
    "TokenPermutation",
    "Transform",
]
