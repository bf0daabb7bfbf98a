"""Data-parallel training: the same run on 1 and 2 processes, and resume across them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distributed_run import train_in_processes
from tarflow.config import load_config
from tarflow.train import load_run, train
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


def test_global_batch_must_divide_by_the_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="divisible by the number of processes 3"):
        train(load_config(TINY, SETTINGS), tmp_path, progress=False)


def test_shards_are_contiguous_and_cover_the_batch():
    batch = torch.arange(8)
    parts = [shard(batch, rank, 4) for rank in range(4)]
    assert torch.equal(torch.cat(parts), batch) and parts[1].tolist() == [2, 3]
    assert shard(None, 1, 4) is None
