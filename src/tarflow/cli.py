"""Command line: ``tarflow train | sample | eval``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from tarflow.config import ConfigError, load_config
from tarflow.data import load_dataset
from tarflow.evaluate.bits_per_dim import evaluate_bits_per_dim
from tarflow.image_grid import save_image_grid
from tarflow.sampling.denoise import tweedie_denoise
from tarflow.sampling.guidance import RULES, Guidance
from tarflow.train.checkpoint import CheckpointError, load_run
from tarflow.train.trainer import train

log = logging.getLogger("tarflow")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tarflow", description=__doc__)
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
        "--stop-at", type=int, default=None, metavar="STEP",
        help="stop after STEP with a checkpoint (resume later to finish)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    p = commands.add_parser("sample", help="draw images from a trained run")
    p.add_argument("run", help="run directory")
    p.add_argument("--num", type=int, default=64, help="number of images")
    p.add_argument("--out", default=None, help="PNG path (default RUN/samples.png)")
    p.add_argument("--label", type=int, default=None, help="class to draw (default: all)")
    p.add_argument("--guidance", type=float, default=0.0, help="guidance weight w")
    p.add_argument("--guidance-rule", choices=RULES, default="extrapolate")
    p.add_argument("--guidance-ramp", action="store_true", help="ramp w over the sequence")
    p.add_argument("--temperature", type=float, default=1.0, help="prior temperature")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-denoise", action="store_true", help="skip the Tweedie step")

    p = commands.add_parser("eval", help="test-set bits/dim of a trained run")
    p.add_argument("run", help="run directory")
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N images")
    p.add_argument("--draws", type=int, default=1, help="importance-weighted dequantization draws")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    return parser


def command_train(args: argparse.Namespace) -> None:
    run_dir = Path(args.out)
    config = load_config(args.config, args.set)
    train(
        config, run_dir, resume=args.resume, progress=not args.no_progress, stop_at=args.stop_at
    )
    print(f"checkpoints written to {run_dir / 'checkpoints'}; metrics in {run_dir / 'metrics.jsonl'}")


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
        if args.label is not None and not 0 <= args.label < max(classes, 1):
            raise ValueError(
                f"--label {args.label} is out of range: this model has classes 0..{classes - 1}"
                if classes
                else "--label given but this model is unconditional"
            )
        y = torch.full((args.num,), args.label) if args.label is not None else None
        columns = max(1, int(args.num**0.5))

    guidance = Guidance(args.guidance, args.guidance_rule, args.guidance_ramp)
    generator = torch.Generator().manual_seed(args.seed)
    x = model.sample(len(y) if y is not None else args.num, y, args.temperature, guidance, generator)
    if not args.no_denoise and config.train.noise == "gaussian":
        x = tweedie_denoise(model, x, config.train.noise_std, y)
    out = Path(args.out) if args.out else Path(args.run) / "samples.png"
    save_image_grid(x.clamp(-1, 1), out, columns)
    print(f"wrote {len(x)} samples to {out}")


def command_eval(args: argparse.Namespace) -> None:
    run = load_run(args.run, with_state=False)
    config = run.config
    data = load_dataset(config.data.dataset, config.data.root, args.split)
    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be >= 1")
    data = data.subset(args.limit)
    result = evaluate_bits_per_dim(
        run.ema_model, data, draws=args.draws, batch_size=args.batch_size, seed=args.seed
    )
    result = {"split": args.split, "checkpoint": run.folder.name, **result}
    (Path(args.run) / f"eval-{args.split}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


COMMANDS = {"train": command_train, "sample": command_sample, "eval": command_eval}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except (ConfigError, CheckpointError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"tarflow {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0
