"""The one rule for tuning a variance scale s, shared by every method with a Gaussian over
logits and by the harness: the probit predictive's validation NLL over one log grid.

A tuned s on the grid's floor means the variance was switched off (the predictive is the mean's
softmax); on its ceiling, that the best s may lie above the grid. Both are flagged, never a
quiet choice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from bench.errors import BenchError
from bench.formulas import nll, probit_probs, probit_shrink
from bench.method_api import grid_edge_flag

# Variance scales s tried on validation NLL: 10^-4 … 10^4 (s = 1 is the untuned Bayesian value).
SCALE_GRID: tuple[float, ...] = tuple(10.0 ** (k / 4) for k in range(-16, 17))


def scale_nlls(
    logits: torch.Tensor,
    variance: torch.Tensor,
    labels: torch.Tensor,
    grid: Sequence[float] = SCALE_GRID,
) -> list[float]:
    """Validation NLL of the probit predictive for every variance scale s in ``grid``."""
    if not grid:
        raise BenchError("the variance-scale grid is empty; give at least one value")
    scores = [nll(probit_probs(logits, variance, s), labels) for s in grid]
    if bad := [s for s, v in zip(grid, scores, strict=True) if not math.isfinite(v)]:
        raise BenchError(
            f"variance-scale tuning: the validation NLL is not finite at scale(s) {bad[:3]} "
            "(NaN or inf logits or variances); a NaN objective is never a choice, check the fit's solver flags"
        )
    return scores


def tune_scale(
    logits: torch.Tensor,
    variance: torch.Tensor,
    labels: torch.Tensor,
    grid: Sequence[float] = SCALE_GRID,
) -> tuple[float, float]:
    """The variance scale s from ``grid`` with the lowest validation NLL, and that NLL."""
    scores = scale_nlls(logits, variance, labels, grid)
    best = min(range(len(grid)), key=lambda i: (scores[i], i))
    return float(grid[best]), scores[best]


def scale_edge_flag(scale: float, variance: torch.Tensor, grid: Sequence[float] = SCALE_GRID) -> str | None:
    """The flag for a tuned variance scale on an edge of ``grid`` (see ``grid_edge_flag``),
    saying how much the variance still acts there: the median factor by which the probit
    shrinks the logits of the validation inputs (1.0: the variance is switched off)."""
    shrink = float(probit_shrink(variance, scale).median())
    if scale <= min(grid):
        verdict = "i.e. the variance is switched off" if shrink > 0.999 else "so the best scale may lie below the grid"
        meaning = f"the logits shrink by a median factor {shrink:.6f} there, {verdict}"
    else:
        meaning = f"the logits shrink by a median factor {shrink:.4f} there; the best scale may lie above the grid"
    return grid_edge_flag("variance scale s", scale, grid, meaning)
