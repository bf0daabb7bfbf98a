"""Training: exact resume, atomic checkpoints, strict loading, clear failures."""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tarflow.config import load_config
from tarflow.models.image_flow import ImageFlow
from tarflow.train import DivergenceError, load_run, train
from tarflow.train import checkpoint as checkpoint_module
from tarflow.train.checkpoint import CheckpointError, latest_checkpoint
from tarflow.train.schedule import warmup_cosine
from tarflow.train.trainer import LogLikelihood

TINY = Path(__file__).parent.parent / "configs" / "digits_tiny.yaml"


def tiny_config(**train_overrides):
    overrides = [f"train.{k}={v}" for k, v in train_overrides.items()]
    return load_config(TINY, ["train.steps=8", "train.checkpoint_every=100", *overrides])


def test_resume_gives_the_same_weights(tmp_path):
    config = tiny_config()
    train(config, tmp_path / "once", progress=False)
    train(config, tmp_path / "split", progress=False, stop_at=4)
    assert latest_checkpoint(tmp_path / "split").name == "step-00000004"
    train(config, tmp_path / "split", resume=True, progress=False)

    once, split = load_run(tmp_path / "once"), load_run(tmp_path / "split")
    for a, b in [(once.model, split.model), (once.ema_model, split.ema_model)]:
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(p, q), name
    opt_a, opt_b = once.state["optimizer"]["state"], split.state["optimizer"]["state"]
    assert all(torch.equal(opt_a[k]["exp_avg_sq"], opt_b[k]["exp_avg_sq"]) for k in opt_a)
    steps = [json.loads(line)["step"] for line in open(tmp_path / "split" / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == 8


def test_resume_drops_metrics_logged_after_the_checkpoint(tmp_path):
    config = tiny_config(log_every=1)
    train(config, tmp_path, progress=False, stop_at=4)
    with open(tmp_path / "metrics.jsonl", "a") as f:  # lines of steps lost in a crash
        f.write(json.dumps({"step": 5, "loss": 0.0}) + "\n")
    train(config, tmp_path, resume=True, progress=False)
    steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
    assert steps == list(range(1, 9))


def test_checkpoint_round_trip_and_bf16_training(tmp_path):
    config = tiny_config(precision="bf16", steps=3)
    model = train(config, tmp_path, progress=False)
    run = load_run(tmp_path)
    assert run.config == config
    for p, q in zip(model.state_dict().values(), run.ema_model.state_dict().values()):
        assert torch.equal(p, q)
    assert run.state["step"] == 3


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    train(tiny_config(checkpoint_every=2), tmp_path, progress=False)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["latest", "step-00000006", "step-00000008"]


def test_failed_save_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    config = tiny_config(steps=4, checkpoint_every=2)
    real_save = checkpoint_module.save_file
    calls = {"n": 0}

    def failing_save(tensors, path):
        calls["n"] += 1
        if calls["n"] == 3:  # first file of the second checkpoint
            raise OSError("disk full")
        real_save(tensors, path)

    monkeypatch.setattr(checkpoint_module, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        train(config, tmp_path, progress=False)
    entries = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert entries == ["latest", "step-00000002"]
    assert load_run(tmp_path).state["step"] == 2


def test_truncated_checkpoint_is_reported(tmp_path):
    train(tiny_config(steps=2), tmp_path, progress=False)
    weights = latest_checkpoint(tmp_path) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_run(tmp_path)


def test_loading_is_strict(tmp_path):
    train(tiny_config(steps=2), tmp_path, progress=False)
    folder = latest_checkpoint(tmp_path)
    tensors = load_file(folder / "ema.safetensors")
    tensors["extra.weight"] = torch.zeros(1)
    save_file(tensors, folder / "ema.safetensors")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["sha256"]["ema.safetensors"] = checkpoint_module.sha256(folder / "ema.safetensors")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="do not fit this model"):
        load_run(tmp_path)


def test_sharded_layout_in_one_process_resumes_exactly(tmp_path):
    sharded = tiny_config(steps=4, strategy="fsdp", checkpoint_samples=0)
    train(sharded, tmp_path / "straight", progress=False)
    train(sharded, tmp_path / "resumed", progress=False, stop_at=2)
    folder = latest_checkpoint(tmp_path / "resumed")
    assert (folder / "sharded" / ".metadata").is_file()
    assert not (folder / "model.safetensors").exists()
    assert "optimizer" not in load_run(tmp_path / "resumed").state  # it lives in the shards
    train(sharded, tmp_path / "resumed", resume=True, progress=False)
    a, b = load_run(tmp_path / "straight"), load_run(tmp_path / "resumed")
    for x, y in [(a.model, b.model), (a.ema_model, b.ema_model)]:
        for (name, p), q in zip(x.state_dict().items(), y.state_dict().values()):
            assert torch.equal(p, q), name


def test_sharded_checkpoint_errors(tmp_path, monkeypatch):
    config = tiny_config(steps=4, checkpoint_every=2, strategy="fsdp", checkpoint_samples=0)
    real_save = checkpoint_module.dcp.save
    calls = {"n": 0}

    def failing_save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoint_module.dcp, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        train(config, tmp_path, progress=False)
    entries = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert entries == ["latest", "step-00000002"]

    folder = latest_checkpoint(tmp_path)
    other = ImageFlow(dataclasses.replace(config.model, width=16))
    with pytest.raises(CheckpointError, match="do not fit this model"):
        checkpoint_module.load_sharded(folder, {"model": other})
    fewer = ImageFlow(dataclasses.replace(config.model, block_depths=[1]))
    with pytest.raises(CheckpointError, match="unexpected"):
        checkpoint_module.load_sharded(folder, {"model": fewer})

    shard = next((folder / "sharded").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_run(tmp_path)
    # Damage the manifest cannot see (it was rewritten to match): still one line.
    manifest = json.loads((folder / "manifest.json").read_text())
    name = str(shard.relative_to(folder))
    manifest["sha256"][name] = checkpoint_module.sha256(shard)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="cannot read the weights") as error:
        load_run(tmp_path)
    assert "\n" not in str(error.value) and "Traceback" not in str(error.value)
    (folder / "sharded" / ".metadata").unlink()
    with pytest.raises(CheckpointError, match="is missing"):
        load_run(tmp_path)


def test_sharded_checkpoint_before_any_optimizer_step(tmp_path):
    # Asking torch.distributed.checkpoint for an empty optimizer state takes a step.
    config = tiny_config()
    model = ImageFlow(config.model)
    optimizer = torch.optim.AdamW(model.parameters())
    folder = checkpoint_module.save_sharded_checkpoint(
        tmp_path, 0, config, model, model, optimizer, {}
    )
    assert not optimizer.state
    fresh = torch.optim.AdamW(model.parameters())
    checkpoint_module.load_sharded_optimizer(folder, model, fresh)
    assert not fresh.state
    assert load_run(tmp_path).state["step"] == 0


def test_resume_warns_only_about_settings_that_change_the_run(tmp_path, caplog):
    train(tiny_config(steps=4), tmp_path, progress=False, stop_at=2)
    layout = tiny_config(steps=4, strategy="fsdp", log_every=1, threads=1)
    with caplog.at_level("INFO", logger="tarflow.train.trainer"):
        train(layout, tmp_path, resume=True, progress=False, stop_at=3)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert "train.strategy: 'ddp' -> 'fsdp'" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="tarflow.train.trainer"):
        train(tiny_config(steps=4, lr=1e-4), tmp_path, resume=True, progress=False)
    assert "train.lr: 0.002 -> 0.0001" in caplog.text and "will differ" in caplog.text
    with pytest.raises(CheckpointError, match=r"model.width: 32 -> 16"):
        train(load_config(TINY, ["model.width=16"]), tmp_path, resume=True, progress=False)


def test_missing_run_is_reported(tmp_path):
    with pytest.raises(CheckpointError, match="has no checkpoint"):
        load_run(tmp_path)


def test_existing_run_needs_resume_and_matching_config(tmp_path):
    train(tiny_config(steps=2), tmp_path, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny_config(steps=2), tmp_path, progress=False)
    other = load_config(TINY, ["train.steps=4", "model.width=16"])
    with pytest.raises(CheckpointError, match="differs"):
        train(other, tmp_path, resume=True, progress=False)


def test_data_and_model_mismatch_is_reported(tmp_path):
    config = load_config(TINY, ["model.image_size=16"])
    with pytest.raises(ValueError, match="set model.image_size"):
        train(config, tmp_path, progress=False)


def test_bad_stop_at(tmp_path):
    with pytest.raises(ValueError, match="stop_at must lie in"):
        train(tiny_config(), tmp_path, progress=False, stop_at=9)


def test_warmup_cosine_schedule():
    values = [warmup_cosine(s, 100, 10, 0.1) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0)
    assert values[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))


def test_non_finite_loss_is_skipped_without_updating():
    from tarflow.train.ema import EMA
    from tarflow.train.trainer import training_step

    config = tiny_config()
    model = ImageFlow(config.model)
    with torch.no_grad():
        model.flow.transforms[0].head.bias.fill_(float("nan"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters())
    ema = EMA(model, 0.9)
    x, y = torch.zeros(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    result = training_step(model, optimizer, ema, x, y, config)
    assert result.skipped and not optimizer.state and ema.updates == 0
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, equal_nan=True)


def poison_calls(monkeypatch, bad_calls):
    """Makes the training log-likelihood NaN on the given calls (1-based, counted across
    runs)."""
    real = LogLikelihood.forward
    calls = {"n": 0}

    def forward(self, x, y=None):
        calls["n"] += 1
        out = real(self, x, y)
        return out * float("nan") if calls["n"] in bad_calls else out

    monkeypatch.setattr(LogLikelihood, "forward", forward)


def test_a_non_finite_step_is_skipped_and_counted(tmp_path, monkeypatch, caplog):
    poison_calls(monkeypatch, {3})
    train(tiny_config(log_every=1), tmp_path, progress=False)
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1, 1, 1, 1]
    assert records[2]["loss"] is None and records[3]["loss"] is not None
    assert "step 3 skipped" in caplog.text
    run = load_run(tmp_path)
    assert run.state["skipped_steps"] == 1 and run.state["ema_updates"] == 7
    assert all(s["step"] == 7 for s in run.state["optimizer"]["state"].values())


def test_resume_across_a_skipped_step_is_exact(tmp_path, monkeypatch):
    config = tiny_config(max_skipped_steps=2)
    poison_calls(monkeypatch, {4, 8})
    train(config, tmp_path / "once", progress=False)
    poison_calls(monkeypatch, {4, 8})
    train(config, tmp_path / "split", progress=False, stop_at=4)
    assert load_run(tmp_path / "split").state["skipped_in_a_row"] == 1
    train(config, tmp_path / "split", resume=True, progress=False)
    once, split = load_run(tmp_path / "once"), load_run(tmp_path / "split")
    assert once.state["skipped_steps"] == split.state["skipped_steps"] == 2
    for p, q in zip(once.model.state_dict().values(), split.model.state_dict().values()):
        assert torch.equal(p, q)


def test_repeated_failures_stop_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch):
    config = tiny_config(steps=10, checkpoint_every=2, max_skipped_steps=3)
    train(config, tmp_path / "good", progress=False, stop_at=4)
    poison_calls(monkeypatch, set(range(5, 20)))
    with pytest.raises(DivergenceError, match="step-00000004, is intact"):
        train(config, tmp_path / "bad", progress=False)
    assert latest_checkpoint(tmp_path / "bad").name == "step-00000004"
    good, bad = load_run(tmp_path / "good"), load_run(tmp_path / "bad")
    assert bad.state["step"] == 4 and bad.state["skipped_steps"] == 0
    for p, q in zip(good.model.state_dict().values(), bad.model.state_dict().values()):
        assert torch.equal(p, q)


needs_dynamo = pytest.mark.skipif(
    not torch._dynamo.is_dynamo_supported(), reason="torch.compile is not supported here"
)


@needs_dynamo
def test_compiled_training_matches_eager(tmp_path, monkeypatch):
    # The aot_eager backend traces the model as inductor does, in seconds instead of ~30 s;
    # test_inductor_matches_eager covers inductor's code generation.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    eager = train(tiny_config(steps=3), tmp_path / "eager", progress=False)
    compiled = train(tiny_config(steps=3, compile=True), tmp_path / "compiled", progress=False)
    for p, q in zip(eager.state_dict().values(), compiled.state_dict().values()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-5)


@pytest.mark.slow
@needs_dynamo
@pytest.mark.skipif(shutil.which("c++") is None, reason="inductor needs a C++ compiler")
def test_inductor_matches_eager():
    config = tiny_config()
    model = ImageFlow(config.model)
    x, y = 0.5 * torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 10])
    eager = LogLikelihood(model)(x, y)
    compiled = torch.compile(LogLikelihood(model))(x, y)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-4)


def test_activation_checkpointing_trains_the_same_weights(tmp_path):
    plain = train(tiny_config(steps=3), tmp_path / "plain", progress=False)
    config = tiny_config(steps=3, activation_checkpointing=True)
    recomputed = train(config, tmp_path / "recomputed", progress=False)
    assert not any(block.activation_checkpointing for block in recomputed.blocks)
    for p, q in zip(plain.state_dict().values(), recomputed.state_dict().values()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6)


def test_resume_survives_a_metrics_line_cut_short(tmp_path):
    config = tiny_config(log_every=1)
    train(config, tmp_path, progress=False, stop_at=4)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.1')  # the write an interruption cut short
    train(config, tmp_path, resume=True, progress=False)
    steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
    assert steps == list(range(1, 9))


def test_broken_checkpoint_says_how_to_fall_back(tmp_path):
    train(tiny_config(steps=4, checkpoint_every=2), tmp_path, progress=False)
    folder = latest_checkpoint(tmp_path)
    (folder / "manifest.json").write_text("[]")
    with pytest.raises(CheckpointError, match=r"\(step-00000002\) into"):
        load_run(tmp_path)
    (tmp_path / "checkpoints" / "latest").write_text("../../elsewhere\n")
    with pytest.raises(CheckpointError, match="not a checkpoint of this run"):
        load_run(tmp_path)
    (tmp_path / "checkpoints" / "latest").write_text("step-00000002\n")
    assert load_run(tmp_path).state["step"] == 2
