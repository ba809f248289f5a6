"""The leaderboard rows every method with a logit Gaussian gets by one rule: ``[s=1]`` and
``[s tuned]``.

A run of such a method stores, beside its own predictive, its Gaussian over logits (mean and
per-logit variances) for every evaluation set and for the validation inputs it predicted. From
those arrays alone this module derives the probit predictive at s = 1 (the untuned Bayesian
predictive) and at the s with the lowest validation NLL on the shared grid
(``bench.scale_tuning``); a tuned s on the grid's edge is flagged. Laplace and RegVar are then
compared on the same terms; no method tunes s itself (Laplace's and RegVar's own predictive is
s = 1). The run record keeps the curve (``ScaleTuning``).
"""

from __future__ import annotations

import numpy as np
import torch

from bench.formulas import probit_probs
from bench.prediction_arrays import VAL, PredictionArrays
from bench.record import ScaleTuning
from bench.scale_tuning import SCALE_GRID, best_on_curve, scale_curve, scale_edge_flag

UNTUNED, TUNED = "[s=1]", "[s tuned]"
# Scores whose ranking a scale s cannot change are kept in the [s tuned] row; mutual_info was
# drawn from the s = 1 Gaussian, so it stays with [s=1] only.
S_DEPENDENT_SCORES = ("mutual_info",)


def derived_label(method: str, kind: str) -> str:
    return f"{method} {kind}"


def is_derived(label: str) -> bool:
    return label.endswith((UNTUNED, TUNED))


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(array, dtype=np.float64))


def _with_scale(predictions: PredictionArrays, scale: float, drop: tuple[str, ...]) -> PredictionArrays:
    """The run's evaluation arrays with every set's probabilities replaced by the probit
    predictive of its stored Gaussian at ``scale``."""

    def probit(where: str) -> np.ndarray:
        mean, var = predictions.gaussian(where)
        return probit_probs(_tensor(mean), _tensor(var), scale).numpy()

    return predictions.with_probs(probit, drop)


def tune(predictions: PredictionArrays) -> ScaleTuning:
    """The one scale rule on a run's stored validation Gaussian: the NLL curve over the grid,
    the s with the lowest NLL (the first of equal minima) and its flag."""
    val_mean, val_var = map(_tensor, predictions.gaussian(VAL))
    curve = scale_curve(val_mean, val_var, torch.from_numpy(predictions.labels(VAL)))
    scale, _ = best_on_curve(curve)
    return ScaleTuning(list(SCALE_GRID), curve.mean(1).tolist(), scale, curve.shape[1],
                       scale_edge_flag(scale, val_var, curve=curve))


def derive(predictions: PredictionArrays) -> dict[str, tuple[PredictionArrays, float, str | None]]:
    """kind → (the derived row's arrays, its scale s, its flag or None)."""
    tuned = tune(predictions)
    return {
        UNTUNED: (_with_scale(predictions, 1.0, ()), 1.0, None),
        TUNED: (_with_scale(predictions, tuned.chosen, S_DEPENDENT_SCORES), tuned.chosen, tuned.flag),
    }
