"""What a valid prediction and a valid result file are, decided in one place.

The harness checks every prediction a method returns, and every results reader checks what it
loads (``bench.prediction_arrays``), with the same rules: probabilities finite, non-negative,
rows summing to 1, the task's number of classes, one row per input; every score finite with
one value per input. A wrong number is then an error naming its source, never a metric (a NaN
score would read as AUROC 0.5).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

# Methods may compute in float32: 10 float32 probabilities sum to 1 within ~1e-6.
NORMALISATION_TOL = 1e-4


def _array(value: Any) -> np.ndarray | None:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return value if isinstance(value, np.ndarray) else None


def probs_problem(probs: Any, n: int, classes: int) -> str | None:
    """Why ``probs`` is not an ``n`` × ``classes`` predictive distribution, or None."""
    p = _array(probs)
    if p is None:
        return f"probabilities are a {type(probs).__name__}, not a tensor"
    if p.ndim != 2 or p.shape[0] != n:
        return f"probabilities have shape {tuple(p.shape)}, expected ({n}, {classes}) for {n} inputs"
    if p.shape[1] != classes:
        return f"probabilities have {p.shape[1]} classes, the task has {classes}"
    if not np.issubdtype(p.dtype, np.floating):
        return f"probabilities are of type {p.dtype}, not floating point"
    p = p.astype(np.float64, copy=False)
    if bad := int((~np.isfinite(p)).any(axis=1).sum()):
        return f"probabilities are NaN or inf in {bad} of {n} rows"
    if (p < 0).any():
        return f"probabilities are negative (down to {p.min():.3g})"
    off = float(np.abs(p.sum(axis=1) - 1).max(initial=0.0))
    if off > NORMALISATION_TOL:
        return f"probabilities do not sum to 1 (off by up to {off:.3g})"
    return None


def score_problem(name: str, score: Any, n: int) -> str | None:
    """Why ``score`` is not one finite real number per input, or None."""
    s = _array(score)
    if s is None:
        return f"score {name!r} is a {type(score).__name__}, not a tensor"
    if s.shape != (n,):
        return f"score {name!r} has shape {tuple(s.shape)}, expected ({n},) for {n} inputs"
    if not (np.issubdtype(s.dtype, np.floating) or np.issubdtype(s.dtype, np.integer)):
        return f"score {name!r} is of type {s.dtype}, not real numbers"
    if bad := int((~np.isfinite(s)).sum()):
        return f"score {name!r} is NaN or inf for {bad} of {n} inputs"
    return None


def prediction_problem(probs: Any, scores: dict[str, Any], n: int, classes: int) -> str | None:
    """The first problem of a method's output for ``n`` inputs, or None."""
    if problem := probs_problem(probs, n, classes):
        return problem
    for name, score in scores.items():
        if problem := score_problem(name, score, n):
            return problem
    return None


def labels_problem(key: str, labels: np.ndarray, n: int, classes: int) -> str | None:
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        return f"{key} has shape {labels.shape} and type {labels.dtype}, expected {n} integer labels"
    if n and (labels.min() < 0 or labels.max() >= classes):
        return f"{key} holds labels outside 0..{classes - 1}"
    return None
