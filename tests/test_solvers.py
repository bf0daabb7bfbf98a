"""Inverse solvers: every solver against the sequential inverse, per-sample convergence,
calibration of the selective solver, and the errors for bad settings."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch

from randomize import randomize
from tarflow import ImageFlow, ImageFlowConfig
from tarflow.cli import main
from tarflow.config import load_config
from tarflow.flows import AutoregressiveBlock
from tarflow.sampling import (
    Calibration,
    Guidance,
    Solver,
    calibrate,
    invert_block,
    load_or_calibrate,
    tweedie_denoise,
)
from tarflow.sampling import solvers as solvers_module
from tarflow.train.checkpoint import save_checkpoint

T, D = 12, 3
EXACT = 1e-10


@pytest.fixture(autouse=True)
def _one_thread():
    # The models here are tiny: a second thread adds synchronisation, not speed.
    torch.set_num_threads(1)


# name -> (labels, guidance); the null class of the 3-class block is 3.
CONDITIONS = {
    "unconditioned": (None, None),
    "conditioned": ([0, 1, 2, 1], None),
    "extrapolate-ramp": ([0, 1, 2, 1], Guidance(1.5, "extrapolate", ramp=True)),
    "density-ratio": ([0, 1, 2, 1], Guidance(1.5, "density_ratio")),
}

SOLVERS = {
    "jacobi": Solver("jacobi", tol=1e-12),
    # 12 tokens in chunks of 5, 5, 2.
    "gs-jacobi": Solver("gs-jacobi", tol=1e-12, chunk_size=5),
    "gs-jacobi-single-token-chunks": Solver("gs-jacobi", tol=1e-12, chunk_size=1),
}


def make_block(num_classes: int = 3, scale: float = 0.1) -> AutoregressiveBlock:
    block = AutoregressiveBlock(T, D, width=16, depth=2, heads=2, num_classes=num_classes)
    return randomize(block, scale).double()


def condition(name: str) -> tuple[AutoregressiveBlock, torch.Tensor | None, Guidance | None]:
    labels, guidance = CONDITIONS[name]
    block = make_block(num_classes=0 if labels is None else 3)
    return block, None if labels is None else torch.tensor(labels), guidance


def small_model(num_classes: int = 3) -> ImageFlow:
    config = ImageFlowConfig(
        image_size=8,
        channels=1,
        patch_size=2,
        width=16,
        heads=2,
        block_depths=[1, 1, 1],
        num_classes=num_classes,
    )
    return randomize(ImageFlow(config)).double().eval()


@pytest.mark.parametrize("condition_name", CONDITIONS)
@pytest.mark.parametrize("solver_name", SOLVERS)
@torch.no_grad()
def test_solver_reproduces_sequential(solver_name, condition_name):
    block, y, guidance = condition(condition_name)
    z = torch.randn(4, T, D, dtype=torch.float64)
    expected, _ = invert_block(block, z, y, guidance, "sequential")
    x, stats = invert_block(block, z, y, guidance, SOLVERS[solver_name])
    torch.testing.assert_close(x, expected, atol=1e-9, rtol=0)
    assert stats.iterations.shape == (math.ceil(T / stats.chunk_size), 4)
    assert stats.passes == stats.iterations.max(1).values.sum()


@pytest.mark.parametrize("condition_name", CONDITIONS)
@torch.no_grad()
def test_sequential_solver_is_the_block_inverse(condition_name):
    block, y, guidance = condition(condition_name)
    x = torch.randn(3, T, D, dtype=torch.float64)
    y = None if y is None else y[:3]
    z, _ = block(x, y)
    torch.testing.assert_close(block.inverse(z, y, solver="sequential"), x, atol=1e-12, rtol=0)
    _, stats = invert_block(block, z, y, guidance)
    assert stats.solver == "sequential" and stats.passes == T
    assert stats.iterations.tolist() == [[1] * 3] * T


@pytest.mark.parametrize("condition_name", ["conditioned", "density-ratio"])
@torch.no_grad()
def test_jacobi_is_exact_after_T_iterations_and_not_after_one(condition_name):
    block, y, guidance = condition(condition_name)
    z = torch.randn(4, T, D, dtype=torch.float64)
    expected, _ = invert_block(block, z, y, guidance)

    exact, stats = invert_block(block, z, y, guidance, Solver("jacobi", tol=0.0, max_iters=T))
    torch.testing.assert_close(exact, expected, atol=EXACT, rtol=0)
    assert stats.passes == T

    one, stats = invert_block(block, z, y, guidance, Solver("jacobi", tol=0.0, max_iters=1))
    assert stats.passes == 1
    # One pass makes the first token exact and leaves the others wrong.
    torch.testing.assert_close(one[:, 0], expected[:, 0], atol=EXACT, rtol=0)
    assert (one - expected).abs().max() > 1e-3


def easy_and_hard_block() -> AutoregressiveBlock:
    """A block whose class 0 and null class have embeddings so large that, after the
    layer norms, their predictions hardly depend on the tokens: Jacobi settles in two
    iterations for class 0 (guided or not), while class 1 needs many."""
    block = make_block(scale=0.3)
    with torch.no_grad():
        for label in (0, block.null_class):
            block.class_embedding.weight[label] *= 1e10
    return block


@pytest.mark.parametrize("guidance", [None, Guidance(1.0, "density_ratio", ramp=True)])
@pytest.mark.parametrize(
    "solver", [Solver("jacobi", tol=1e-7), Solver("gs-jacobi", tol=1e-7, chunk_size=6)]
)
@torch.no_grad()
def test_converged_samples_stop_early(solver, guidance):
    block = easy_and_hard_block()
    y = torch.tensor([0, 1, 0, 1])
    z = torch.randn(4, T, D, dtype=torch.float64)
    expected, _ = invert_block(block, z, y, guidance)
    x, stats = invert_block(block, z, y, guidance, solver)

    torch.testing.assert_close(x, expected, atol=1e-5, rtol=0)
    per_chunk = stats.iterations
    assert (per_chunk[:, [0, 2]] == 2).all(), per_chunk
    assert (per_chunk[:, [1, 3]] > 2).all(), per_chunk
    # The easy samples left the batch, so later passes ran on fewer rows.
    rows = 2 if guidance else 1
    assert stats.token_rows < stats.passes * rows * 4 * stats.chunk_size


@pytest.mark.parametrize("guidance", [None, Guidance(2.0, "extrapolate", ramp=True)])
@torch.no_grad()
def test_selective_calibrates_and_matches_sequential(tmp_path, guidance):
    model = small_model()
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    z = torch.randn(6, *model.token_shape, dtype=torch.float64)
    with pytest.raises(ValueError, match="needs a calibration"):
        model.inverse(z, y, solver="selective")

    solver = Solver("selective", tol=1e-12, chunk_size=5)
    calibration = calibrate(model, 6, y, guidance, solver, chunk_sizes=[5, 8], repeats=1)
    assert model.solver_calibration is calibration
    assert len(calibration.choices) == len(model.blocks) == 3
    for choice in calibration.choices:
        assert set(choice.seconds) == {"sequential", "jacobi", "gs-jacobi/5", "gs-jacobi/8"}
        key = choice.solver
        if key == "gs-jacobi":
            key = f"gs-jacobi/{choice.chunk_size}"
        assert choice.seconds[key] == min(choice.seconds.values())

    expected = model.inverse(z, y, guidance)
    x, stats = model.inverse_with_stats(z, y, guidance, solver)
    torch.testing.assert_close(x, expected, atol=1e-9, rtol=0)
    assert [s.solver for s in stats] == [c.solver for c in calibration.choices]

    path = tmp_path / "solver-calibration.json"
    calibration.save(path)
    assert Calibration.load(path) == calibration
    fresh = small_model()
    assert load_or_calibrate(fresh, path, 6, y, guidance, solver, [5, 8]) == calibration
    assert fresh.solver_calibration == calibration


@pytest.mark.parametrize("solver", ["jacobi", "gs-jacobi"])
def test_sample_and_denoise_after_solver(solver):
    model = small_model()
    y = torch.tensor([0, 2])
    expected = model.sample(2, y, generator=torch.Generator().manual_seed(1))
    x = model.sample(
        2, y, generator=torch.Generator().manual_seed(1), solver=Solver(solver, 1e-12, None, 5)
    )
    torch.testing.assert_close(x, expected, atol=1e-9, rtol=0)
    denoised = tweedie_denoise(model, x, 0.1, y)
    torch.testing.assert_close(denoised, tweedie_denoise(model, expected, 0.1, y))


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"name": "newton"}, r"unknown solver 'newton'; choose one of \('sequential', "),
        ({"name": "jacobi", "tol": -1e-3}, r"tolerance must be a finite number in \[0, 1\)"),
        ({"name": "jacobi", "tol": float("nan")}, "tolerance must be a finite number"),
        ({"name": "jacobi", "tol": float("inf")}, "tolerance must be a finite number"),
        ({"name": "jacobi", "tol": 1.0}, "tolerance must be a finite number"),
        ({"name": "jacobi", "max_iters": 0}, "max_iters must be None or an integer >= 1"),
        ({"name": "gs-jacobi", "chunk_size": 0}, "chunk_size must be an integer >= 1"),
    ],
)
def test_bad_solver_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        Solver(**settings)


def test_bad_solver_names_in_calls():
    model = small_model()
    z = torch.randn(1, *model.token_shape, dtype=torch.float64)
    y = torch.tensor([1])
    with pytest.raises(ValueError, match="unknown solver 'fast'"):
        model.inverse(z, y, solver="fast")
    with pytest.raises(ValueError, match="chooses per block of a calibrated model"):
        invert_block(model.blocks[0], z, y, solver="selective")


def test_cli_sample_with_solvers(tmp_path, capsys):
    config = load_config(Path(__file__).parent.parent / "configs" / "digits_tiny.yaml")
    model = randomize(ImageFlow(config.model), scale=0.01)
    save_checkpoint(tmp_path / "run", 1, config, model, model, {})
    run = str(tmp_path / "run")

    args = [
        "sample",
        run,
        "--num",
        "10",
        "--solver",
        "selective",
        "--chunk-size",
        "5",
        "--out",
        str(tmp_path / "selective.png"),
        "--guidance",
        "1",
    ]
    assert main(args) == 0
    assert Calibration.load(tmp_path / "run" / "solver-calibration.json").batch_size == 10

    assert main(["sample", run, "--solver", "jacobi", "--tol", "-1"]) == 2
    assert "tolerance must be a finite number in [0, 1)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sample", run, "--solver", "newton"])
    assert "invalid choice: 'newton'" in capsys.readouterr().err


@pytest.mark.skipif(not torch._dynamo.is_dynamo_supported(), reason="no torch.compile here")
@pytest.mark.parametrize("solver", ["sequential", "gs-jacobi"])
@torch.no_grad()
def test_compiled_sampling_matches_eager(solver, monkeypatch):
    # aot_eager traces and runs the same graph machinery as the default compiler, without
    # the C++ build (the default compiler runs in the slow training test).
    monkeypatch.setattr(solvers_module, "_compiled", None)
    monkeypatch.setattr(solvers_module, "_compiled_step", None)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    model = small_model()
    y, guidance = torch.tensor([0, 1, 2, 1]), Guidance(1.5)
    z = model.prior_noise(4, generator=torch.Generator().manual_seed(0))
    eager = model.inverse(z, y, guidance, Solver(solver, chunk_size=4))
    compiled = model.inverse(z, y, guidance, Solver(solver, chunk_size=4, compile=True))
    torch.testing.assert_close(compiled, eager, rtol=0, atol=EXACT)
    used = solvers_module._compiled_step if solver == "sequential" else solvers_module._compiled
    assert used is not None


@pytest.mark.parametrize("condition_name", ["unconditioned", "conditioned"])
@torch.no_grad()
def test_step_at_a_position_matches_predict(condition_name):
    """The static-shape step (whole cache, masked) gives predict's μ and a at every
    position, whatever the unused tail of the cache holds."""
    block, y, _ = condition(condition_name)
    x = torch.randn(4, T, D, dtype=torch.float64)
    inputs = block.shifted_inputs(x)
    mu, a = block.predict(inputs, y)
    caches = block.new_caches(4, torch.float64, x.device)
    for cache in caches:
        cache.keys.fill_(1e6)
        cache.values.fill_(-1e6)
    for t in range(T):
        position = torch.tensor([t])
        mu_t, a_t = block.predict_at(inputs[:, t : t + 1], y, position, caches)
        torch.testing.assert_close(mu_t, mu[:, t : t + 1], rtol=0, atol=EXACT)
        torch.testing.assert_close(a_t, a[:, t : t + 1], rtol=0, atol=EXACT)
