"""Sample metrics: the Fréchet formula, cached reference statistics, precision/recall,
the classifier they rely on, and ``tarflow eval --metrics`` on a tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tarflow.cli import main
from tarflow.config import load_config
from tarflow.data import load_digits
from tarflow.evaluate.features import ClassifierFeatures, extract_features
from tarflow.evaluate.frechet import (
    FewSamplesWarning,
    GaussianStatistics,
    frechet_distance,
    gaussian_statistics,
)
from tarflow.evaluate.reference import reference_statistics, statistics_path
from tarflow.evaluate.report import evaluate_run, format_table, parse_metrics
from tarflow.evaluate.sample_metrics import (
    conditional_accuracy,
    knn_radii,
    precision_recall,
    trusted_classifier,
)
from tarflow.train import load_run, train

TINY = Path(__file__).parent.parent / "configs" / "digits_tiny.yaml"
# Test accuracy of the digits classifier (seed 0, 297 test images) measured at 0.886.
DIGITS_CLASSIFIER_ACCURACY = 0.85


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def classifier(cache_dir):
    model, test_accuracy = trusted_classifier("digits", cache_dir=str(cache_dir), progress=False)
    return model, test_accuracy


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    config = load_config(TINY, ["train.steps=10", "train.checkpoint_every=10"])
    out = tmp_path_factory.mktemp("run") / "tiny"
    train(config, out, progress=False)
    return out


class PixelFeatures:
    """Flattened pixels as features, counting its calls: a stand-in network."""

    name, identity, dims = "pixels", "pixels-v1", 64

    def __init__(self) -> None:
        self.calls = 0

    def features(self, pixels):
        self.calls += 1
        return pixels.flatten(1).float()


def stats(mean, covariance):
    return GaussianStatistics(np.asarray(mean, float), np.asarray(covariance, float), 100)


def test_frechet_distance_of_diagonal_gaussians_has_closed_form():
    # For diagonal covariances tr(Σa + Σb − 2(ΣaΣb)^½) = Σ_i (√s_a,i − √s_b,i)².
    rng = np.random.default_rng(0)
    mean_a, mean_b = rng.normal(size=6), rng.normal(size=6)
    var_a, var_b = rng.uniform(0.1, 4, 6), rng.uniform(0.1, 4, 6)
    expected = np.sum((mean_a - mean_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    a, b = stats(mean_a, np.diag(var_a)), stats(mean_b, np.diag(var_b))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-10)

    # Rotating both Gaussians by the same orthogonal matrix leaves the distance unchanged.
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    rotated_a = stats(q @ mean_a, q @ np.diag(var_a) @ q.T)
    rotated_b = stats(q @ mean_b, q @ np.diag(var_b) @ q.T)
    assert frechet_distance(rotated_a, rotated_b) == pytest.approx(expected, rel=1e-8)

    # A zero variance makes Σ singular: no Cholesky factor, the eigendecomposition is used.
    var_a[2] = 0.0
    expected = np.sum((mean_a - mean_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    singular = stats(mean_a, np.diag(var_a))
    assert frechet_distance(singular, b) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(b, singular) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_matches_scipy_sqrtm_on_full_covariances():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(40, 8)), rng.normal(size=(50, 8)) @ rng.normal(size=(8, 8))
    a, b = gaussian_statistics(x), gaussian_statistics(y)
    root = scipy_linalg.sqrtm(a.covariance @ b.covariance).real
    expected = (
        np.sum((a.mean - b.mean) ** 2) + np.trace(a.covariance + b.covariance) - 2 * np.trace(root)
    )
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)


def test_few_samples_use_their_factor_and_agree_with_the_full_computation():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(2)
    with pytest.warns(FewSamplesWarning, match="5 samples for 32-d"):
        a = gaussian_statistics(rng.normal(size=(5, 32)))
    b = gaussian_statistics(rng.normal(size=(80, 32)) * 2 + 1)
    assert a.factor.shape == (5, 32) and b.factor is None
    assert np.allclose(a.factor.T @ a.factor, a.covariance)
    root = scipy_linalg.sqrtm(a.covariance @ b.covariance).real
    expected = (
        np.sum((a.mean - b.mean) ** 2) + np.trace(a.covariance + b.covariance) - 2 * np.trace(root)
    )
    without_factor = GaussianStatistics(a.mean, a.covariance, a.num_samples)
    for x, y in [(a, b), (b, a), (without_factor, b), (b, without_factor)]:
        assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-6)
    assert 0 <= frechet_distance(a, a) < 1e-6
    assert 0 <= frechet_distance(without_factor, without_factor) < 1e-6
    with pytest.raises(ValueError, match="4-d and 32-d"):
        frechet_distance(stats(np.zeros(4), np.eye(4)), a)


def test_statistics_need_two_finite_samples():
    with pytest.raises(ValueError, match="at least 2 samples"):
        gaussian_statistics(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="NaN"):
        gaussian_statistics(np.full((4, 3), np.nan))
    with pytest.raises(ValueError, match=r"\(N, d\)"):
        gaussian_statistics(np.zeros(4))


def test_reference_statistics_are_cached_and_invalidated(tmp_path):
    extractor = PixelFeatures()

    def compute(split="test", num_images=100):
        return reference_statistics(extractor, "digits", split, num_images, cache_dir=tmp_path)

    with pytest.warns(FewSamplesWarning):  # only when computed: the cache does not warn
        first = compute(num_images=50)
    assert extractor.calls == 1 and first.num_samples == 50
    again = compute(num_images=50)
    assert extractor.calls == 1 and np.array_equal(again.covariance, first.covariance)

    compute(num_images=100)  # another count: computed, the first file stays valid
    assert extractor.calls == 2
    compute(split="train", num_images=100)  # another split
    assert extractor.calls == 3
    compute(num_images=100)
    assert extractor.calls == 3

    extractor.identity = "pixels-v2"  # other weights: the stored statistics are stale
    compute(num_images=100)
    assert extractor.calls == 4
    assert statistics_path(extractor, "digits", "test", 100, tmp_path).is_file()
    with pytest.raises(ValueError, match="2..297"):
        compute(num_images=1000)


def test_precision_and_recall_see_mode_dropping():
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(200, 2, generator=generator)
    right = torch.randn(200, 2, generator=generator) + torch.tensor([20.0, 0.0])
    real = torch.cat([left, right])
    fake = torch.randn(400, 2, generator=generator)  # covers the left mode only
    result = precision_recall(real, fake)
    assert result["precision"] > 0.95
    assert 0.4 < result["recall"] < 0.55
    assert precision_recall(real, real) == {"precision": 1.0, "recall": 1.0}
    assert precision_recall(real, fake + 100) == {"precision": 0.0, "recall": 0.0}
    with pytest.raises(ValueError, match="k must lie in 1..2"):
        knn_radii(real[:3], 3)


def test_classifier_is_accurate_before_its_features_are_used(classifier, cache_dir):
    model, test_accuracy = classifier
    assert test_accuracy >= DIGITS_CLASSIFIER_ACCURACY
    test = load_digits(None, "test")
    result = conditional_accuracy(model, test.images, test.labels)
    assert result["accuracy"] == pytest.approx(test_accuracy)
    with pytest.raises(ValueError, match="below the 0.999 needed"):
        trusted_classifier("digits", cache_dir=str(cache_dir), min_accuracy=0.999)


def test_classifier_features_separate_real_from_noise(classifier):
    extractor = ClassifierFeatures(classifier[0])
    train_data, test = load_digits(None, "train"), load_digits(None, "test")
    noise = torch.randint(0, 256, test.images.shape, dtype=torch.uint8)
    real = gaussian_statistics(extract_features(extractor, train_data.images))
    held_out = gaussian_statistics(extract_features(extractor, test.images))
    noisy = gaussian_statistics(extract_features(extractor, noise))
    assert frechet_distance(real, held_out) * 10 < frechet_distance(real, noisy)


def test_evaluate_run_names_every_sample_count(tiny_run, cache_dir, classifier):
    run = load_run(tiny_run, with_state=False)
    metrics = parse_metrics("bpd,fd,pr,accuracy")
    report = evaluate_run(run, metrics, num_samples=30, limit=20, cache_dir=str(cache_dir))
    assert report["metrics"]["bpd"]["num_images"] == 20
    for name in ("fd", "pr", "accuracy"):
        assert report["metrics"][name]["num_samples"] == 30
        assert report["metrics"][name]["seconds"] >= 0
    assert report["metrics"]["fd"]["num_reference"] == 297
    assert report["metrics"]["fd"]["few_samples"]  # 30 samples of 256-d features
    assert report["metrics"]["pr"]["num_reference"] == 30
    assert 0 <= report["metrics"]["accuracy"]["accuracy"] <= 1
    assert report["sampling"]["num_samples"] == 30
    json.dumps(report)
    table = format_table(report)
    assert "fd" in table and "compare it only with numbers from the same counts" in table
    with pytest.raises(ValueError, match="unknown metric"):
        parse_metrics("bpd,is")


def test_evaluate_run_fid_caches_its_reference_statistics(tiny_run, cache_dir):
    run = load_run(tiny_run, with_state=False)
    report = evaluate_run(run, ["fid"], num_samples=3, num_reference=4, cache_dir=cache_dir)
    fid = report["metrics"]["fid"]
    assert fid["fid"] > 0 and fid["num_samples"] == 3 and fid["num_reference"] == 4
    assert fid["few_samples"]
    assert (cache_dir / "stats-inception-digits-test-4.npz").is_file()


def test_cli_eval_table_and_sweep(tiny_run, cache_dir, classifier, monkeypatch, capsys):
    monkeypatch.setenv("TARFLOW_CACHE", str(cache_dir))
    args = ["eval", str(tiny_run), "--metrics", "fd,accuracy", "--num-samples", "20"]
    assert main([*args, "--sweep-guidance", "0,2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "guidance sweep (extrapolate" in out and "accuracy" in out
    report = json.loads((tiny_run / "guidance-sweep-test.json").read_text())
    assert [row["guidance"] for row in report["sweep"]] == [0.0, 2.0]
    assert report["sweep"][1]["metrics"]["fd"]["num_samples"] == 20
    assert (tiny_run / "guidance-sweep-test.png").is_file()

    assert main([*args, "--guidance", "1", "--sweep-guidance", "0,1"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["eval", str(tiny_run), "--metrics", "fid,bogus"]) == 2
    assert "unknown metric" in capsys.readouterr().err
