"""The command line, end to end on the tiny digits config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

import tarflow
from tarflow.cli import main

TINY = str(Path(__file__).parent.parent / "configs" / "digits_tiny.yaml")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "tiny"
    assert main(["train", "--config", TINY, "--out", str(out), "--no-progress"]) == 0
    return out


def test_train_writes_run(run_dir):
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-00000040"
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    record = json.loads(lines[-1])
    assert record["step"] == 40
    assert {"loss", "bits_per_dim", "lr", "grad_norm", "images_per_sec"} <= set(record)
    grids = sorted(p.name for p in (run_dir / "samples").iterdir())
    assert grids == ["step-00000020.png", "step-00000040.png"]


def test_sample_grid_one_row_per_class(run_dir, tmp_path):
    out = tmp_path / "grid.png"
    args = ["sample", str(run_dir), "--num", "20", "--out", str(out), "--guidance", "1.5"]
    assert main(args) == 0
    # 10 rows of 2 images, 8x8 scaled by 2 with 2-pixel padding.
    assert Image.open(out).size == (2 * 18 + 2, 10 * 18 + 2)


def test_sample_one_label(run_dir, tmp_path):
    out = tmp_path / "sevens.png"
    assert main(["sample", str(run_dir), "--num", "4", "--label", "7", "--out", str(out),
                 "--no-denoise", "--temperature", "0.8"]) == 0
    assert Image.open(out).size == (2 * 18 + 2, 2 * 18 + 2)


def test_eval_prints_bits_per_dim(run_dir, capsys):
    assert main(["eval", str(run_dir), "--limit", "50", "--draws", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["num_images"] == 50 and result["draws"] == 2
    assert 0 < result["bits_per_dim"] < 16
    assert json.loads((run_dir / "eval-test.json").read_text()) == result


@pytest.mark.parametrize(
    "args, message",
    [
        (["sample", "{run}", "--label", "10"], "out of range"),
        (["sample", "{run}", "--num", "0"], "--num must be >= 1"),
        (["sample", "{missing}"], "has no checkpoint"),
        (["eval", "{run}", "--limit", "0"], "--limit must be >= 1"),
        (["eval", "{run}", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["eval", "{run}", "--metrics", ""], "unknown metric"),
        (["train", "--config", "{run}", "--out", "{missing}"], "is a directory"),
        (["train", "--config", "{missing}/c.yaml", "--out", "{missing}"], "does not exist"),
        (["train", "--config", TINY, "--out", "{missing}", "--set", "train.bogus=1"],
         "unknown config key"),
        (["train", "--config", TINY, "--out", "{run}"], "--resume"),
    ],
)
def test_errors_exit_2_with_a_message(run_dir, tmp_path, capsys, args, message):
    args = [a.format(run=run_dir, missing=tmp_path / "missing") for a in args]
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"tarflow {tarflow.__version__}"


def test_eval_metrics_of_an_unconditional_run(tmp_path, capsys):
    # The default sample metrics used to include accuracy, which fails without classes.
    out = tmp_path / "unconditional"
    settings = ["--set", "model.num_classes=0", "--set", "train.steps=2", "--no-progress"]
    assert main(["train", "--config", TINY, "--out", str(out), *settings]) == 0
    args = ["eval", str(out), "--num-samples", "20", "--sweep-guidance", "0,0", "--no-progress"]
    assert main(args) == 0
    report = json.loads((out / "guidance-sweep-test.json").read_text())
    assert [set(row["metrics"]) for row in report["sweep"]] == [{"fd", "pr"}] * 2
    assert main([*args[:4], "--sweep-guidance", "0,1"]) == 2
    assert "guidance needs a class-conditional model" in capsys.readouterr().err
