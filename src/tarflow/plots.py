"""PNG figures of a run: training curves and guidance sweeps.

Figures are drawn with matplotlib's object interface on the Agg raster backend (no
pyplot, no display, no global state), so they can be made inside a training process or
on a headless machine. matplotlib is an optional dependency: ``pip install tarflow[plot]``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Panels of the training-curve figure: metrics.jsonl key, axis label.
TRAINING_PANELS = (
    ("loss", "loss (nats / dim)"),
    ("bits_per_dim", "bits / dim (training batch)"),
    ("lr", "learning rate"),
    ("grad_norm", "gradient norm (before clipping)"),
    ("images_per_sec", "throughput (images / s)"),
)
# Panels of the guidance-sweep figure: metric, value key, axis label.
SWEEP_PANELS = (
    ("fid", "fid", "FID (Inception)"),
    ("fd", "fd", "FD (classifier features)"),
    ("pr", "precision", "precision"),
    ("pr", "recall", "recall"),
    ("accuracy", "accuracy", "classifier accuracy"),
)


def new_figure(panels: int, title: str) -> tuple[Any, list[Any]]:
    """An Agg figure with ``panels`` axes in rows of three."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "plots need matplotlib: pip install 'tarflow[plot]' (or pip install matplotlib)"
        ) from err
    columns = min(panels, 3)
    rows = -(-panels // columns)
    figure = Figure(figsize=(4.2 * columns, 3.2 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).ravel().tolist()
    for extra in axes[panels:]:
        extra.set_visible(False)
    figure.suptitle(title)
    return figure, axes[:panels]


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file, in order.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: it holds no records, or a line is not JSON.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; train the run first")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}, is not JSON: {err}") from err
    if not records:
        raise ValueError(f"{path} holds no metric records yet")
    return records


def plot_training_curves(run_dir: str | Path, path: str | Path | None = None) -> Path:
    """Plots loss, bits/dim, learning rate, gradient norm and throughput against step.

    Arguments:
        run_dir: a run directory with ``metrics.jsonl``.
        path: the PNG to write (default ``RUN/training-curves.png``).

    Returns:
        The path of the PNG.
    """
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    panels = [(key, label) for key, label in TRAINING_PANELS if key in records[-1]]
    figure, axes = new_figure(len(panels), f"training curves of {run_dir.name}")
    for ax, (key, label) in zip(axes, panels):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        ax.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            marker="." if len(points) < 30 else None,
        )
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    path = Path(path) if path else run_dir / "training-curves.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def plot_guidance_sweep(report: dict[str, Any], path: str | Path) -> Path:
    """Plots each sample metric of a guidance sweep against the guidance weight.

    Arguments:
        report: a report of :func:`tarflow.evaluate.report.evaluate_run` with a ``sweep``.
        path: the PNG to write.

    Returns:
        The path of the PNG.

    Raises:
        ValueError: the report holds no sweep.
    """
    rows = report.get("sweep")
    if not rows:
        raise ValueError("the report holds no guidance sweep (evaluate with --sweep-guidance)")
    present = rows[0]["metrics"]
    panels = [p for p in SWEEP_PANELS if p[0] in present]
    rule = rows[0]["sampling"]["guidance_rule"]
    title = f"guidance sweep ({rule}) of {Path(report['run']).name}, {report['checkpoint']}"
    figure, axes = new_figure(len(panels), title)
    weights = [row["guidance"] for row in rows]
    for ax, (metric, key, label) in zip(axes, panels):
        ax.plot(weights, [row["metrics"][metric][key] for row in rows], marker="o")
        counts = f"{present[metric]['num_samples']} samples"
        if "num_reference" in present[metric]:
            counts += f" vs {present[metric]['num_reference']} real"
        ax.set_title(counts, fontsize=9)
        ax.set_xlabel("guidance weight w")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path
