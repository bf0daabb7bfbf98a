"""The Transformer autoregressive affine block of TARFlow."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from tarflow.flows.base import Transform
from tarflow.nn import KVCache, TransformerLayer
from tarflow.sampling.guidance import Guidance
from tarflow.sampling.solvers import Solver, invert_block


class AutoregressiveBlock(Transform):
    """Affine autoregressive transform of a token sequence, parametrised by a causal
    Transformer (Zhai et al., "Normalizing Flows are Capable Generative Models", 2024).

    For tokens x_0 … x_{T−1} of size d, the Transformer reads the tokens before t (and a
    learned start token, plus the class embedding) and predicts a shift μ_t and a
    log-scale a_t:

    - :meth:`forward`, data → noise: z_t = (x_t − μ_t(x_<t)) · exp(−a_t(x_<t)), all tokens
      in one parallel pass; log|det| = −Σ_t Σ_j a_{t,j} per sample.
    - :meth:`inverse`, noise → data: x_t = z_t · exp(a_t(x_<t)) + μ_t(x_<t), by default
      sequential in t, reusing the keys and values of earlier tokens from a preallocated
      cache; Jacobi-type solvers update many tokens per pass instead.

    The output projection starts at zero, so a new block is the identity. The log-scale
    is bounded softly, a = c·tanh(â/c), so exp(a) cannot overflow. μ and a are computed
    in float32 (or float64 when the input is) even when the Transformer runs in bf16.

    Arguments:
        num_tokens: T.
        token_dim: d.
        width: Transformer width.
        depth: number of Transformer layers.
        heads: attention heads.
        num_classes: number of classes for conditioning, 0 for none. Index
            ``num_classes`` is the null class used by guidance.
        mlp_ratio: MLP widening.
        log_scale_bound: c in the soft clip of a.

    Setting ``activation_checkpointing`` to True makes training passes (with gradients,
    without caches) recompute each Transformer layer's activations during the backward
    pass instead of keeping them: less memory for about one more forward pass.
    """

    def __init__(
        self,
        num_tokens: int,
        token_dim: int,
        width: int,
        depth: int,
        heads: int,
        num_classes: int = 0,
        mlp_ratio: int = 4,
        log_scale_bound: float = 4.0,
    ) -> None:
        super().__init__()
        self.num_tokens, self.token_dim, self.num_classes = num_tokens, token_dim, num_classes
        self.log_scale_bound = log_scale_bound

        self.embed = nn.Linear(token_dim, width)
        self.start = nn.Parameter(0.02 * torch.randn(1, 1, width))
        self.position = nn.Parameter(0.02 * torch.randn(1, num_tokens, width))
        self.class_embedding = nn.Embedding(num_classes + 1, width) if num_classes > 0 else None
        if self.class_embedding is not None:
            nn.init.normal_(self.class_embedding.weight, std=0.02)
        self.layers = nn.ModuleList(
            TransformerLayer(width, heads, mlp_ratio) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 2 * token_dim)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.activation_checkpointing = False

    @property
    def conditioned(self) -> bool:
        return self.class_embedding is not None

    @property
    def null_class(self) -> int:
        return self.num_classes

    def shifted_inputs(self, x: Tensor) -> Tensor:
        """Embedded Transformer inputs for all T positions: the start token, then the
        embeddings of x_0 … x_{T−2}."""
        start = self.start.expand(x.shape[0], -1, -1)
        return torch.cat([start, self.embed(x[:, :-1])], dim=1)

    def predict(
        self,
        inputs: Tensor,
        y: Tensor | None = None,
        offset: int = 0,
        caches: list[KVCache] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """μ and a for the tokens at positions offset … offset+n−1.

        Arguments:
            inputs: embedded Transformer inputs for those positions, (B, n, width).
            y: class labels (B,), or None for an unconditioned block.
            offset: position of the first input.
            caches: one cache per layer holding the positions before ``offset``.

        Returns:
            (μ, a), each (B, n, d), in float32 or wider.
        """
        n = inputs.shape[1]
        h = self.with_label(inputs + self.position[:, offset : offset + n], y)
        recompute = self.activation_checkpointing and caches is None and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            if recompute:
                h = checkpoint(layer, h, use_reentrant=False)
            else:
                h = layer(h, None if caches is None else caches[i])
        return self.affine_parameters(h, inputs.dtype)

    def predict_at(
        self, inputs: Tensor, y: Tensor | None, position: Tensor, caches: list[KVCache]
    ) -> tuple[Tensor, Tensor]:
        """μ and a for the one token at ``position`` (a one-element long tensor) given the
        cached tokens before it, as :meth:`predict` computes them; the shapes do not depend
        on the position, so ``torch.compile`` traces this once for a whole sequence.

        Arguments:
            inputs: the embedded Transformer input for that position, (B, 1, width).
            y: class labels (B,), or None for an unconditioned block.
            position: where the token stands, shape (1,).
            caches: one cache per layer, holding positions 0 … position − 1.
        """
        h = self.with_label(inputs + self.position.index_select(1, position), y)
        for layer, cache in zip(self.layers, caches):
            h = layer(h, cache, position)
        return self.affine_parameters(h, inputs.dtype)

    def with_label(self, h: Tensor, y: Tensor | None) -> Tensor:
        """Adds the class embedding of ``y`` to every position of a conditioned block."""
        if self.class_embedding is None:
            return h
        if y is None:
            raise ValueError("this block is class-conditioned: pass labels y")
        return h + self.class_embedding(y)[:, None]

    def affine_parameters(self, h: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """μ and the bounded log-scale a = c·tanh(â/c) from the last hidden states, in
        float32 or wider (``dtype`` promoted) whatever the Transformer ran in."""
        out = self.head(self.norm(h)).to(torch.promote_types(dtype, torch.float32))
        mu, a = out.chunk(2, dim=-1)
        c = self.log_scale_bound
        return mu, c * torch.tanh(a / c)

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        mu, a = self.predict(self.shifted_inputs(x), y)
        z = (x - mu) * torch.exp(-a)
        return z.to(x.dtype), -a.flatten(1).sum(1).to(x.dtype)

    def new_caches(self, batch: int, dtype: torch.dtype, device: torch.device) -> list[KVCache]:
        """Empty key/value caches, one per layer, for sequences of this block's length."""
        if torch.is_autocast_enabled(device.type):
            dtype = torch.get_autocast_dtype(device.type)
        return [
            KVCache(batch, layer.attn.heads, self.num_tokens, layer.attn.head_dim, dtype, device)
            for layer in self.layers
        ]

    def inverse(
        self,
        z: Tensor,
        y: Tensor | None = None,
        guidance: Guidance | None = None,
        solver: Solver | str = "sequential",
    ) -> Tensor:
        """Noise → data with the chosen solver (see :mod:`tarflow.sampling.solvers`); the
        default decodes one token at a time with cached keys and values.

        With ``guidance`` (conditioned blocks only), the conditional and unconditional
        predictions come from one batch of 2B and are combined per token.
        """
        return invert_block(self, z, y, guidance, solver)[0]
