"""TARFlow for images: patchify, a stack of autoregressive blocks, a Gaussian prior."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tarflow.flows import (
    AutoregressiveBlock,
    FlowSequence,
    Patchify,
    StandardGaussian,
    TokenPermutation,
)
from tarflow.sampling.guidance import Guidance
from tarflow.sampling.solvers import Calibration, Solver, SolverStats, invert_block

# Inputs are images scaled to [-1, 1] plus augmentation noise; far larger values mean raw
# pixel values were passed in.
MAX_ABS_INPUT = 8.0


@dataclass
class ImageFlowConfig:
    """Shape of a TARFlow image model.

    Arguments:
        image_size: H = W of the input images.
        channels: C.
        patch_size: p; tokens are p×p patches of size d = C·p².
        width: Transformer width of every block.
        heads: attention heads.
        block_depths: Transformer layers of each block, data side first. Equal depths
            give TARFlow; one large entry last (next to the prior) and small ones before
            it give the deep–shallow design of STARFlow.
        num_classes: classes for conditioning (0: unconditional).
        mlp_ratio: MLP widening.
        log_scale_bound: soft bound c on the log-scale, a = c·tanh(â/c).
    """

    image_size: int = 28
    channels: int = 1
    patch_size: int = 4
    width: int = 128
    heads: int = 4
    block_depths: list[int] = field(default_factory=lambda: [4, 4, 4, 4])
    num_classes: int = 10
    mlp_ratio: int = 4
    log_scale_bound: float = 4.0

    def __post_init__(self) -> None:
        if self.image_size <= 0 or self.channels <= 0 or self.patch_size <= 0:
            raise ValueError("image_size, channels and patch_size must be > 0")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"model.patch_size {self.patch_size} does not divide "
                f"model.image_size {self.image_size}"
            )
        if self.width < 1 or self.heads < 1 or self.mlp_ratio < 1:
            raise ValueError("model.width, model.heads and model.mlp_ratio must be >= 1")
        if self.width % self.heads:
            raise ValueError(f"model.width {self.width} is not divisible by heads {self.heads}")
        if not self.block_depths or min(self.block_depths) < 1:
            raise ValueError("model.block_depths needs at least one block of >= 1 layer")
        if self.num_classes < 0:
            raise ValueError("model.num_classes must be >= 0")
        if not 0 < self.log_scale_bound < float("inf"):
            raise ValueError("model.log_scale_bound must be a finite number > 0")

    @property
    def num_dims(self) -> int:
        return self.channels * self.image_size**2


class ImageFlow(nn.Module):
    """A class-conditional TARFlow on images (Zhai et al., 2024).

    :meth:`forward` maps images to noise (data → noise); :meth:`inverse` maps noise back to
    images (noise → data). Consecutive blocks read the tokens in opposite orders.

    Arguments:
        config: the model's shape.

    Example:
        >>> model = ImageFlow(ImageFlowConfig(image_size=8, patch_size=4, width=32,
        ...                                   heads=2, block_depths=[1, 1], num_classes=3))
        >>> x = torch.rand(5, 1, 8, 8) * 2 - 1
        >>> y = torch.tensor([0, 1, 2, 0, 1])
        >>> z, log_det = model(x, y)
        >>> z.shape, log_det.shape
        (torch.Size([5, 4, 16]), torch.Size([5]))
        >>> torch.allclose(model.inverse(z, y), x, atol=1e-5)
        True
        >>> torch.allclose(model.inverse(z, y, solver="jacobi"), x, atol=1e-5)
        True
        >>> model.sample(2, y=torch.tensor([2, 2])).shape
        torch.Size([2, 1, 8, 8])
    """

    def __init__(self, config: ImageFlowConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.patchify = Patchify(c.channels, c.image_size, c.image_size, c.patch_size)
        num_tokens, token_dim = self.patchify.num_tokens, self.patchify.token_dim

        transforms: list[nn.Module] = []
        for i, depth in enumerate(c.block_depths):
            if i > 0:
                transforms.append(TokenPermutation(num_tokens, "reversed"))
            transforms.append(
                AutoregressiveBlock(
                    num_tokens,
                    token_dim,
                    c.width,
                    depth,
                    c.heads,
                    num_classes=c.num_classes,
                    mlp_ratio=c.mlp_ratio,
                    log_scale_bound=c.log_scale_bound,
                )
            )
        self.flow = FlowSequence(transforms)
        self.prior = StandardGaussian()
        # Per-block choices of the "selective" solver; set by tarflow.sampling.calibrate.
        self.solver_calibration: Calibration | None = None

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    @property
    def token_shape(self) -> tuple[int, int]:
        return self.patchify.num_tokens, self.patchify.token_dim

    @property
    def blocks(self) -> list[AutoregressiveBlock]:
        """The autoregressive blocks, data side first."""
        return [t for t in self.flow.transforms if isinstance(t, AutoregressiveBlock)]

    def check_images(self, x: Tensor) -> None:
        """Raises a ValueError naming what is wrong with a batch of input images."""
        c = self.config
        expected = (c.channels, c.image_size, c.image_size)
        if not isinstance(x, Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"images must have shape (B, {expected[0]}, {expected[1]}, {expected[2]}) "
                f"for this model, got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(
                f"images must be floating point in [-1, 1], got dtype {x.dtype}; "
                "convert uint8 pixels with tarflow.data.to_unit_range"
            )
        param = next(self.parameters())
        if x.dtype != param.dtype:
            raise ValueError(
                f"images are {x.dtype} but the model's weights are {param.dtype}; convert one "
                f"of them (x.to({param.dtype}) or model.to({x.dtype}))"
            )
        if x.shape[0] == 0:
            raise ValueError("the batch of images is empty")
        if not torch.isfinite(x).all():
            raise ValueError("images contain NaN or infinite values")
        if x.abs().max() > MAX_ABS_INPUT:
            raise ValueError(
                f"image values reach {x.abs().max().item():.1f}; the model expects data "
                "scaled to [-1, 1] (convert uint8 pixels with tarflow.data.to_unit_range)"
            )

    def check_labels(self, y: Tensor | None, batch: int, allow_null: bool = True) -> None:
        """Raises a ValueError naming what is wrong with a batch of class labels."""
        if self.num_classes == 0:
            if y is not None:
                raise ValueError("this model is unconditional: pass y=None")
            return
        if y is None:
            raise ValueError(
                f"this model is class-conditional: pass labels y of shape ({batch},) "
                f"in 0..{self.num_classes - 1}"
            )
        if not isinstance(y, Tensor):
            raise ValueError(
                f"labels must be an integer tensor of shape ({batch},), got {type(y).__name__}"
            )
        if y.shape != (batch,) or y.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"labels must be an integer tensor of shape ({batch},), got "
                f"{tuple(y.shape)} {y.dtype}"
            )
        top = self.num_classes if allow_null else self.num_classes - 1
        if y.numel() and (y.min() < 0 or y.max() > top):
            raise ValueError(
                f"labels must lie in 0..{top} (index {self.null_class} is the null class), "
                f"got values in {y.min().item()}..{y.max().item()}"
            )

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data → noise. Returns tokens z (B, T, d) and the per-sample log-det SUM (B,)."""
        self.check_images(x)
        self.check_labels(y, x.shape[0])
        tokens, _ = self.patchify(x)
        return self.flow(tokens, y)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute the Transformer layers' activations in the backward pass (see
        :class:`~tarflow.flows.AutoregressiveBlock`) instead of storing them."""
        for block in self.blocks:
            block.activation_checkpointing = enabled

    def log_prob(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Exact log-density log p(x | y) in nats per sample, shape (B,)."""
        z, log_det = self(x, y)
        return self.prior.log_prob(z) + log_det

    def inverse(
        self,
        z: Tensor,
        y: Tensor | None = None,
        guidance: Guidance | None = None,
        solver: Solver | str = "sequential",
    ) -> Tensor:
        """Noise → data: tokens z (B, T, d) to images (B, C, H, W).

        ``solver`` picks how each autoregressive block is inverted, a name from
        :data:`tarflow.sampling.SOLVERS` or a :class:`tarflow.sampling.Solver` with its
        tolerances; ``"selective"`` needs :func:`tarflow.sampling.calibrate` first.
        """
        return self.inverse_with_stats(z, y, guidance, solver)[0]

    def inverse_with_stats(
        self,
        z: Tensor,
        y: Tensor | None = None,
        guidance: Guidance | None = None,
        solver: Solver | str = "sequential",
    ) -> tuple[Tensor, list[SolverStats]]:
        """:meth:`inverse`, also returning what the solver did in each block, in the order
        the blocks are inverted (the block next to the prior first)."""
        solver = Solver.of(solver)
        if z.shape[1:] != self.token_shape:
            raise ValueError(f"z must have shape (B, {self.token_shape}), got {tuple(z.shape)}")
        self.check_labels(y, z.shape[0])
        if guidance is not None and not isinstance(guidance, Guidance):
            raise ValueError(
                f"guidance must be a tarflow.Guidance, e.g. Guidance({guidance!r}), "
                f"got {type(guidance).__name__}"
            )
        if guidance is not None and guidance.weight > 0 and self.num_classes == 0:
            raise ValueError("guidance needs a class-conditional model")
        calibration = self.solver_calibration
        if solver.name == "selective":
            if calibration is None:
                raise ValueError(
                    "solver 'selective' needs a calibration: run "
                    "tarflow.sampling.calibrate(model, ...) or load one with "
                    "tarflow.sampling.load_or_calibrate"
                )
            if len(calibration.choices) != len(self.blocks):
                raise ValueError(
                    f"the calibration holds {len(calibration.choices)} block choices but "
                    f"this model has {len(self.blocks)} blocks"
                )

        stats = []
        for transform in reversed(self.flow.transforms):
            if isinstance(transform, AutoregressiveBlock):
                block_solver = solver
                if solver.name == "selective":
                    assert calibration is not None
                    block_solver = calibration.solver_for(len(stats), solver)
                z, block_stats = invert_block(transform, z, y, guidance, block_solver)
                stats.append(block_stats)
            else:
                z = transform.inverse(z, y)
        return self.patchify.inverse(z), stats

    @torch.no_grad()
    def sample(
        self,
        num: int,
        y: Tensor | None = None,
        temperature: float = 1.0,
        guidance: Guidance | None = None,
        generator: torch.Generator | None = None,
        solver: Solver | str = "sequential",
    ) -> Tensor:
        """Draws ``num`` images: z ~ N(0, temperature² I), then the inverse (noise → data)
        with ``solver`` (see :meth:`inverse`).

        Returns images on the scale the model was trained on (noisy when trained with
        noise augmentation; see :func:`tarflow.sampling.denoise`).
        """
        return self.sample_with_stats(num, y, temperature, guidance, generator, solver)[0]

    @torch.no_grad()
    def sample_with_stats(
        self,
        num: int,
        y: Tensor | None = None,
        temperature: float = 1.0,
        guidance: Guidance | None = None,
        generator: torch.Generator | None = None,
        solver: Solver | str = "sequential",
    ) -> tuple[Tensor, list[SolverStats]]:
        """:meth:`sample`, also returning the per-block solver statistics of
        :meth:`inverse_with_stats`."""
        z = self.prior_noise(num, temperature, generator)
        if y is not None:
            y = y.to(z.device)
        return self.inverse_with_stats(z, y, guidance, solver)

    def prior_noise(
        self, num: int, temperature: float = 1.0, generator: torch.Generator | None = None
    ) -> Tensor:
        """z ~ N(0, temperature² I) of shape (num, T, d), on the model's device and dtype."""
        if isinstance(num, bool) or not isinstance(num, int) or num < 1:
            raise ValueError(f"num must be a positive integer, got {num!r}")
        if not (isinstance(temperature, (int, float)) and 0 < temperature < float("inf")):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        param = next(self.parameters())
        return self.prior.sample(
            (num, *self.token_shape), temperature, generator, param.dtype, param.device
        )
