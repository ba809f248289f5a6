"""What a valid prediction and a valid result file are, decided in one place.

The harness checks every prediction a method returns, and every results reader checks what it
loads, with the same rules: probabilities finite, non-negative, rows summing to 1, the task's
number of classes, one row per input; every score finite with one value per input. A wrong
number is then an error naming its source, never a metric (a NaN score once became AUROC 0.5).
"""

from __future__ import annotations

import re
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


GAUSSIAN_KEY = re.compile(r"^(test|val|ood/[^/]+|shift/[^/]+)/logit_(mean|var)$")
_KEY = re.compile(r"^(test|ood/[^/]+|shift/[^/]+)/(probs|labels|score/[^/]+|logit_mean|logit_var)$"
                  r"|^val/(labels|logit_mean|logit_var)$|^index/(test|val|(ood|shift)/[^/]+)$")


def arrays_problem(arrays: dict[str, np.ndarray]) -> str | None:
    """Why a run's prediction arrays (its npz) are not self-consistent, or None."""
    if "test/probs" not in arrays or "test/labels" not in arrays:
        return "it lacks test/probs or test/labels"
    if unknown := [k for k in arrays if not _KEY.match(k)]:
        return f"it holds an unexpected array {unknown[0]!r}"
    classes = arrays["test/probs"].shape[-1] if arrays["test/probs"].ndim == 2 else 0
    if problem := _gaussian_problem(arrays, classes):
        return problem
    sets = {k.rsplit("/", 1)[0] for k in arrays if k.endswith(("/probs", "/labels")) and not k.startswith("val/")}
    sets |= {k.split("/score/")[0] for k in arrays if "/score/" in k}
    sets |= {k.removeprefix("index/") for k in arrays if k.startswith("index/") and k != "index/val"}
    for name in sorted(sets):
        if f"{name}/probs" not in arrays:
            return f"it lacks {name}/probs"
        probs = arrays[f"{name}/probs"]
        n = len(probs)
        problem = probs_problem(probs, n, classes)
        needs_labels = name == "test" or name.startswith("shift/")
        if problem is None and needs_labels:
            if f"{name}/labels" not in arrays:
                return f"it lacks {name}/labels"
            problem = labels_problem(f"{name}/labels", arrays[f"{name}/labels"], n, classes)
        for key in (k for k in arrays if k.startswith(f"{name}/score/")):
            problem = problem or score_problem(key, arrays[key], n)
        index = arrays.get(f"index/{name}")
        if problem is None and index is not None and (index.shape != (n,) or index.dtype.kind not in "iu"):
            problem = f"index/{name} has shape {index.shape} and type {index.dtype}, expected {n} integers"
        if problem:
            return f"{name}: {problem}"
    return None


def _gaussian_problem(arrays: dict[str, np.ndarray], classes: int) -> str | None:
    """The logit Gaussians stored beside a set's probabilities (and for the validation set):
    mean and variance together, N × C like the set, finite, variances non-negative."""
    sets = {m.group(1) for k in arrays if (m := GAUSSIAN_KEY.match(k))}
    for name in sorted(sets):
        mean, var = arrays.get(f"{name}/logit_mean"), arrays.get(f"{name}/logit_var")
        if mean is None or var is None:
            return f"{name}: it has only one of logit_mean and logit_var"
        rows = len(arrays["val/labels"]) if name == "val" and "val/labels" in arrays else len(
            arrays.get(f"{name}/probs", mean))
        if mean.shape != (rows, classes) or var.shape != (rows, classes):
            return f"{name}: logit_mean {mean.shape} and logit_var {var.shape} are not {rows} x {classes}"
        if not (np.isfinite(mean).all() and np.isfinite(var).all()) or (var < 0).any():
            return f"{name}: its logit Gaussian has NaN, inf or negative variances"
    if "val/labels" in arrays and "val" not in sets:
        return "val: it has labels but no logit Gaussian"
    return None
