"""Evaluation of a trained run: the metrics of ``tarflow eval``, as a table and as JSON.

Every metric records how many images it saw (``num_samples`` generated, ``num_reference``
or ``num_images`` real) and how long it took, because FID and its relatives move with
the sample count and a number without its count cannot be compared.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from tarflow.data import ImageDataset, load_dataset
from tarflow.distributed import is_main_process
from tarflow.evaluate.bits_per_dim import evaluate_bits_per_dim
from tarflow.evaluate.features import ClassifierFeatures, extract_features
from tarflow.evaluate.fid import load_inception
from tarflow.evaluate.frechet import (
    FewSamplesWarning,
    GaussianStatistics,
    frechet_distance,
    gaussian_statistics,
)
from tarflow.evaluate.reference import reference_images, reference_statistics
from tarflow.evaluate.sample_metrics import (
    conditional_accuracy,
    precision_recall,
    trusted_classifier,
)
from tarflow.evaluate.samples import denoise_sigma, draw_samples
from tarflow.sampling.guidance import Guidance
from tarflow.train.checkpoint import LoadedRun

METRICS = ("bpd", "fid", "fd", "pr", "accuracy")
SAMPLE_METRICS = ("fid", "fd", "pr", "accuracy")
METRIC_HELP = {
    "bpd": "bits/dim of real images (importance-weighted bound)",
    "fid": "Fréchet Inception distance (2048-d Inception-v3 features)",
    "fd": "Fréchet distance in the 256-d features of the dataset's classifier",
    "pr": "k-NN precision and recall (k = 3) in the classifier's features",
    "accuracy": "classifier accuracy on class-conditioned samples",
}
FEATURES = {
    "fid": "inception-v3 pool3, 2048-d",
    "fd": "classifier penultimate layer, 256-d",
}
FEW_SAMPLES_NOTE = (
    "* fewer images than feature dimensions: the covariance is singular and the distance "
    "is biased upwards; compare it only with numbers from the same counts"
)
# Neighbour index of the precision/recall balls, as in Kynkäänniemi et al. (2019).
PR_NEIGHBOURS = 3
# The figure each metric reports in tables and plots.
HEADLINE = {
    "bpd": ("bits_per_dim",),
    "fid": ("fid",),
    "fd": ("fd",),
    "pr": ("precision", "recall"),
    "accuracy": ("accuracy",),
}


def parse_metrics(text: str) -> list[str]:
    """``"bpd,fid"`` → ``["bpd", "fid"]``, checked against :data:`METRICS`."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in METRICS]
    if unknown or not names:
        choices = ", ".join(METRICS)
        raise ValueError(f"unknown metric(s) {unknown or text!r}; choose from {choices}")
    return list(dict.fromkeys(names))


def few_samples(*stats: GaussianStatistics) -> bool:
    """Whether any of the statistics rests on no more samples than feature dimensions."""
    return any(s.num_samples <= s.dims for s in stats)


@dataclass
class DrawnSamples:
    """Images drawn for the sample metrics, their labels, and how they were drawn."""

    images: Tensor
    labels: Tensor | None
    sampling: dict[str, Any]


def draw_for_metrics(
    run: LoadedRun,
    num_samples: int,
    guidance: Guidance | None = None,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 250,
    progress: bool = False,
) -> DrawnSamples:
    """Draws ``num_samples`` images from the run's EMA weights, balanced over the classes
    of a class-conditional model. Under torchrun every process draws a share and all
    receive every image."""
    start = time.perf_counter()
    images, labels = draw_samples(
        run.ema_model,
        num_samples,
        denoise_sigma(run.config),
        guidance,
        temperature,
        seed=seed,
        batch_size=batch_size,
        progress=progress,
    )
    sampling = {
        "num_samples": num_samples,
        "guidance": guidance.weight if guidance else 0.0,
        "guidance_rule": guidance.rule if guidance else None,
        "temperature": temperature,
        "seed": seed,
        "seconds": time.perf_counter() - start,
    }
    return DrawnSamples(images, labels, sampling)


def check_sample_metrics(run: LoadedRun, metrics: Sequence[str]) -> None:
    unknown = [m for m in metrics if m not in SAMPLE_METRICS]
    if unknown:
        raise ValueError(f"{unknown} are not sample metrics; choose from {SAMPLE_METRICS}")
    if "accuracy" in metrics and not run.ema_model.num_classes:
        raise ValueError(
            "the accuracy metric needs a class-conditional model; leave it out of --metrics"
        )


def score_samples(
    run: LoadedRun,
    metrics: Sequence[str],
    drawn: DrawnSamples,
    split: str = "test",
    num_reference: int | None = None,
    cache_dir: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Scores images drawn by :func:`draw_for_metrics`.

    Arguments:
        run: the loaded run.
        metrics: names from :data:`SAMPLE_METRICS`.
        drawn: the images, their labels and how they were drawn.
        split: the real split compared with.
        num_reference: real images behind the FID and FD statistics (None: the whole
            split). Precision and recall use as many real images as were drawn, equal set
            sizes as in their definition.
        cache_dir: cache of the classifier and reference statistics.
        progress: show tqdm bars.

    Returns:
        ``{"sampling": {...}, "metrics": {name: {...}}}``; every metric entry holds its
        value(s), ``num_samples``, the real count (``num_reference``) and ``seconds``
        (which include computing reference statistics when they were not cached yet).
        FID and FD entries carry ``few_samples``: true when either side has no more
        images than feature dimensions (then no FewSamplesWarning is issued).
    """
    check_sample_metrics(run, metrics)
    dataset, root = run.config.data.dataset, run.config.data.root
    images, labels, num_samples = drawn.images, drawn.labels, len(drawn.images)
    results: dict[str, dict[str, Any]] = {}
    classifier = test_accuracy = None
    if {"fd", "pr", "accuracy"} & set(metrics):
        classifier, test_accuracy = trusted_classifier(dataset, root, cache_dir, progress=progress)
    for name in metrics:
        start = time.perf_counter()
        if name in ("fid", "fd"):
            extractor = load_inception() if name == "fid" else ClassifierFeatures(classifier)
            batch = 50 if name == "fid" else 500
            # Recorded in the report as ``few_samples`` and marked in the table instead.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FewSamplesWarning)
                reference = reference_statistics(
                    extractor, dataset, split, num_reference, root, cache_dir, batch, progress
                )
                fake = gaussian_statistics(extract_features(extractor, images, batch, progress))
            result = {
                name: frechet_distance(fake, reference),
                "num_reference": reference.num_samples,
                "features": FEATURES[name],
                "few_samples": few_samples(fake, reference),
            }
            if name == "fd":
                result["classifier_test_accuracy"] = test_accuracy
        elif name == "pr":
            extractor = ClassifierFeatures(classifier)
            real = reference_images(dataset, split, None, root)
            real = real.subset(min(num_samples, len(real)))
            result = {
                **precision_recall(
                    extract_features(extractor, real.images, 500),
                    extract_features(extractor, images, 500),
                    PR_NEIGHBOURS,
                ),
                "k": PR_NEIGHBOURS,
                "num_reference": len(real),
                "features": FEATURES["fd"],
            }
        else:
            result = {
                **conditional_accuracy(classifier, images, labels),
                "classifier_test_accuracy": test_accuracy,
            }
        results[name] = {
            **result,
            "num_samples": num_samples,
            "seconds": time.perf_counter() - start,
        }
    return {"sampling": drawn.sampling, "metrics": results}


def bpd_metric(
    run: LoadedRun,
    data: ImageDataset,
    draws: int = 1,
    batch_size: int = 500,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """:func:`evaluate_bits_per_dim` of the EMA weights, with its run time."""
    start = time.perf_counter()
    result = evaluate_bits_per_dim(run.ema_model, data, draws, batch_size, seed, progress)
    return {**result, "seconds": time.perf_counter() - start}


def evaluate_run(
    run: LoadedRun,
    metrics: Sequence[str],
    split: str = "test",
    num_samples: int = 1000,
    guidance_weights: Sequence[float] = (0.0,),
    guidance_rule: str = "extrapolate",
    temperature: float = 1.0,
    limit: int | None = None,
    draws: int = 1,
    num_reference: int | None = None,
    batch_size: int = 500,
    seed: int = 0,
    cache_dir: str | None = None,
    progress: bool = False,
) -> dict[str, Any] | None:
    """The report of ``tarflow eval``: bits/dim once, sample metrics per guidance weight.

    Arguments:
        run: the loaded run.
        metrics: names from :data:`METRICS`.
        split: the real split: bits/dim is measured on it and samples are compared with it.
        num_samples: images drawn per guidance weight.
        guidance_weights: one weight, or several for a guidance sweep.
        guidance_rule: a rule of :data:`tarflow.sampling.guidance.RULES`.
        temperature: prior temperature.
        limit: bits/dim of the first ``limit`` images only.
        draws: importance-weighted dequantization draws of bits/dim.
        num_reference: real images behind FID/FD (None: the whole split).
        batch_size: images per pass.
        seed: seed of dequantization and of the sample draws.
        cache_dir: cache of classifiers and reference statistics.
        progress: show tqdm bars.

    Returns:
        ``run``, ``checkpoint``, ``split``, ``metrics`` (bits/dim and, for one weight,
        the sample metrics), ``sampling`` (how samples were drawn), and for several
        weights a ``sweep`` list of ``{"guidance", "sampling", "metrics"}``. Under
        torchrun, bits/dim and the draws are shared between the processes; rank 0 gets
        the report and the others None.
    """
    if limit is not None and limit < 1:
        raise ValueError("--limit must be >= 1")
    if num_samples < 2:
        raise ValueError(f"--num-samples must be >= 2, got {num_samples}")
    if not guidance_weights:
        raise ValueError("no guidance weight given")
    report: dict[str, Any] = {
        "run": str(run.folder.parent.parent),
        "checkpoint": run.folder.name,
        "split": split,
        "metrics": {},
    }
    if "bpd" in metrics:
        data = load_dataset(run.config.data.dataset, run.config.data.root, split).subset(limit)
        report["metrics"]["bpd"] = bpd_metric(run, data, draws, batch_size, seed, progress)

    wanted = [m for m in metrics if m in SAMPLE_METRICS]
    if not wanted:
        return report if is_main_process() else None
    check_sample_metrics(run, wanted)
    guidances = []
    for weight in guidance_weights:
        guidance = Guidance(weight, guidance_rule) if run.ema_model.num_classes else None
        if guidance is None and weight > 0:
            raise ValueError("guidance needs a class-conditional model")
        guidances.append(guidance)
    # The flow's work is shared between processes; the features and metrics are computed
    # by rank 0 alone, after the others have finished.
    drawn = [
        draw_for_metrics(run, num_samples, guidance, temperature, seed, batch_size, progress)
        for guidance in guidances
    ]
    if not is_main_process():
        return None
    rows = [
        {
            "guidance": weight,
            **score_samples(run, wanted, samples, split, num_reference, cache_dir, progress),
        }
        for weight, samples in zip(guidance_weights, drawn)
    ]
    if len(rows) == 1:
        report["sampling"] = rows[0]["sampling"]
        report["metrics"].update(rows[0]["metrics"])
    else:
        report["sweep"] = rows
    return report


def format_number(value: Any) -> str:
    """Four significant digits for floats, ``-`` for None."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def metric_rows(metrics: dict[str, dict[str, Any]]) -> list[list[str]]:
    """Table rows (metric, value, generated, real, seconds) of one set of metrics."""
    rows = []
    for name, result in metrics.items():
        real = result.get("num_reference", result.get("num_images"))
        for key in HEADLINE[name]:
            value = format_number(result[key])
            if key == "bits_per_dim":
                value += f" ± {format_number(result['standard_error'])}"
            if result.get("few_samples"):
                value += "*"
            rows.append(
                [
                    key.replace("_", " "),
                    value,
                    format_number(result.get("num_samples")),
                    format_number(real),
                    f"{result['seconds']:.1f}",
                ]
            )
    return rows


def align(rows: list[list[str]]) -> str:
    """Rows of cells as text columns: the first left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths))
        )
        for row in rows
    ]
    return "\n".join(lines)


def sweep_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    """A sweep as one table: a line per guidance weight, a column per figure."""
    metrics = rows[0]["metrics"]
    keys = [(name, key) for name in metrics for key in HEADLINE[name]]
    header = ["guidance", *(key.replace("_", " ") for _, key in keys), "sampling s"]
    lines = [header]
    for row in rows:
        cells = [f"{row['guidance']:g}"]
        for name, key in keys:
            entry = row["metrics"][name]
            cells.append(format_number(entry[key]) + ("*" if entry.get("few_samples") else ""))
        lines.append([*cells, f"{row['sampling']['seconds']:.1f}"])
    return lines


def format_table(report: dict[str, Any]) -> str:
    """The report as aligned text; a guidance sweep gets one line per weight."""
    header = ["metric", "value", "generated", "real", "seconds"]
    title = f"{report['run']} ({report['checkpoint']}), {report['split']} split"
    sampling = report.get("sampling")
    if sampling:
        title += (
            f", guidance {sampling['guidance']:g}, temperature {sampling['temperature']:g}, "
            f"{sampling['num_samples']} samples drawn in {sampling['seconds']:.1f} s"
        )
    parts = [title]
    if report["metrics"]:
        parts.append(align([header, *metric_rows(report["metrics"])]))
    entries = list(report["metrics"].values())
    rows = report.get("sweep", [])
    if rows:
        counts = ", ".join(
            f"{name} {entry['num_samples']} vs {entry['num_reference']} real"
            if "num_reference" in entry
            else f"{name} {entry['num_samples']}"
            for name, entry in rows[0]["metrics"].items()
        )
        first = rows[0]["sampling"]
        parts.append(
            f"guidance sweep ({first['guidance_rule']}, temperature {first['temperature']:g}); "
            f"images per weight: {counts}"
        )
        parts.append(align(sweep_rows(rows)))
        entries += [entry for row in rows for entry in row["metrics"].values()]
    if any(entry.get("few_samples") for entry in entries):
        parts.append(FEW_SAMPLES_NOTE)
    return "\n".join(parts)


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    """Writes the report as indented JSON."""
    path = Path(path)
    path.write_text(json.dumps(report, indent=1) + "\n")
    return path
