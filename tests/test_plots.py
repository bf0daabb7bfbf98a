"""Figures: training curves, guidance sweeps, and sample grids saved during training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from tarflow.cli import main
from tarflow.config import load_config
from tarflow.evaluate.samples import draw_samples, save_checkpoint_samples
from tarflow.plots import plot_guidance_sweep, plot_training_curves, read_metrics
from tarflow.train import train

TINY = Path(__file__).parent.parent / "configs" / "digits_tiny.yaml"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    config = load_config(
        TINY, ["train.steps=10", "train.checkpoint_every=10", "train.log_every=2"]
    )
    out = tmp_path_factory.mktemp("run") / "tiny"
    model = train(config, out, progress=False)
    return out, config, model


def sweep_report(weights):
    rows = []
    for w in weights:
        metrics = {
            "fd": {"fd": 10 / (1 + w), "num_samples": 50, "num_reference": 297, "seconds": 0.1},
            "pr": {
                "precision": 0.5,
                "recall": 0.4,
                "num_samples": 50,
                "num_reference": 50,
                "seconds": 0.1,
            },
            "accuracy": {"accuracy": w / 4, "num_samples": 50, "seconds": 0.1},
        }
        sampling = {"guidance": w, "guidance_rule": "extrapolate", "seconds": 1.0}
        rows.append({"guidance": w, "sampling": sampling, "metrics": metrics})
    return {
        "run": "runs/x",
        "checkpoint": "step-00000010",
        "split": "test",
        "metrics": {},
        "sweep": rows,
    }


def test_training_curves_png(tiny):
    run_dir, _, _ = tiny
    path = plot_training_curves(run_dir)
    assert path == run_dir / "training-curves.png"
    width, height = Image.open(path).size
    assert width > 600 and height > 300
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [2, 4, 6, 8, 10]


def test_training_curves_refuse_missing_or_empty_metrics(tmp_path):
    with pytest.raises(FileNotFoundError, match="train the run first"):
        plot_training_curves(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="no metric records"):
        plot_training_curves(tmp_path)


def test_guidance_sweep_png(tmp_path):
    path = plot_guidance_sweep(sweep_report([0, 0.5, 1, 2, 3]), tmp_path / "sweep.png")
    assert Image.open(path).size[0] > 600
    with pytest.raises(ValueError, match="no guidance sweep"):
        plot_guidance_sweep({"metrics": {}}, tmp_path / "none.png")


def test_plot_command_redraws_a_saved_sweep(tiny, capsys):
    run_dir, _, _ = tiny
    (run_dir / "guidance-sweep-train.json").write_text(json.dumps(sweep_report([0, 1])))
    assert main(["plot", str(run_dir), "--split", "train"]) == 0
    assert (run_dir / "guidance-sweep-train.png").is_file()
    assert "training-curves.png" in capsys.readouterr().out


def test_checkpoint_samples_leave_training_state_alone(tiny):
    run_dir, config, model = tiny
    model.train()
    rng = torch.get_rng_state()
    path = save_checkpoint_samples(model, config, run_dir, 10, per_class=3)
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training
    assert path == run_dir / "samples" / "step-00000010.png"
    assert Image.open(path).size == (3 * 18 + 2, 10 * 18 + 2)  # 8x8 images scaled by 2


def test_draw_samples_are_seeded_and_in_range(tiny):
    _, _, model = tiny
    a, labels = draw_samples(model, 12, sigma=0.1, seed=3, batch_size=5)
    b, _ = draw_samples(model, 12, sigma=0.1, seed=3, batch_size=5)
    assert torch.equal(a, b) and a.abs().max() <= 1
    assert labels.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    with pytest.raises(ValueError, match="temperature"):
        draw_samples(model, 4, temperature=0)
    # A regression: draws kept the autograd graph of every batch until the end.
    undenoised, _ = draw_samples(model, 12, sigma=0.0, seed=3, batch_size=5)
    assert not undenoised.requires_grad and undenoised.grad_fn is None
