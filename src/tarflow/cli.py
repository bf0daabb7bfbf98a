"""Command line: ``tarflow train | sample | eval | plot``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch

from tarflow import __version__
from tarflow.config import ConfigError, load_config
from tarflow.data import load_dataset
from tarflow.distributed import (
    DEVICES,
    broadcast_from_main,
    process_device,
    process_group,
    sum_over_ranks,
)
from tarflow.evaluate.bits_per_dim import evaluate_bits_per_dim
from tarflow.evaluate.report import (
    METRIC_HELP,
    evaluate_run,
    format_table,
    parse_metrics,
    write_report,
)
from tarflow.image_grid import save_image_grid
from tarflow.plots import plot_guidance_sweep, plot_training_curves
from tarflow.sampling.denoise import tweedie_denoise
from tarflow.sampling.guidance import RULES, Guidance
from tarflow.sampling.solvers import SOLVERS, Solver, SolverStats, load_or_calibrate
from tarflow.train.checkpoint import CheckpointError, LoadedRun, load_run
from tarflow.train.trainer import DivergenceError, train

log = logging.getLogger("tarflow")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tarflow", description=__doc__)
    parser.add_argument("--version", action="version", version=f"tarflow {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("train", help="train a model from a YAML config")
    p.add_argument("--config", required=True, help="YAML run configuration")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config entry, e.g. --set train.steps=100 (repeatable)",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument(
        "--stop-at",
        type=int,
        default=None,
        metavar="STEP",
        help="stop after STEP with a checkpoint (resume later to finish)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    p = commands.add_parser("sample", help="draw images from a trained run")
    p.add_argument("run", help="run directory")
    p.add_argument(
        "--num",
        "--num-images",  # the spelling torchrun passes through (it takes --num as its own)
        dest="num",
        type=int,
        default=64,
        help="number of images; without --label, a class-conditional model draws "
        "max(1, NUM // classes) per class, one row each",
    )
    p.add_argument("--out", default=None, help="PNG path (default RUN/samples.png)")
    p.add_argument("--label", type=int, default=None, help="class to draw (default: all)")
    p.add_argument("--guidance", type=float, default=0.0, help="guidance weight w")
    p.add_argument("--guidance-rule", choices=RULES, default="extrapolate")
    p.add_argument("--guidance-ramp", action="store_true", help="ramp w over the sequence")
    p.add_argument("--temperature", type=float, default=1.0, help="prior temperature")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-denoise", action="store_true", help="skip the Tweedie step")
    p.add_argument(
        "--solver",
        choices=SOLVERS,
        default="sequential",
        help="inverse solver of each block; selective calibrates once per batch size and "
        "guidance, saved in RUN/solver-calibration.json",
    )
    p.add_argument(
        "--tol",
        type=float,
        default=Solver.tol,
        help="relative change at which a sample stops iterating (Jacobi solvers)",
    )
    p.add_argument(
        "--max-iters",
        type=int,
        default=None,
        help="most Jacobi iterations per chunk (default: the chunk length, exact)",
    )
    p.add_argument(
        "--chunk-size", type=int, default=Solver.chunk_size, help="tokens per gs-jacobi chunk"
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="run the Transformer passes through torch.compile (pays off for many samples)",
    )
    add_device_argument(p)

    p = commands.add_parser(
        "eval",
        help="bits/dim and sample metrics of a trained run",
        description="Without --metrics: test-set bits/dim, printed as one JSON line. With "
        "--metrics or --sweep-guidance: a table of the chosen metrics, each with its sample "
        "count. Bits/dim alone is written to RUN/eval-SPLIT.json, a metrics table to "
        "RUN/metrics-SPLIT.json, a sweep to RUN/guidance-sweep-SPLIT.json. Metrics: "
        + "; ".join(f"{name}: {text}" for name, text in METRIC_HELP.items()),
    )
    p.add_argument("run", help="run directory")
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--metrics", default=None, help="comma-separated, e.g. bpd,fid,fd,pr,accuracy")
    p.add_argument("--num-samples", type=int, default=1000, help="images drawn for sample metrics")
    p.add_argument(
        "--num-reference",
        type=int,
        default=None,
        help="real images behind FID/FD statistics (default: the whole split; cached)",
    )
    p.add_argument("--guidance", type=float, default=0.0, help="guidance weight w of the draws")
    p.add_argument(
        "--sweep-guidance",
        default=None,
        metavar="W,W,...",
        help="evaluate the sample metrics at each weight and plot them against w",
    )
    p.add_argument("--guidance-rule", choices=RULES, default="extrapolate")
    p.add_argument("--temperature", type=float, default=1.0, help="prior temperature")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N images")
    p.add_argument("--draws", type=int, default=1, help="importance-weighted dequantization draws")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_device_argument(p)

    p = commands.add_parser("plot", help="training curves (and a saved guidance sweep) as PNG")
    p.add_argument("run", help="run directory")
    p.add_argument("--split", default="test", choices=("train", "test"))
    return parser


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="where the flow runs (auto: CUDA when present). Under torchrun the work is "
        "shared between the processes, one GPU each, and rank 0 writes the results",
    )


def command_train(args: argparse.Namespace) -> None:
    run_dir = Path(args.out)
    config = load_config(args.config, args.set)
    train(config, run_dir, resume=args.resume, progress=not args.no_progress, stop_at=args.stop_at)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports
        return
    print(
        f"checkpoints written to {run_dir / 'checkpoints'}; metrics in {run_dir / 'metrics.jsonl'}"
    )


def command_sample(args: argparse.Namespace) -> None:
    run = load_run(args.run, with_state=False)
    model, config = run.ema_model, run.config
    if args.num < 1:
        raise ValueError("--num must be >= 1")
    if args.temperature <= 0:
        raise ValueError("--temperature must be > 0")
    classes = model.num_classes

    if classes and args.label is None:
        per_class = max(1, args.num // classes)
        y = torch.arange(classes).repeat_interleave(per_class)
        columns = per_class
    else:
        if args.label is not None and (classes == 0 or not 0 <= args.label < classes):
            raise ValueError(
                f"--label {args.label} is out of range: this model has classes 0..{classes - 1}"
                if classes
                else "--label given but this model is unconditional"
            )
        y = torch.full((args.num,), args.label) if args.label is not None else None
        columns = max(1, int(args.num**0.5))

    guidance = Guidance(args.guidance, args.guidance_rule, args.guidance_ramp)
    solver = Solver(args.solver, args.tol, args.max_iters, args.chunk_size, args.compile)
    num = len(y) if y is not None else args.num
    device = process_device(args.device)
    with process_group(device) as (rank, world), torch.no_grad():
        model.to(device)
        # Every process draws all the noise and inverts its contiguous share of it.
        z = model.prior_noise(num, args.temperature, torch.Generator().manual_seed(args.seed))
        share = torch.tensor_split(torch.arange(num), world)[rank]
        x = torch.zeros(num, config.model.channels, *[config.model.image_size] * 2)
        y_share = None if y is None else y[share].to(device)
        if solver.name == "selective":
            # Rank 0 calibrates for its share, the largest; every process uses its choice.
            calibration = None
            if rank == 0:
                path = Path(args.run) / "solver-calibration.json"
                calibration = load_or_calibrate(model, path, len(share), y_share, guidance, solver)
            model.solver_calibration = broadcast_from_main(calibration)
        if len(share):
            x_share, stats = model.inverse_with_stats(z[share], y_share, guidance, solver)
            if rank == 0:
                log_solver_stats(stats, shared=world > 1)
            if not args.no_denoise and config.train.noise == "gaussian":
                x_share = tweedie_denoise(model, x_share, config.train.noise_std, y_share)
            x[share] = x_share.float().cpu()
        x = sum_over_ranks(x)
    if rank:
        return
    out = Path(args.out) if args.out else Path(args.run) / "samples.png"
    save_image_grid(x.clamp(-1, 1), out, columns)
    print(f"wrote {len(x)} samples to {out}")


def log_solver_stats(stats: list[SolverStats], shared: bool = False) -> None:
    whose = " (rank 0's share)" if shared else ""
    for i, block in enumerate(stats):
        per_sample = block.iterations_per_sample.float()
        log.info(
            "block %d (noise side first): %s, %d Transformer passes, %.1f mean / %d max per "
            "sample%s",
            i,
            block.solver,
            block.passes,
            per_sample.mean(),
            per_sample.max(),
            whose,
        )


def command_eval(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be >= 1")
    run = load_run(args.run, with_state=False)
    device = process_device(args.device)
    with process_group(device) as (rank, _):
        run.ema_model.to(device)
        if args.metrics is not None or args.sweep_guidance is not None:
            command_eval_metrics(args, run)
            return
        config = run.config
        data = load_dataset(config.data.dataset, config.data.root, args.split).subset(args.limit)
        result = evaluate_bits_per_dim(
            run.ema_model, data, draws=args.draws, batch_size=args.batch_size, seed=args.seed
        )
    if rank:
        return
    result = {"split": args.split, "checkpoint": run.folder.name, **result}
    (Path(args.run) / f"eval-{args.split}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


def command_eval_metrics(args: argparse.Namespace, run: LoadedRun) -> None:
    if args.metrics is None:  # the default set, less what the model cannot support
        metrics = ["fd", "pr", "accuracy"] if run.ema_model.num_classes else ["fd", "pr"]
    else:
        metrics = parse_metrics(args.metrics)
    weights = [args.guidance]
    if args.sweep_guidance is not None:
        if args.guidance:
            raise ValueError("give either --guidance or --sweep-guidance, not both")
        try:
            weights = [float(w) for w in args.sweep_guidance.split(",")]
        except ValueError as err:
            raise ValueError(f"--sweep-guidance takes numbers like 0,1,2: {err}") from err
    report = evaluate_run(
        run,
        metrics,
        split=args.split,
        num_samples=args.num_samples,
        guidance_weights=weights,
        guidance_rule=args.guidance_rule,
        temperature=args.temperature,
        limit=args.limit,
        draws=args.draws,
        num_reference=args.num_reference,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=not args.no_progress,
    )
    if report is None:  # a process other than rank 0 under torchrun
        return
    run_dir = Path(args.run)
    print(format_table(report))
    name = "guidance-sweep" if "sweep" in report else "metrics"
    print(f"wrote {write_report(report, run_dir / f'{name}-{args.split}.json')}")
    if "sweep" in report:
        print(f"wrote {plot_guidance_sweep(report, run_dir / f'guidance-sweep-{args.split}.png')}")


def command_plot(args: argparse.Namespace) -> None:
    run_dir = Path(args.run)
    print(f"wrote {plot_training_curves(run_dir)}")
    report_path = run_dir / f"guidance-sweep-{args.split}.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        if "sweep" in report:
            out = plot_guidance_sweep(report, run_dir / f"guidance-sweep-{args.split}.png")
            print(f"wrote {out}")


COMMANDS = {
    "train": command_train,
    "sample": command_sample,
    "eval": command_eval,
    "plot": command_plot,
}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except (
        ConfigError,
        CheckpointError,
        DivergenceError,
        FileNotFoundError,
        FileExistsError,
        ValueError,
        ImportError,
    ) as err:
        print(f"tarflow {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0
