"""Sampling speed of the inverse solvers, against one parallel forward pass.

For each model, batch size and guidance setting, the same prior draw z is inverted
(noise → data) by every solver, and by a plain version of the sampling loop as first
published (``paper-loop``: no preallocated cache, keys and values appended with
``torch.cat`` at every step, the unconditional branch of guidance run as a second pass).
The floor is the time of one parallel forward pass, ``model.log_prob``, on the same batch.
``selective`` is timed after its calibration, whose cost is reported apart.

    python benchmarks/sampling.py                  # random models, batch 1 and 64
    python benchmarks/sampling.py --run runs/NAME  # the run's EMA model as the demo model
    python benchmarks/sampling.py --quick          # demo model only, batch 1 and 16
    python benchmarks/sampling.py --device cuda    # on a GPU (times synchronise the device)
    python benchmarks/sampling.py --compile        # adds torch.compile'd solvers

With ``--compile``, ``sequential+compile`` and ``gs-jacobi+compile`` rows join the table:
the same solvers with their Transformer passes through ``torch.compile`` (the first
round compiles and is not timed; its time is reported as ``compile_seconds``).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from tarflow import ImageFlow, ImageFlowConfig
from tarflow.flows import AutoregressiveBlock
from tarflow.sampling import Guidance, Solver, calibrate
from tarflow.train import load_run

SOLVER_NAMES = ("sequential", "jacobi", "gs-jacobi", "selective")
COMPILED = ("sequential+compile", "gs-jacobi+compile")
# Random models get head weights N(0, HEAD_STD²): μ and a then have a spread of about 0.25,
# instead of the exact zeros (identity blocks) of a fresh model.
HEAD_STD = 0.02


def perturb_heads(model: ImageFlow, std: float = HEAD_STD, seed: int = 0) -> ImageFlow:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks:
            for p in block.head.parameters():
                p.copy_(std * torch.randn(p.shape, generator=generator))
    return model


def clock(device: torch.device) -> float:
    """Wall time, once the device has finished the work queued so far."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def paper_loop_step(
    block: AutoregressiveBlock, h: Tensor, y: Tensor | None, t: int, cache: list[list[Tensor]]
) -> tuple[Tensor, Tensor]:
    """μ and a of token t from the embedding of token t−1, appending this step's keys and
    values to ``cache`` (one [keys, values] pair per layer, grown by concatenation)."""
    h = h + block.position[:, t : t + 1]
    if block.class_embedding is not None:
        h = h + block.class_embedding(y)[:, None]
    b = h.shape[0]
    for layer, kv in zip(block.layers, cache):
        attn = layer.attn
        q, k, v = (
            attn.qkv(layer.norm1(h))
            .view(b, 1, 3, attn.heads, attn.head_dim)
            .permute(2, 0, 3, 1, 4)
        )
        if kv:
            k, v = torch.cat([kv[0], k], dim=2), torch.cat([kv[1], v], dim=2)
        kv[:] = [k, v]
        out = F.scaled_dot_product_attention(q, k, v)
        h = h + attn.proj(out.transpose(1, 2).reshape(b, 1, -1))
        h = h + layer.mlp(layer.norm2(h))
    mu, a = block.head(block.norm(h)).float().chunk(2, dim=-1)
    c = block.log_scale_bound
    return mu, c * torch.tanh(a / c)


@torch.no_grad()
def paper_loop_inverse(
    model: ImageFlow, z: Tensor, y: Tensor | None, guidance: Guidance | None
) -> tuple[Tensor, int]:
    """Noise → data with the published loop; returns images and Transformer passes."""
    passes = 0
    for transform in reversed(model.flow.transforms):
        if not isinstance(transform, AutoregressiveBlock):
            z = transform.inverse(z, y)
            continue
        block, (b, t_count, _) = transform, z.shape
        guided = guidance is not None and guidance.weight > 0 and y is not None
        null = None if y is None else torch.full_like(y, block.null_class)
        cache: list[list[Tensor]] = [[] for _ in block.layers]
        cache_u: list[list[Tensor]] = [[] for _ in block.layers]
        h = block.start.expand(b, -1, -1)
        tokens = []
        for t in range(t_count):
            mu, a = paper_loop_step(block, h, y, t, cache)
            passes += 1
            if guided:
                assert guidance is not None
                mu_u, a_u = paper_loop_step(block, h, null, t, cache_u)
                passes += 1
                w = guidance.weight_at(torch.tensor([t]), t_count).to(z.device)
                mu, a = guidance.combine(mu, a, mu_u, a_u, w)
            x_t = (z[:, t : t + 1] * torch.exp(a) + mu).to(z.dtype)
            tokens.append(x_t)
            h = block.embed(x_t)
        z = torch.cat(tokens, dim=1)
    return model.patchify.inverse(z), passes


@torch.no_grad()
def bench_setting(
    model: ImageFlow,
    model_name: str,
    batch: int,
    guidance: Guidance | None,
    base: Solver,
    seed: int,
    compile: bool = False,
) -> list[dict]:
    """Rows of one model, batch size and guidance setting.

    The solvers run in rounds, one after the other, so a change in machine load touches
    them alike; each keeps its best time. Batch 1 runs three rounds; larger batches two,
    the slow Jacobi solvers in the first only.
    """
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn((batch, *model.token_shape), generator=generator).to(device)
    y = torch.arange(batch, device=device) % model.num_classes if model.num_classes else None
    weight = guidance.weight if guidance else 0.0

    start = clock(device)
    calibration = calibrate(
        model, batch, y, guidance, replace(base, name="selective"),
        repeats=3 if batch == 1 else 1, seed=seed + 1,
    )
    calibration_seconds = clock(device) - start

    def solve(name: str):
        return lambda: model.inverse_with_stats(z, y, guidance, replace(base, name=name))

    runs = {name: solve(name) for name in SOLVER_NAMES}
    runs["paper-loop"] = lambda: paper_loop_inverse(model, z, y, guidance)
    for name in COMPILED if compile else ():
        solver = replace(base, name=name.removesuffix("+compile"), compile=True)
        runs[name] = lambda solver=solver: model.inverse_with_stats(z, y, guidance, solver)
    slow = {"jacobi", "gs-jacobi"} if batch > 1 else set()
    seconds: dict[str, float] = {}
    compile_seconds: dict[str, float] = {}
    results: dict[str, tuple] = {}
    floor = float("inf")
    for round_index in range(3 if batch == 1 or compile else 2):
        for name, run in runs.items():
            if round_index > 0 and name in slow:
                continue
            begin = clock(device)
            results[name] = run()
            elapsed = clock(device) - begin
            if name in COMPILED and round_index == 0:
                compile_seconds[name] = elapsed
            else:
                seconds[name] = min(seconds.get(name, float("inf")), elapsed)
        # Random models draw values past the range log_prob accepts; the cost is the same.
        images = results["sequential"][0].clamp(-1, 1)
        begin = clock(device)
        model.log_prob(images, y)
        floor = min(floor, clock(device) - begin)

    reference = results["sequential"][0]
    rows = []
    for name in ("sequential", "paper-loop", *SOLVER_NAMES[1:], *compile_seconds):
        x, stats = results[name]
        row = {
            "model": model_name,
            "batch": batch,
            "guidance": weight,
            "solver": name,
            "seconds": seconds[name],
            "samples_per_sec": batch / seconds[name],
            "passes": stats if name == "paper-loop" else sum(s.passes for s in stats),
            "floor_seconds": floor,
            "times_floor": seconds[name] / floor,
            "max_abs_diff": (x - reference).abs().max().item(),
        }
        if name != "paper-loop":
            row["iterations_per_block"] = [
                s.iterations_per_sample.float().mean().item() for s in stats
            ]
        if name in compile_seconds:
            row["compile_seconds"] = compile_seconds[name]
        if name == "selective":
            row["calibration_seconds"] = calibration_seconds
            row["choices"] = [
                c.solver + (f"/{c.chunk_size}" if c.solver == "gs-jacobi" else "")
                for c in calibration.choices
            ]
        rows.append(row)
    return rows


def check_targets(rows: list[dict]) -> list[dict]:
    """The goals set for the solvers, each with the measured figure and whether it holds."""
    settings = sorted({(r["model"], r["batch"], r["guidance"]) for r in rows})
    by = {(r["model"], r["batch"], r["guidance"], r["solver"]): r for r in rows}
    batches = sorted({r["batch"] for r in rows})
    small, large = batches[0], batches[-1]
    checks = []
    for model, batch, weight in settings:
        where = f"{model}, batch {batch}, w={weight:g}"

        def get(solver: str, setting: tuple = (model, batch, weight)) -> dict:
            return by[(*setting, solver)]

        seq = get("sequential")["seconds"]
        if batch == small:
            best = min(get("gs-jacobi")["seconds"], get("selective")["seconds"])
            checks.append({"target": "gs-jacobi or selective >= 5x faster than sequential",
                           "where": where, "value": seq / best, "met": seq / best >= 5})
        if batch == large:
            single = min(get(s)["seconds"] for s in ("sequential", "jacobi", "gs-jacobi"))
            ratio = get("selective")["seconds"] / single
            checks.append({"target": "selective <= best single solver (time ratio)",
                           "where": where, "value": ratio, "met": ratio <= 1.0})
            if weight > 0:
                value = get("selective")["times_floor"]
                checks.append({"target": "selective within 2x of the floor, guided",
                               "where": where, "value": value, "met": value <= 2})
            value = get("paper-loop")["seconds"] / seq
            checks.append({"target": "sequential >= 2x faster than the paper loop",
                           "where": where, "value": value, "met": value >= 2})
    worst = max(r["max_abs_diff"] for r in rows)
    checks.append({"target": "max abs difference from sequential <= 1e-3",
                   "where": "all rows", "value": worst, "met": worst <= 1e-3})
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="run directory: use its EMA model")
    parser.add_argument("--quick", action="store_true", help="demo model, batch 1 and 16")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated (default 1,64)")
    parser.add_argument("--guidance", type=float, default=2.0, help="weight of guided rows")
    parser.add_argument("--tol", type=float, default=Solver.tol)
    parser.add_argument("--chunk-size", type=int, default=Solver.chunk_size)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--compile", action="store_true", help="torch.compile every solver")
    parser.add_argument("--json", default="benchmarks/results/sampling.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    base = Solver("sequential", args.tol, None, args.chunk_size)
    default_batches = "1,16" if args.quick else "1,64"
    batches = [int(b) for b in (args.batch_sizes or default_batches).split(",")]

    demo = ImageFlowConfig(image_size=28, channels=1, patch_size=4, width=128, heads=4,
                           block_depths=[4, 4, 4, 4], num_classes=10)
    if args.run:
        run = load_run(args.run, with_state=False)
        models = {"demo": run.ema_model.float()}
        source = f"demo: EMA weights of {args.run} ({run.folder.name})"
    else:
        torch.manual_seed(args.seed)
        models = {"demo": perturb_heads(ImageFlow(demo))}
        source = (f"demo: 28x28x1, patch 4, width 128, 4 blocks x 4 layers, random with "
                  f"head weights N(0, {HEAD_STD}^2)")
    if not args.quick:
        deep = ImageFlowConfig(**{**vars(demo), "block_depths": [4] * 8})
        torch.manual_seed(args.seed + 1)
        models["deep"] = perturb_heads(ImageFlow(deep), seed=1)
        source += "; deep: the demo architecture with 8 blocks, random likewise"
    for model in models.values():
        model.eval().to(device)

    rows = []
    for name, model in models.items():
        for batch in batches:
            for weight in (0.0, args.guidance):
                guidance = Guidance(weight) if weight > 0 else None
                rows += bench_setting(model, name, batch, guidance, base, args.seed, args.compile)
                done = next(r for r in reversed(rows) if r["solver"] == "selective")
                print(f"  measured {name} batch {batch} w={weight:g} "
                      f"(calibration {done['calibration_seconds']:.1f} s)", flush=True)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\nmodels: {source}; {where}, {args.threads} CPU thread(s), torch {torch.__version__}"
          f"{', with torch.compile rows' if args.compile else ''}")
    print(f"solver settings: tol {args.tol:g}, chunk size {args.chunk_size}, guidance "
          f"rule extrapolate\n")
    header = (f"{'model':<6} {'batch':>5} {'w':>4} {'solver':<18} {'seconds':>8} "
              f"{'samples/s':>10} {'passes':>7} {'x floor':>8} {'max|dx|':>9}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['model']:<6} {r['batch']:>5} {r['guidance']:>4g} {r['solver']:<18} "
              f"{r['seconds']:>8.3f} {r['samples_per_sec']:>10.1f} {r['passes']:>7} "
              f"{r['times_floor']:>8.1f} {r['max_abs_diff']:>9.1e}")
    print("\nselective choices (noise side first):")
    for r in rows:
        if r["solver"] == "selective":
            print(f"  {r['model']} batch {r['batch']} w={r['guidance']:g}: "
                  f"{' '.join(r['choices'])} (calibration {r['calibration_seconds']:.1f} s)")

    checks = check_targets(rows)
    print("\ntargets:")
    for c in checks:
        print(f"  [{'met' if c['met'] else 'MISSED'}] {c['target']}: {c['value']:.3g} "
              f"({c['where']})")

    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "models": source,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "compile": args.compile,
        "settings": {"tol": args.tol, "chunk_size": args.chunk_size, "guidance": args.guidance,
                     "batch_sizes": batches, "quick": args.quick},
        "rows": rows,
        "targets": checks,
    }
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
