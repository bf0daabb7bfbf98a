"""Sample quality of a class-conditional run: does a real-data classifier agree?

Draws ``--per-class`` samples of every class at each guidance weight, denoises them, and
reports the fraction that a classifier trained on the real training split labels as the
class they were drawn for. The classifier's own test accuracy is printed beside it.

    python benchmarks/sample_quality.py runs/fashion_mnist --guidance 0,1,2,3
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tarflow.evaluate.classifier import load_or_train_classifier, predict
from tarflow.sampling import Guidance, tweedie_denoise
from tarflow.train import load_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--guidance", default="0,1,2,3", help="comma-separated weights")
    parser.add_argument("--rule", default="extrapolate", choices=("extrapolate", "density_ratio"))
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="output path (default benchmarks/results/)")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    run = load_run(args.run, with_state=False)
    model, config = run.ema_model, run.config
    classifier, test_accuracy = load_or_train_classifier(config.data.dataset, config.data.root)
    labels = torch.arange(model.num_classes).repeat_interleave(args.per_class)

    rows = []
    for weight in [float(w) for w in args.guidance.split(",")]:
        generator = torch.Generator().manual_seed(args.seed)
        guidance = Guidance(weight, args.rule)
        start = time.perf_counter()
        samples = []
        for i in range(0, len(labels), args.batch_size):
            y = labels[i : i + args.batch_size]
            x = model.sample(len(y), y, args.temperature, guidance, generator)
            if config.train.noise == "gaussian":
                x = tweedie_denoise(model, x, config.train.noise_std, y)
            samples.append(x.clamp(-1, 1))
        seconds = time.perf_counter() - start
        predicted = predict(classifier, torch.cat(samples))
        correct = (predicted == labels).float()
        per_class = correct.view(model.num_classes, -1).mean(1)
        rows.append(
            {
                "guidance": weight,
                "rule": args.rule,
                "accuracy": correct.mean().item(),
                "worst_class_accuracy": per_class.min().item(),
                "num_samples": len(labels),
                "sampling_seconds": seconds,
            }
        )

    print(f"run {args.run}, classifier test accuracy {test_accuracy:.4f}")
    print(f"{'guidance':>9} {'accuracy':>9} {'worst class':>12} {'samples':>8} {'seconds':>8}")
    for r in rows:
        print(
            f"{r['guidance']:>9.2f} {r['accuracy']:>9.4f} {r['worst_class_accuracy']:>12.4f} "
            f"{r['num_samples']:>8d} {r['sampling_seconds']:>8.1f}"
        )
    out = Path(args.json or f"benchmarks/results/sample_quality-{Path(args.run).name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"run": args.run, "classifier_test_accuracy": test_accuracy, "rows": rows}
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
