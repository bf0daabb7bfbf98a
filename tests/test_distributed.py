"""Several processes: data-parallel and sharded training give the run of one process and
resume across process counts and layouts; sampling and bits/dim shared between processes
give the results of one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distributed_run import (
    cli_in_processes,
    failing_main_process,
    run_in_processes,
    train_in_processes,
)
from tarflow.cli import main as cli
from tarflow.config import load_config
from tarflow.train import load_run, train
from tarflow.train.checkpoint import latest_checkpoint
from tarflow.train.trainer import shard

TINY = Path(__file__).parent.parent / "configs" / "digits_tiny.yaml"
SETTINGS = [
    "train.steps=6",
    "train.checkpoint_every=100",
    "train.checkpoint_samples=0",
    "train.threads=1",
    "train.device=cpu",
]


def test_two_processes_match_one_and_resume_on_either(tmp_path):
    config = load_config(TINY, SETTINGS)
    train(config, tmp_path / "one", progress=False)

    # 1 process to step 2, 2 processes to step 4, 1 process to the end.
    run = tmp_path / "mixed"
    train(config, run, progress=False, stop_at=2)
    train_in_processes(2, config, run, resume=True, stop_at=4)
    assert load_run(run).state["step"] == 4
    train(config, run, resume=True, progress=False)

    one, mixed = load_run(tmp_path / "one"), load_run(run)
    assert mixed.state["step"] == 6
    for a, b in [(one.model, mixed.model), (one.ema_model, mixed.ema_model)]:
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(q, p, rtol=0, atol=1e-5, msg=name)


def assert_same_weights(a, b, atol=1e-5):
    for x, y in [(a.model, b.model), (a.ema_model, b.ema_model)]:
        for (name, p), q in zip(x.state_dict().items(), y.state_dict().values()):
            torch.testing.assert_close(q, p, rtol=0, atol=atol, msg=name)


def test_sharded_training_matches_one_process_across_layouts(tmp_path):
    """FSDP on 2 processes → FSDP layout in 1 process → DDP on 2 → FSDP on 2, checkpoint
    samples drawn at every stop; the weights equal an uninterrupted one-process run."""
    whole = load_config(TINY, SETTINGS)
    sharded = load_config(TINY, [*SETTINGS, "train.strategy=fsdp", "train.checkpoint_samples=1"])
    train(whole, tmp_path / "one", progress=False)

    run = tmp_path / "mixed"
    train_in_processes(2, sharded, run, stop_at=2)
    shards = sorted(p.name for p in (latest_checkpoint(run) / "sharded").glob("*.distcp"))
    assert len(shards) == 2 and not (latest_checkpoint(run) / "model.safetensors").exists()
    train(sharded, run, resume=True, progress=False, stop_at=4)
    assert len(list((latest_checkpoint(run) / "sharded").glob("*.distcp"))) == 1
    whole.train.checkpoint_samples = 1  # a regression: rank 0 drew the grid alone and hung
    train_in_processes(2, whole, run, resume=True, stop_at=5)
    assert (latest_checkpoint(run) / "model.safetensors").is_file()
    train_in_processes(2, sharded, run, resume=True)

    mixed = load_run(run)
    assert mixed.state["step"] == 6
    assert sorted(p.name for p in (run / "samples").iterdir())[-1] == "step-00000006.png"
    assert_same_weights(load_run(tmp_path / "one"), mixed)


def test_sampling_and_bits_per_dim_shared_between_processes(tmp_path):
    config = load_config(TINY, SETTINGS)
    run = tmp_path / "run"
    train(config, run, progress=False)
    common = ["--device", "cpu", "--no-progress"]

    assert cli(["eval", str(run), "--batch-size", "50", *common[:2]]) == 0
    one = json.loads((run / "eval-test.json").read_text())
    cli_in_processes(2, ["eval", str(run), "--batch-size", "50", *common[:2]])
    two = json.loads((run / "eval-test.json").read_text())
    assert two["num_images"] == one["num_images"] == 297
    assert two["bits_per_dim"] == pytest.approx(one["bits_per_dim"], abs=1e-12)

    assert (
        cli(["sample", str(run), "--num", "30", "--out", str(tmp_path / "1.png"), *common[:2]])
        == 0
    )
    cli_in_processes(
        2, ["sample", str(run), "--num", "30", "--out", str(tmp_path / "2.png"), *common[:2]]
    )
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=float) for n in (1, 2))
    assert a.shape == b.shape and np.abs(a - b).max() <= 1  # rounding of a last float bit

    # Sample metrics: the draws are shared, rank 0 scores them; the same table either way.
    args = ["eval", str(run), "--metrics", "pr", "--num-samples", "40", *common]
    assert cli(args) == 0
    one = json.loads((run / "metrics-test.json").read_text())["metrics"]["pr"]
    cli_in_processes(2, args)
    two = json.loads((run / "metrics-test.json").read_text())["metrics"]["pr"]
    assert (two["precision"], two["recall"]) == (one["precision"], one["recall"])

    # The selective solver: rank 0 calibrates and every process uses its choice.
    out = tmp_path / "selective.png"
    cli_in_processes(
        2,
        [
            "sample",
            str(run),
            "--num",
            "30",
            "--solver",
            "selective",
            "--out",
            str(out),
            *common[:2],
        ],
    )
    c = np.asarray(Image.open(out), dtype=float)
    assert (run / "solver-calibration.json").is_file() and np.abs(c - a).max() <= 2


def test_a_failure_in_rank_0_stops_every_process(tmp_path):
    run_in_processes(2, failing_main_process, tmp_path)
    assert (tmp_path / "rank0.txt").read_text() == "OSError: disk full"
    assert "rank 0 failed" in (tmp_path / "rank1.txt").read_text()
    assert "disk full" in (tmp_path / "rank1.txt").read_text()


def test_global_batch_must_divide_by_the_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="divisible by the number of processes 3"):
        train(load_config(TINY, SETTINGS), tmp_path, progress=False)


def test_shards_are_contiguous_and_cover_the_batch():
    batch = torch.arange(8)
    parts = [shard(batch, rank, 4) for rank in range(4)]
    assert torch.equal(torch.cat(parts), batch) and parts[1].tolist() == [2, 3]
    assert shard(None, 1, 4) is None
