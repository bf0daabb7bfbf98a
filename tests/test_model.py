"""The assembled image model: inversion, likelihood, sampling and input checks."""

from __future__ import annotations

import pytest
import torch

from randomize import randomize
from tarflow import Guidance, ImageFlow, ImageFlowConfig


def small_model(num_classes: int = 3, dtype=torch.float64) -> ImageFlow:
    config = ImageFlowConfig(
        image_size=4, channels=2, patch_size=2, width=16, heads=2,
        block_depths=[1, 2], num_classes=num_classes,
    )
    return randomize(ImageFlow(config)).to(dtype)


@pytest.mark.parametrize("num_classes", [0, 3])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_model_round_trip(num_classes, dtype, tol):
    model = small_model(num_classes, dtype)
    x = torch.rand(4, 2, 4, 4, dtype=dtype) * 2 - 1
    y = torch.tensor([0, 1, 2, 3]) if num_classes else None  # 3 is the null class
    with torch.no_grad():
        z, _ = model(x, y)
        torch.testing.assert_close(model.inverse(z, y), x, atol=tol, rtol=0)


def test_model_log_det_matches_autograd_jacobian():
    model = small_model()
    x = torch.rand(1, 2, 4, 4, dtype=torch.float64) * 2 - 1
    y = torch.tensor([1])
    _, log_det = model(x, y)
    jacobian = torch.autograd.functional.jacobian(
        lambda v: model(v.view(1, 2, 4, 4), y)[0].flatten(), x.flatten()
    )
    torch.testing.assert_close(log_det[0], torch.linalg.slogdet(jacobian)[1])


def test_log_prob_is_prior_plus_log_det():
    model = small_model()
    x = torch.rand(3, 2, 4, 4, dtype=torch.float64) * 2 - 1
    y = torch.tensor([0, 1, 2])
    z, log_det = model(x, y)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z).flatten(1).sum(1) + log_det
    torch.testing.assert_close(model.log_prob(x, y), expected)


def test_sample_matches_inverse_of_prior_draw():
    model = small_model()
    y = torch.tensor([0, 2])
    x = model.sample(2, y, temperature=0.7, generator=torch.Generator().manual_seed(3))
    z = torch.randn((2, 4, 8), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(x, model.inverse(0.7 * z, y))
    assert x.shape == (2, 2, 4, 4)


def test_guided_sampling_differs_and_is_deterministic():
    model = small_model()
    y = torch.tensor([0, 1])
    plain = model.sample(2, y, generator=torch.Generator().manual_seed(0))
    guided = model.sample(2, y, guidance=Guidance(2.0), generator=torch.Generator().manual_seed(0))
    again = model.sample(2, y, guidance=Guidance(2.0), generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(plain, guided)
    assert torch.equal(guided, again)


@pytest.mark.parametrize(
    "x, y, message",
    [
        (torch.zeros(2, 2, 8, 8), torch.tensor([0, 1]), r"shape \(B, 2, 4, 4\)"),
        (torch.zeros(2, 3, 4, 4), torch.tensor([0, 1]), r"shape \(B, 2, 4, 4\)"),
        (torch.zeros(2, 2, 4), torch.tensor([0, 1]), r"shape \(B, 2, 4, 4\)"),
        (torch.zeros(2, 2, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]), "floating point"),
        (torch.full((2, 2, 4, 4), 200.0), torch.tensor([0, 1]), "scaled to"),
        (torch.full((2, 2, 4, 4), float("nan")), torch.tensor([0, 1]), "NaN or infinite"),
        (torch.full((2, 2, 4, 4), float("inf")), torch.tensor([0, 1]), "NaN or infinite"),
        (torch.zeros(2, 2, 4, 4), torch.tensor([0, 4]), r"labels must lie in 0\.\.3"),
        (torch.zeros(2, 2, 4, 4), torch.tensor([-1, 0]), r"labels must lie in 0\.\.3"),
        (torch.zeros(2, 2, 4, 4), torch.tensor([0.0, 1.0]), "integer tensor"),
        (torch.zeros(2, 2, 4, 4), torch.tensor([0, 1, 2]), "integer tensor of shape"),
        (torch.zeros(2, 2, 4, 4), None, "class-conditional"),
    ],
    ids=[
        "wrong-size", "wrong-channels", "missing-dim", "uint8", "raw-pixels", "nan", "inf",
        "label-too-large", "label-negative", "float-labels", "label-count", "no-labels",
    ],
)
def test_bad_inputs_name_the_problem(x, y, message):
    model = small_model(dtype=torch.float32)
    with pytest.raises(ValueError, match=message):
        model.log_prob(x, y)


def test_unconditional_model_rejects_labels_and_guidance():
    model = small_model(num_classes=0, dtype=torch.float32)
    with pytest.raises(ValueError, match="unconditional"):
        model.log_prob(torch.zeros(1, 2, 4, 4), torch.tensor([0]))
    with pytest.raises(ValueError, match="guidance needs a class-conditional"):
        model.sample(1, guidance=Guidance(1.0))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image_size": 28, "patch_size": 5}, "does not divide"),
        ({"width": 30, "heads": 4}, "not divisible"),
        ({"block_depths": []}, "at least one block"),
        ({"block_depths": [2, 0]}, "at least one block"),
        ({"num_classes": -1}, "num_classes"),
    ],
)
def test_bad_config_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ImageFlowConfig(**kwargs)


def test_bf16_autocast_keeps_flow_arithmetic_in_float32():
    model = small_model(dtype=torch.float32)
    x = torch.rand(2, 2, 4, 4) * 2 - 1
    y = torch.tensor([0, 1])
    with torch.autocast("cpu", torch.bfloat16):
        z, log_det = model(x, y)
        log_p = model.log_prob(x, y)
    assert z.dtype == log_det.dtype == log_p.dtype == torch.float32
    torch.testing.assert_close(log_p, model.log_prob(x, y), atol=0.5, rtol=0.02)


def test_activation_checkpointing_gives_the_same_gradients():
    model = small_model()
    x = torch.rand(4, 2, 4, 4, dtype=torch.float64) * 2 - 1
    y = torch.tensor([0, 1, 2, 3])

    layer = model.blocks[0].layers[0]
    calls = []
    layer.register_forward_pre_hook(lambda *_: calls.append(1))

    def gradients():
        calls.clear()
        model.zero_grad()
        model.log_prob(x, y).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = gradients()
    assert len(calls) == 1
    model.set_activation_checkpointing(True)
    recomputed = gradients()
    assert len(calls) == 2  # once forward, once again in the backward pass
    for a, b in zip(plain, recomputed):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # sampling is unaffected
        z, _ = model(x, y)
        torch.testing.assert_close(model.inverse(z, y), x, atol=1e-9, rtol=0)


def test_api_misuse_is_named():
    model = small_model(dtype=torch.float32)
    x = torch.zeros(2, 2, 4, 4)
    with pytest.raises(ValueError, match="float64 but the model's weights are torch.float32"):
        model.log_prob(x.double(), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="integer tensor"):
        model.log_prob(x, [0, 1])
    with pytest.raises(ValueError, match="empty"):
        model.log_prob(x[:0], torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="num must be a positive integer"):
        model.sample(0, torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="temperature must be"):
        model.sample(1, torch.tensor([0]), temperature=float("nan"))
    with pytest.raises(ValueError, match=r"Guidance\(2.0\)"):
        model.sample(1, torch.tensor([0]), guidance=2.0)


@pytest.mark.parametrize(
    "kwargs", [{"heads": 0}, {"width": 0}, {"mlp_ratio": 0}, {"log_scale_bound": float("inf")}]
)
def test_degenerate_model_shapes_are_rejected(kwargs):
    with pytest.raises(ValueError, match="model\\."):
        ImageFlowConfig(**kwargs)


def test_denoising_far_out_samples_does_not_fail():
    # Strong guidance can push samples far outside [-1, 1]; the score step clips them to
    # where noisy data lies instead of rejecting them as raw pixels.
    from tarflow.sampling.denoise import tweedie_denoise

    model = small_model(dtype=torch.float32)
    x = torch.full((2, 2, 4, 4), 11.2)
    out = tweedie_denoise(model, x, 0.2, torch.tensor([0, 1]))
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        tweedie_denoise(model, x, -0.1, torch.tensor([0, 1]))
