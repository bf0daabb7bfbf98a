"""Solvers for the inverse of an autoregressive block (noise → data), and their calibration.

Inverting a block means solving x = g(x) with g_t(x) = z_t·exp(a_t(x_<t)) + μ_t(x_<t): a
triangular system, since token t of g(x) reads only the tokens before t. Four solvers:

- ``"sequential"``: one token per Transformer pass, T passes of one token each, with the
  keys and values of earlier tokens cached. Exact.
- ``"jacobi"``: every token updated in parallel from the previous iterate,
  x⁽ᵏ⁺¹⁾ = g(x⁽ᵏ⁾), one Transformer pass over all T tokens per iteration. After iteration
  k the first k tokens are exact, so T iterations give the exact inverse; usually far
  fewer are needed before the iterates stop moving.
- ``"gs-jacobi"``: the sequence is cut into chunks; Jacobi runs inside a chunk and the
  chunks are solved in order (Gauss–Seidel across chunks), with the finished chunks in the
  key/value cache.
- ``"selective"``: per block, whichever of the three a calibration run (:func:`calibrate`)
  found fastest on this model, batch size and machine.

Every iterative solver starts from x⁽⁰⁾ = z (the inverse of a block near the identity),
judges convergence per sample by the relative change ‖x⁽ᵏ⁺¹⁾ − x⁽ᵏ⁾‖ / ‖x⁽ᵏ⁺¹⁾‖ over the
tokens being solved, and stops updating a sample, and running the Transformer on it, as
soon as that falls to ``tol``. References: Zhai et al., "Normalizing Flows are Capable
Generative Models" (2024); Liu et al., "Accelerate TarFlow Sampling with GS-Jacobi
Iteration" (2025).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from tarflow.atomic import atomic_write_text
from tarflow.nn.attention import KVCache
from tarflow.sampling.guidance import Guidance

if TYPE_CHECKING:
    from tarflow.flows.autoregressive import AutoregressiveBlock
    from tarflow.models.image_flow import ImageFlow

log = logging.getLogger(__name__)

SOLVERS = ("sequential", "jacobi", "gs-jacobi", "selective")
BLOCK_SOLVERS = SOLVERS[:3]

Predict = Callable[..., tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class Solver:
    """How to invert autoregressive blocks (noise → data).

    Arguments:
        name: one of :data:`SOLVERS`.
        tol: a sample stops iterating once the relative change of its iterate,
            ‖x⁽ᵏ⁺¹⁾ − x⁽ᵏ⁾‖ / ‖x⁽ᵏ⁺¹⁾‖ over the tokens being solved, is ≤ tol. 0 iterates
            until the result is exact. Unused by ``"sequential"``.
        max_iters: most Jacobi iterations per chunk (per sequence for ``"jacobi"``);
            None for the chunk length, where the result is exact whatever ``tol``.
        chunk_size: tokens per chunk of ``"gs-jacobi"``. A chunk is exact after as many
            iterations as it has tokens, so chunks gain only when they are clearly longer
            than the iterations Jacobi needs to converge.
        compile: run the Transformer pass through ``torch.compile`` (the first call of
            each new shape compiles, which takes a while).

    Warning:
        With ``max_iters`` below the chunk length the result is not exact when a sample
        has not converged by then.
    """

    name: str = "sequential"
    tol: float = 1e-5
    max_iters: int | None = None
    chunk_size: int = 16
    compile: bool = False

    def __post_init__(self) -> None:
        if self.name not in SOLVERS:
            raise ValueError(f"unknown solver {self.name!r}; choose one of {SOLVERS}")
        if not isinstance(self.tol, (int, float)) or not (0 <= self.tol < 1):
            raise ValueError(
                f"solver tolerance must be a finite number in [0, 1), got {self.tol!r}"
            )
        if self.max_iters is not None and (
            not isinstance(self.max_iters, int) or self.max_iters < 1
        ):
            raise ValueError(f"max_iters must be None or an integer >= 1, got {self.max_iters!r}")
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"chunk_size must be an integer >= 1, got {self.chunk_size!r}")

    @classmethod
    def of(cls, solver: Solver | str) -> Solver:
        """A :class:`Solver` from itself or from a name (with default settings)."""
        return solver if isinstance(solver, Solver) else cls(solver)


@dataclass
class SolverStats:
    """What the inversion of one block did.

    Attributes:
        solver: the solver that ran (``"sequential"``, ``"jacobi"`` or ``"gs-jacobi"``).
        chunk_size: tokens per chunk (1 for sequential, T for jacobi).
        iterations: (num_chunks, B) Transformer passes each sample took in each chunk, on
            the sampling device.
        passes: Transformer calls in all.
        token_rows: sum over the calls of rows × tokens fed to the Transformer (guidance
            doubles the rows): the work done, in tokens.
    """

    solver: str
    chunk_size: int
    iterations: Tensor
    passes: int
    token_rows: int

    @property
    def iterations_per_sample(self) -> Tensor:
        """(B,) passes per sample, summed over chunks."""
        return self.iterations.sum(0)


def invert_block(
    block: AutoregressiveBlock,
    z: Tensor,
    y: Tensor | None = None,
    guidance: Guidance | None = None,
    solver: Solver | str = "sequential",
) -> tuple[Tensor, SolverStats]:
    """Noise → data through one block with the chosen solver.

    Arguments:
        block: the block to invert.
        z: its noise-side tokens (B, T, d).
        y: class labels (B,) for a conditioned block.
        guidance: classifier-free guidance; the conditional and unconditional branches
            run as one batch of 2B.
        solver: a :class:`Solver` or a solver name. ``"selective"`` is resolved per block
            by :meth:`tarflow.ImageFlow.inverse` and is not accepted here.

    Returns:
        The data-side tokens x (B, T, d) and what the solver did.
    """
    solver = Solver.of(solver)
    if solver.name == "sequential":
        return sequential_inverse(block, z, y, guidance, compiled=solver.compile)
    predict = compiled_predict() if solver.compile else type(block).predict
    if solver.name == "jacobi":
        return jacobi_inverse(
            block, z, y, guidance, z.shape[1], solver.tol, solver.max_iters, predict
        )
    if solver.name == "gs-jacobi":
        return jacobi_inverse(
            block, z, y, guidance, solver.chunk_size, solver.tol, solver.max_iters, predict
        )
    raise ValueError(
        f"solver {solver.name!r} chooses per block of a calibrated model: pass it to "
        f"ImageFlow.inverse or ImageFlow.sample; for one block choose one of {BLOCK_SOLVERS}"
    )


_compiled: Predict | None = None
_compiled_step: Predict | None = None
# A sampling process meets one graph per block depth and number of Transformer rows (and,
# for the Jacobi solvers, per chunk length and cache fill); dynamo's default limit of 8
# graphs per function would send the rest back to eager mode with a warning.
RECOMPILE_LIMIT = 64


def allow_recompiles() -> None:
    """Raises dynamo's per-function graph limit to :data:`RECOMPILE_LIMIT` (never lowers
    it)."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))


def compiled_predict() -> Predict:
    """``AutoregressiveBlock.predict`` through ``torch.compile``, compiled once for all
    blocks (their weights are inputs of the compiled graph, not constants)."""
    global _compiled
    if _compiled is None:
        from tarflow.flows.autoregressive import AutoregressiveBlock

        allow_recompiles()
        _compiled = torch.compile(AutoregressiveBlock.predict, dynamic=True)
    return _compiled


def compiled_step() -> Predict:
    """``AutoregressiveBlock.predict_at`` through ``torch.compile`` with static shapes: one
    graph per batch size and block depth, reused at every position (the position is a
    tensor, not a constant of the graph)."""
    global _compiled_step
    if _compiled_step is None:
        from tarflow.flows.autoregressive import AutoregressiveBlock

        allow_recompiles()
        _compiled_step = torch.compile(AutoregressiveBlock.predict_at, dynamic=False)
    return _compiled_step


def branches(
    block: AutoregressiveBlock, z: Tensor, y: Tensor | None, guidance: Guidance | None
) -> tuple[Tensor | None, Tensor | None]:
    """Labels of the Transformer rows and the guidance weight of each position.

    With guidance the rows are the B conditional ones followed by B unconditional ones
    (null class); the weights are (1, T, 1). Without guidance: ``y`` and None.
    """
    if block.conditioned and y is None:
        raise ValueError("this block is class-conditioned: pass labels y")
    if guidance is None or guidance.weight == 0 or not block.conditioned:
        return y, None
    assert y is not None
    t_count = z.shape[1]
    w = guidance.weight_at(torch.arange(t_count, device=z.device), t_count)
    return torch.cat([y, torch.full_like(y, block.null_class)]), w


def sequential_inverse(
    block: AutoregressiveBlock,
    z: Tensor,
    y: Tensor | None = None,
    guidance: Guidance | None = None,
    compiled: bool = False,
) -> tuple[Tensor, SolverStats]:
    """Noise → data one token at a time: T Transformer passes of one token each, the keys
    and values of earlier tokens read from a preallocated cache.

    Arguments:
        block: the block to invert.
        z: noise-side tokens (B, T, d).
        y: class labels (B,) for a conditioned block.
        guidance: classifier-free guidance, run as one batch of 2B.
        compiled: run each step through :func:`compiled_step` (static shapes, attention
            over the whole cache with a mask) instead of ``AutoregressiveBlock.predict``.

    Returns:
        The data-side tokens x (B, T, d) and what was done.
    """
    b, t_count, _ = z.shape
    y_rows, w = branches(block, z, y, guidance)
    rows = b if w is None else 2 * b
    if compiled:
        step = compiled_step()
        positions = torch.arange(t_count, device=z.device)

        def predict(t: int) -> tuple[Tensor, Tensor]:
            return step(block, inputs, y_rows, positions[t : t + 1], caches)
    else:

        def predict(t: int) -> tuple[Tensor, Tensor]:
            return type(block).predict(block, inputs, y_rows, t, caches)

    caches = block.new_caches(rows, z.dtype, z.device)
    x = torch.empty_like(z)
    # Without gradients, a view of the start parameter would still report requires_grad
    # and cost the compiled step a second graph.
    start = block.start if torch.is_grad_enabled() else block.start.detach()
    inputs = start.expand(rows, -1, -1).to(z.dtype).contiguous()
    for t in range(t_count):
        mu, a = predict(t)
        for cache in caches:
            cache.advance(1)
        if w is not None:
            assert guidance is not None
            mu, a = guidance.combine(mu[:b], a[:b], mu[b:], a[b:], w[:, t : t + 1])
        x_t = (z[:, t : t + 1] * torch.exp(a) + mu).to(z.dtype)
        x[:, t : t + 1] = x_t
        if t + 1 < t_count:
            h = block.embed(x_t)
            inputs = h if w is None else torch.cat([h, h])

    iterations = torch.ones(t_count, b, dtype=torch.long, device=z.device)
    return x, SolverStats("sequential", 1, iterations, t_count, t_count * rows)


def jacobi_inverse(
    block: AutoregressiveBlock,
    z: Tensor,
    y: Tensor | None = None,
    guidance: Guidance | None = None,
    chunk_size: int | None = None,
    tol: float = 1e-5,
    max_iters: int | None = None,
    predict: Predict | None = None,
) -> tuple[Tensor, SolverStats]:
    """Noise → data by Jacobi iteration, chunk by chunk (GS-Jacobi); one chunk of all T
    tokens is plain Jacobi.

    Inside a chunk of n tokens starting at s, every iteration runs the Transformer once on
    the chunk's inputs (the embeddings of x_{s−1} … x_{s+n−2}), reading the finished chunks
    from the key/value cache and writing the chunk's own keys and values over those of
    the previous iteration; all n tokens are then updated at once,
    x⁽ᵏ⁺¹⁾ = z·exp(a(x⁽ᵏ⁾)) + μ(x⁽ᵏ⁾), from x⁽⁰⁾ = z. A sample leaves the iteration when its
    relative change is ≤ ``tol``; the Transformer then runs on the remaining samples only.
    After n iterations the chunk is exact, keys and values included, so at most
    min(n, max_iters) iterations run. A chunk is committed to the cache once every sample
    has left it.

    Arguments:
        block: the block to invert.
        z: noise-side tokens (B, T, d).
        y: class labels (B,) for a conditioned block.
        guidance: classifier-free guidance, run as one batch of 2B.
        chunk_size: tokens per chunk; None or ≥ T for plain Jacobi.
        tol: relative-change tolerance, see :class:`Solver`.
        max_iters: most iterations per chunk; None for the chunk length (exact).
        predict: the Transformer pass, ``AutoregressiveBlock.predict`` or a compiled copy.

    Returns:
        The data-side tokens x (B, T, d) and what was done.
    """
    predict = predict or type(block).predict
    b, t_count, _ = z.shape
    chunk_size = min(chunk_size or t_count, t_count)
    y_all, w = branches(block, z, y, guidance)
    guided = w is not None
    num_chunks = math.ceil(t_count / chunk_size)
    wide = torch.promote_types(z.dtype, torch.float32)

    # One chunk covering the sequence needs no cache: the pass is a plain causal one.
    caches = (
        None if num_chunks == 1 else block.new_caches(2 * b if guided else b, z.dtype, z.device)
    )
    x = torch.empty_like(z)
    iterations = torch.zeros(num_chunks, b, dtype=torch.long, device=z.device)
    passes = token_rows = 0
    everyone = torch.arange(b, device=z.device)

    for c, s in enumerate(range(0, t_count, chunk_size)):
        e = min(s + chunk_size, t_count)
        limit = e - s if max_iters is None else min(max_iters, e - s)

        # State of the samples still iterating: their ids, z, iterate, first input, labels.
        active = everyone
        z_c = x_c = z[:, s:e]
        first = (
            block.start.expand(b, -1, -1).to(z.dtype) if s == 0 else block.embed(x[:, s - 1 : s])
        )
        y_c = y_all
        layer_caches = caches

        for k in range(1, limit + 1):
            inputs = torch.cat([first, block.embed(x_c[:, :-1])], dim=1)
            if guided:
                inputs = torch.cat([inputs, inputs])
            mu, a = predict(block, inputs, y_c, s, layer_caches)
            passes += 1
            token_rows += inputs.shape[0] * inputs.shape[1]
            if guided:
                assert guidance is not None
                n = active.numel()
                mu, a = guidance.combine(mu[:n], a[:n], mu[n:], a[n:], w[:, s:e])
            new = (z_c * torch.exp(a) + mu).to(z.dtype)
            x[active, s:e] = new
            iterations[c, active] = k
            if k == limit:
                break

            change = (new - x_c).to(wide).flatten(1).norm(dim=1)
            done = change <= tol * new.to(wide).flatten(1).norm(dim=1)
            x_c = new
            # The convergence check: the one host-device synchronisation per iteration.
            keep = (~done).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            if keep.numel() < active.numel():
                rows_before = transformer_rows(active, b, guided)
                active, z_c, x_c, first = active[keep], z_c[keep], x_c[keep], first[keep]
                rows_after = transformer_rows(active, b, guided)
                y_c = None if y_all is None else y_all[rows_after]
                if layer_caches is not None:
                    assert caches is not None
                    layer_caches = select_rows(caches, layer_caches, rows_before, rows_after, s, e)

        if caches is not None and e < t_count:
            if layer_caches is not caches:
                store_rows(caches, layer_caches, transformer_rows(active, b, guided), s, e)
            for cache in caches:
                cache.advance(e - s)

    return x, SolverStats(
        "jacobi" if num_chunks == 1 else "gs-jacobi",
        chunk_size,
        iterations,
        passes,
        token_rows,
    )


def transformer_rows(samples: Tensor, batch: int, guided: bool) -> Tensor:
    """Transformer rows of the given samples: themselves, and with guidance also their
    unconditional twins B rows further."""
    return torch.cat([samples, samples + batch]) if guided else samples


def store_rows(
    caches: list[KVCache], sub: list[KVCache], rows: Tensor, start: int, end: int
) -> None:
    """Copies the keys and values of positions start…end−1 from the caches of a subset of
    rows back into the full caches."""
    for full, part in zip(caches, sub):
        full.keys[rows, :, start:end] = part.keys[:, :, start:end]
        full.values[rows, :, start:end] = part.values[:, :, start:end]


def select_rows(
    caches: list[KVCache],
    current: list[KVCache],
    rows_before: Tensor,
    rows_after: Tensor,
    start: int,
    end: int,
) -> list[KVCache]:
    """Caches for the rows still iterating on the chunk start…end−1.

    The chunk's keys and values written so far go back to the full caches (the rows that
    just converged keep theirs there); the committed prefix of the remaining rows is
    copied into new, smaller caches, which the next iterations write their chunk into.
    """
    if current is not caches:
        store_rows(caches, current, rows_before, start, end)
    selected = []
    for full in caches:
        _, heads, _, head_dim = full.keys.shape
        part = KVCache(rows_after.numel(), heads, end, head_dim, full.keys.dtype, full.keys.device)
        part.keys[:, :, :start] = full.keys[rows_after, :, :start]
        part.values[:, :, :start] = full.values[rows_after, :, :start]
        part.advance(start)
        selected.append(part)
    return selected


@dataclass
class BlockChoice:
    """The solver :func:`calibrate` picked for one block, and what it measured.

    Attributes:
        solver: ``"sequential"``, ``"jacobi"`` or ``"gs-jacobi"``.
        chunk_size: chunk length for ``"gs-jacobi"``.
        seconds: best measured time of each candidate, keyed ``"sequential"``,
            ``"jacobi"``, ``"gs-jacobi/16"``, …; for a candidate in ``stopped`` a lower
            bound.
        iterations: mean Jacobi iterations per sample of each iterative candidate that
            ran to the end.
        stopped: candidates stopped early, once they could no longer be the fastest.
    """

    solver: str
    chunk_size: int
    seconds: dict[str, float] = field(default_factory=dict)
    iterations: dict[str, float] = field(default_factory=dict)
    stopped: list[str] = field(default_factory=list)


@dataclass
class Calibration:
    """Per-block solver choices for ``"selective"``, in inversion order (the block next to
    the prior first), with the conditions they were measured under.

    The choice depends on the machine, batch size and guidance as much as on the weights,
    so it is kept out of the checkpoint: :meth:`save` writes it as JSON beside a run.
    """

    choices: list[BlockChoice]
    batch_size: int
    guided: bool
    device: str
    dtype: str
    tol: float
    max_iters: int | None
    chunk_sizes: list[int]

    def solver_for(self, index: int, base: Solver) -> Solver:
        """The solver of the ``index``-th block inverted, with ``base``'s tolerances."""
        choice = self.choices[index]
        return replace(base, name=choice.solver, chunk_size=choice.chunk_size)

    def matches(
        self,
        batch_size: int,
        guided: bool,
        device: torch.device,
        dtype: torch.dtype,
        solver: Solver,
        chunk_sizes: Sequence[int],
    ) -> bool:
        """Whether this calibration was made under the given conditions."""
        return (
            self.batch_size == batch_size
            and self.guided == guided
            and self.device == device.type
            and self.dtype == str(dtype)
            and self.tol == solver.tol
            and self.max_iters == solver.max_iters
            and self.chunk_sizes == list(chunk_sizes)
        )

    def save(self, path: str | Path) -> None:
        """Writes the calibration as JSON, atomically (other processes may be reading)."""
        atomic_write_text(path, json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        """Reads a calibration written by :meth:`save`.

        Raises:
            ValueError: the file is not a calibration.
        """
        try:
            data = json.loads(Path(path).read_text())
            data["choices"] = [BlockChoice(**c) for c in data["choices"]]
            calibration = cls(**data)
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path} is not a solver calibration: {err}") from err
        for choice in calibration.choices:
            if choice.solver not in BLOCK_SOLVERS:
                raise ValueError(f"{path}: unknown solver {choice.solver!r} in a block choice")
        return calibration


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_solver(
    block: AutoregressiveBlock,
    z: Tensor,
    y: Tensor | None,
    guidance: Guidance | None,
    solver: Solver,
    repeats: int,
) -> tuple[float, Tensor, SolverStats]:
    """Best wall time of ``repeats`` inversions of one block, with the last result."""
    best = math.inf
    for _ in range(repeats):
        synchronize(z.device)
        start = time.perf_counter()
        x, stats = invert_block(block, z, y, guidance, solver)
        synchronize(z.device)
        best = min(best, time.perf_counter() - start)
    return best, x, stats


@torch.no_grad()
def calibrate(
    model: ImageFlow,
    batch_size: int = 16,
    y: Tensor | None = None,
    guidance: Guidance | None = None,
    solver: Solver | str = "selective",
    chunk_sizes: Sequence[int] | None = None,
    repeats: int = 2,
    seed: int = 0,
) -> Calibration:
    """Times every solver on every block of ``model`` and stores the fastest per block as
    ``model.solver_calibration``, which ``solver="selective"`` then uses.

    A batch drawn from the prior is inverted block by block (noise → data). Each block's
    input goes to every candidate — sequential, jacobi, and gs-jacobi for each chunk
    size — ``repeats`` times, and the best time counts (the first run doubles as a
    warm-up). An iterative candidate is first timed with one pass per chunk; it is
    dropped when that alone is slower than the best so far, and otherwise run with at most
    as many passes per chunk as fit in the best time (plus one), so a slow candidate costs
    about the best time, not its own. Calibrate with the batch size, guidance and device
    you will sample with: the fastest solver depends on them.

    Arguments:
        model: the flow to calibrate.
        batch_size: samples in the calibration batch.
        y: labels (batch_size,) of a class-conditional model; default cycles the classes.
        guidance: the guidance to sample with.
        solver: tolerance and iteration cap used while timing (its name is ignored).
        chunk_sizes: gs-jacobi chunk lengths to try; default ``solver.chunk_size``.
        repeats: timed runs of each candidate.
        seed: seed of the calibration batch.

    Returns:
        The calibration (also set on the model).
    """
    from tarflow.flows.autoregressive import AutoregressiveBlock

    base = Solver.of(solver)
    chunk_sizes = list(chunk_sizes or [base.chunk_size])
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    if model.num_classes and y is None:
        y = torch.arange(batch_size, device=device) % model.num_classes
    model.check_labels(y, batch_size)
    generator = torch.Generator().manual_seed(seed)
    z = model.prior.sample((batch_size, *model.token_shape), 1.0, generator, dtype, device)
    t_count = model.token_shape[0]

    candidates = {"jacobi": replace(base, name="jacobi", chunk_size=t_count)}
    for n in chunk_sizes:
        candidates[f"gs-jacobi/{n}"] = replace(base, name="gs-jacobi", chunk_size=n)
    # One untimed run of each kind of pass first: the first call of a shape pays one-off
    # costs (allocation, kernel selection) that would otherwise count against a solver.
    first_block = model.blocks[-1]
    for warm in (replace(base, name="sequential"), replace(base, name="jacobi", max_iters=1)):
        invert_block(first_block, z, y, guidance, warm)

    choices = []
    for transform in reversed(model.flow.transforms):
        if not isinstance(transform, AutoregressiveBlock):
            z = transform.inverse(z, y)
            continue
        best, x, _ = time_solver(
            transform, z, y, guidance, replace(base, name="sequential"), repeats
        )
        choice = BlockChoice("sequential", base.chunk_size, {"sequential": best})
        for key, candidate in candidates.items():
            one_pass, _, _ = time_solver(
                transform, z, y, guidance, replace(candidate, max_iters=1), repeats
            )
            if one_pass >= best:
                choice.seconds[key] = one_pass
                choice.stopped.append(key)
                continue
            cap = int(best / one_pass) + 1
            capped = cap < min(candidate.chunk_size, t_count, candidate.max_iters or t_count)
            seconds, _, stats = time_solver(
                transform,
                z,
                y,
                guidance,
                replace(candidate, max_iters=cap) if capped else candidate,
                repeats,
            )
            if capped and (stats.iterations >= cap).any():
                if seconds >= best:
                    choice.seconds[key] = seconds
                    choice.stopped.append(key)
                    continue
                seconds, _, stats = time_solver(transform, z, y, guidance, candidate, repeats)
            choice.seconds[key] = seconds
            choice.iterations[key] = stats.iterations_per_sample.float().mean().item()
            if seconds < best:
                best, choice.solver = seconds, candidate.name
                choice.chunk_size = candidate.chunk_size
        choices.append(choice)
        log.info(
            "block %d (noise side first): %s (%s)",
            len(choices) - 1,
            choice.solver,
            ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in choice.seconds.items()),
        )
        z = x

    calibration = Calibration(
        choices,
        batch_size,
        guidance is not None and guidance.weight > 0 and model.num_classes > 0,
        device.type,
        str(dtype),
        base.tol,
        base.max_iters,
        chunk_sizes,
    )
    model.solver_calibration = calibration
    return calibration


def load_or_calibrate(
    model: ImageFlow,
    path: str | Path,
    batch_size: int,
    y: Tensor | None = None,
    guidance: Guidance | None = None,
    solver: Solver | str = "selective",
    chunk_sizes: Sequence[int] | None = None,
    save: bool = True,
) -> Calibration:
    """The calibration stored at ``path`` when it was made under the same conditions,
    else a new one, written to ``path`` unless ``save`` is false; either way set on the
    model."""
    base = Solver.of(solver)
    chunk_sizes = list(chunk_sizes or [base.chunk_size])
    param = next(model.parameters())
    guided = guidance is not None and guidance.weight > 0 and model.num_classes > 0
    path = Path(path)
    if path.is_file():
        stored = Calibration.load(path)
        if stored.matches(batch_size, guided, param.device, param.dtype, base, chunk_sizes):
            if len(stored.choices) != len(model.blocks):
                raise ValueError(
                    f"{path} holds {len(stored.choices)} block choices but the "
                    f"model has {len(model.blocks)} blocks"
                )
            model.solver_calibration = stored
            return stored
        log.info("%s was made for other sampling settings; calibrating again", path)
    else:
        log.info("calibrating the selective solver (written to %s)", path)
    calibration = calibrate(model, batch_size, y, guidance, base, chunk_sizes)
    if save:
        calibration.save(path)
    return calibration
