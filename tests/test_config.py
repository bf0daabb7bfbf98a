"""Run configs: shipped files load, unknown keys and bad values are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from tarflow.config import ConfigError, RunConfig, load_config

CONFIGS = Path(__file__).parent.parent / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    config = load_config(path)
    assert RunConfig.from_dict(config.to_dict()) == config


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, message",
    [
        ("train: {stepz: 3}", r"unknown config key\(s\) train\.stepz"),
        ("modle: {}", r"unknown config key\(s\) modle"),
        ("train: {steps: ten}", "train.steps must be an integer"),
        ("train: {lr: -1}", "train.lr must be a finite number > 0"),
        ("train: {lr: .inf}", "train.lr must be a finite number > 0"),
        ("train: {betas: [0.9, 1.5]}", "train.betas must lie in"),
        ("train: {noise: salt}", "train.noise must be gaussian or uniform"),
        ("train: {betas: [0.9]}", "train.betas must have 2 entries"),
        ("model: {patch_size: 5}", "does not divide"),
        ("model: {block_depths: 4}", "model.block_depths must be a list"),
        ("data: {dataset: imagenet}", "unknown dataset"),
        ("data: {dataset: digits, root: /data}", "data.root: the digits dataset ships"),
        ("train: {noise: gaussian, noise_std: 0}", "noise_std must be > 0 with noise gaussian"),
        ("train: {strategy: zero}", "train.strategy must be ddp or fsdp"),
        ("[1, 2]", "mapping at the top level"),
        ("train: {steps: [", "not valid YAML"),
    ],
)
def test_bad_config_named(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_overrides(tmp_path):
    config = load_config(
        write(tmp_path, "train: {steps: 3}"),
        ["train.steps=7", "model.block_depths=[1, 2]", "train.lr=1e-4"],
    )
    assert config.train.steps == 7 and config.model.block_depths == [1, 2]
    assert config.train.lr == pytest.approx(1e-4)
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(write(tmp_path, ""), ["train.steps"])
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(write(tmp_path, ""), ["train.nope=1"])
