"""Every transform: exact inversion, log-det against the autograd Jacobian, causality."""

from __future__ import annotations

import pytest
import torch

from randomize import randomize
from tarflow.flows import (
    AutoregressiveBlock,
    FlowSequence,
    Patchify,
    StandardGaussian,
    TokenPermutation,
)
from tarflow.sampling.guidance import Guidance

T, D = 5, 3


def make_block(num_classes: int = 0, depth: int = 2) -> AutoregressiveBlock:
    block = AutoregressiveBlock(T, D, width=16, depth=depth, heads=2, num_classes=num_classes)
    return randomize(block)


# name -> (transform factory, input shape, conditioned)
TRANSFORMS = {
    "patchify": (lambda: Patchify(2, 4, 6, 2), (2, 4, 6), False),
    "permutation-raster": (lambda: TokenPermutation(T, "raster"), (T, D), False),
    "permutation-reversed": (lambda: TokenPermutation(T, "reversed"), (T, D), False),
    "autoregressive": (lambda: make_block(), (T, D), False),
    "autoregressive-conditioned": (lambda: make_block(num_classes=3), (T, D), True),
    "sequence": (
        lambda: FlowSequence(
            [make_block(3), TokenPermutation(T, "reversed"), make_block(3, depth=1)]
        ),
        (T, D),
        True,
    ),
}


def inputs(shape, batch, dtype, conditioned):
    x = torch.randn(batch, *shape, dtype=dtype)
    y = torch.tensor([0, 2, 1, 3][:batch]) if conditioned else None
    return x, y


@pytest.mark.parametrize("name", TRANSFORMS)
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_round_trip(name, dtype, tol):
    factory, shape, conditioned = TRANSFORMS[name]
    transform = factory().to(dtype)
    x, y = inputs(shape, 4, dtype, conditioned)
    with torch.no_grad():
        z, log_det = transform(x, y)
        x_back = transform.inverse(z, y)
    assert log_det.shape == (4,)
    assert z.dtype == dtype and log_det.dtype == dtype
    torch.testing.assert_close(x_back, x, atol=tol, rtol=0)


@pytest.mark.parametrize("name", TRANSFORMS)
def test_log_det_matches_autograd_jacobian(name):
    factory, shape, conditioned = TRANSFORMS[name]
    transform = factory().double()
    x, y = inputs(shape, 3, torch.float64, conditioned)
    _, log_det = transform(x, y)
    for i in range(x.shape[0]):
        yi = None if y is None else y[i : i + 1]

        def f(flat, yi=yi):
            return transform(flat.view(1, *shape), yi)[0].flatten()

        jacobian = torch.autograd.functional.jacobian(f, x[i].flatten())
        _, expected = torch.linalg.slogdet(jacobian)
        torch.testing.assert_close(log_det[i], expected, atol=1e-9, rtol=1e-9)


def test_new_block_is_identity():
    block = AutoregressiveBlock(T, D, width=16, depth=1, heads=2)
    x = torch.randn(2, T, D)
    z, log_det = block(x)
    assert torch.equal(z, x)
    assert torch.equal(log_det, torch.zeros(2))


@pytest.mark.parametrize("t", range(T))
def test_autoregressive_block_is_causal(t):
    block = make_block(num_classes=3).double()
    x = torch.randn(2, T, D, dtype=torch.float64)
    y = torch.tensor([1, 2])
    changed = x.clone()
    changed[:, t:] = torch.randn(2, T - t, D, dtype=torch.float64)
    mu, a = block.predict(block.shifted_inputs(x), y)
    mu2, a2 = block.predict(block.shifted_inputs(changed), y)
    # Parameters of token t depend on tokens before t only.
    torch.testing.assert_close(mu[:, : t + 1], mu2[:, : t + 1], atol=1e-12, rtol=0)
    torch.testing.assert_close(a[:, : t + 1], a2[:, : t + 1], atol=1e-12, rtol=0)
    z, _ = block(x, y)
    z2, _ = block(changed, y)
    torch.testing.assert_close(z[:, :t], z2[:, :t], atol=1e-12, rtol=0)
    if t < T - 1:
        assert not torch.allclose(mu[:, t + 1 :], mu2[:, t + 1 :])


def recomputing_inverse(block, z, y=None, guidance=None):
    """The plain inverse: every step reruns the Transformer over the whole prefix, with
    the unconditional branch as a separate pass."""
    x = torch.zeros_like(z)
    for t in range(z.shape[1]):
        mu, a = block.predict(block.shifted_inputs(x), y)
        mu, a = mu[:, t : t + 1], a[:, t : t + 1]
        if guidance is not None:
            null = torch.full_like(y, block.null_class)
            mu_u, a_u = block.predict(block.shifted_inputs(x), null)
            w = guidance.weight_at(torch.tensor([t]), z.shape[1]).double()
            mu, a = guidance.combine(mu, a, mu_u[:, t : t + 1], a_u[:, t : t + 1], w)
        x[:, t : t + 1] = z[:, t : t + 1] * torch.exp(a) + mu
    return x


@pytest.mark.parametrize("num_classes", [0, 3])
def test_cached_inverse_equals_recomputing_inverse(num_classes):
    block = make_block(num_classes).double()
    z = torch.randn(3, T, D, dtype=torch.float64)
    y = torch.tensor([0, 1, 2]) if num_classes else None
    with torch.no_grad():
        torch.testing.assert_close(
            block.inverse(z, y), recomputing_inverse(block, z, y), atol=1e-12, rtol=0
        )


@pytest.mark.parametrize("rule", ["extrapolate", "density_ratio"])
@pytest.mark.parametrize("ramp", [False, True])
def test_guided_batched_inverse_equals_two_pass_inverse(rule, ramp):
    block = make_block(num_classes=3).double()
    z = torch.randn(3, T, D, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    guidance = Guidance(1.5, rule, ramp)
    with torch.no_grad():
        guided = block.inverse(z, y, guidance)
        torch.testing.assert_close(
            guided, recomputing_inverse(block, z, y, guidance), atol=1e-12, rtol=0
        )
        assert not torch.allclose(guided, block.inverse(z, y))


def test_guidance_weight_zero_is_unguided():
    block = make_block(num_classes=3).double()
    z = torch.randn(2, T, D, dtype=torch.float64)
    y = torch.tensor([0, 1])
    with torch.no_grad():
        torch.testing.assert_close(block.inverse(z, y, Guidance(0.0)), block.inverse(z, y))


def test_standard_gaussian_log_prob():
    z = torch.tensor([[0.0, 1.0], [2.0, -1.0]], dtype=torch.float64)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)
    torch.testing.assert_close(StandardGaussian().log_prob(z), expected)


def test_patchify_layout():
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).view(1, 2, 4, 4)
    tokens, _ = Patchify(2, 4, 4, 2)(x)
    # First token: the top-left 2x2 patch of channel 0, then of channel 1.
    assert tokens[0, 0].tolist() == [0, 1, 4, 5, 16, 17, 20, 21]
    assert tokens.shape == (1, 4, 8)


def test_bad_construction_arguments():
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        Patchify(1, 6, 6, 4)
    with pytest.raises(ValueError, match="unknown token order"):
        TokenPermutation(4, "zigzag")
    with pytest.raises(ValueError, match="divisible by heads"):
        AutoregressiveBlock(4, 2, width=10, depth=1, heads=3)
