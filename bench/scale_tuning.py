"""The one rule for tuning a variance scale s, shared by every method with a Gaussian over
logits and by the harness: the probit predictive's validation NLL over one log grid.

A tuned s on the grid's floor means the variance was switched off (the predictive is the mean's
softmax); on its ceiling, that the best s may lie above the grid. Both are flagged, never a
quiet choice. Where the validation NLL curve is flat — no grid point is worse than the best by
more than the paired bootstrap's 95 % interval over the validation inputs and NLL_RESOLUTION — the
edge is not a choice at all, and the flag says that the variance does not change NLL there instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from bench.errors import BenchError
from bench.formulas import nll_per_input, probit_probs, probit_shrink
from bench.method_api import grid_edge_flag

# Variance scales s tried on validation NLL: 10^-4 … 10^4 (s = 1 is the untuned Bayesian value).
SCALE_GRID: tuple[float, ...] = tuple(10.0 ** (k / 4) for k in range(-16, 17))
# A grid point counts as worse than the best only when the bootstrap's 95 % interval of its mean
# validation NLL minus the best's lies above NLL_RESOLUTION nats (differences of 1e-6 are no choice).
NLL_RESOLUTION = 1e-4
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0


def best_on_curve(curve: torch.Tensor, grid: Sequence[float] = SCALE_GRID) -> tuple[float, float]:
    """The scale of ``grid`` with the lowest mean NLL on a ``scale_curve`` (the first of equal
    minima), and that NLL."""
    means = curve.mean(1).tolist()
    best = min(range(len(grid)), key=lambda i: (means[i], i))
    return float(grid[best]), means[best]


def tune_scale(
    logits: torch.Tensor,
    variance: torch.Tensor,
    labels: torch.Tensor,
    grid: Sequence[float] = SCALE_GRID,
) -> tuple[float, float]:
    """The variance scale s from ``grid`` with the lowest validation NLL, and that NLL."""
    return best_on_curve(scale_curve(logits, variance, labels, grid), grid)


def worse_than_best(per_input: torch.Tensor) -> list[bool]:
    """For each row of a (grid points × inputs) table of per-input NLLs: is its mean worse than
    the best row's beyond noise, i.e. does the paired bootstrap 95 % interval of the difference
    (resampling inputs, seeded) lie above NLL_RESOLUTION?"""
    means = per_input.mean(1)
    diffs = per_input - per_input[int(means.argmin())]
    n = per_input.shape[1]
    gen = torch.Generator().manual_seed(BOOTSTRAP_SEED)
    rows = torch.randint(0, n, (BOOTSTRAP_RESAMPLES, n), generator=gen)
    # one grid point at a time (a grid × resamples × inputs tensor would not fit in memory)
    return [float(torch.quantile(d[rows].mean(1), 0.025)) > NLL_RESOLUTION for d in diffs]


def flat_within_noise(per_input: torch.Tensor) -> bool:
    """Whether a (grid points × inputs) table of per-input validation NLLs is flat: for every
    grid point, the paired bootstrap 95 % interval of its mean NLL minus the best point's
    (resampling inputs, seeded) reaches down to NLL_RESOLUTION."""
    return not any(worse_than_best(per_input))


def scale_curve(logits: torch.Tensor, variance: torch.Tensor, labels: torch.Tensor,
                grid: Sequence[float] = SCALE_GRID) -> torch.Tensor:
    """Per-input validation NLL of the probit predictive at every s in ``grid`` (grid × inputs)."""
    if not grid:
        raise BenchError("the variance-scale grid is empty; give at least one value")
    curve = torch.stack([nll_per_input(probit_probs(logits, variance, s), labels) for s in grid])
    means = curve.mean(1)
    if bad := [s for s, v in zip(grid, means.tolist(), strict=True) if not math.isfinite(v)]:
        raise BenchError(
            f"variance-scale tuning: the validation NLL is not finite at scale(s) {bad[:3]} "
            "(NaN or inf logits or variances); a NaN objective is never a choice, check the fit's solver flags"
        )
    return curve


def scale_edge_flag(scale: float, variance: torch.Tensor, grid: Sequence[float] = SCALE_GRID,
                    curve: torch.Tensor | None = None) -> str | None:
    """The flag for a tuned variance scale on an edge of ``grid`` (see ``grid_edge_flag``); with
    the validation ``curve`` (``scale_curve``), a flat one says so instead. Otherwise it says how
    much the variance still acts there: the median factor by which the probit
    shrinks the logits of the validation inputs (1.0: the variance is switched off)."""
    if curve is not None and (scale <= min(grid) or scale >= max(grid)) and flat_within_noise(curve):
        return (f"the variance does not change validation NLL here: every scale s on the grid "
                f"[{min(grid):.3g}, {max(grid):.3g}] is within the bootstrap noise of the best, so s={scale:.3g} is "
                "not a tuned choice")
    shrink = float(probit_shrink(variance, scale).median())
    if scale <= min(grid):
        verdict = "i.e. the variance is switched off" if shrink > 0.999 else "so the best scale may lie below the grid"
        meaning = f"the logits shrink by a median factor {shrink:.6f} there, {verdict}"
    else:
        meaning = f"the logits shrink by a median factor {shrink:.4f} there; the best scale may lie above the grid"
    return grid_edge_flag("variance scale s", scale, grid, meaning)
