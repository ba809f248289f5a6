"""A method's predictions as the harness accepts them: checked (one row per input, the task's
classes, finite and normalised, finite scores), moved to float64 on CPU, with the harness's own
scores of a logit Gaussian added; anything else is a one-line error naming the method."""

from __future__ import annotations

import torch

from bench.errors import BenchError
from bench.logit_gaussian import gaussian_scores
from bench.method_api import Method
from bench.types import InvalidPrediction, Prediction
from bench.validation import prediction_problem


def checked_prediction(method: Method, x: torch.Tensor, where: str, classes: int, seed: int = 0,
             negatives: list[str] | None = None) -> Prediction:
    """The method's prediction for ``x``, checked (one row per input, ``classes`` columns, finite,
    normalised, finite scores) and in float64 on CPU; anything else is a one-line error. With a
    logit Gaussian, the harness's own scores of it are added (``bench.logit_gaussian``, MI draws
    seeded by ``seed``)."""
    try:
        pred = method.predict(x)
    except InvalidPrediction as exc:  # a Prediction built with inconsistent shapes
        raise BenchError(f"method {method.name} returned an invalid prediction for {where}: {exc}") from None
    if not isinstance(pred, Prediction):
        raise BenchError(f"method {method.name} returned a {type(pred).__name__} for {where}, not a Prediction")
    if problem := prediction_problem(pred.probs, pred.scores, len(x), classes):
        raise BenchError(f"method {method.name} returned an invalid prediction for {where}: {problem}")
    scores = {k: v.detach().double().cpu() for k, v in pred.scores.items()}
    if not pred.has_gaussian:
        return Prediction(pred.probs.detach().double().cpu(), scores)
    mean, cov = pred.logit_mean.detach().double().cpu(), pred.logit_cov.detach().double().cpu()
    if not (torch.isfinite(mean).all() and torch.isfinite(cov).all()):
        raise BenchError(f"method {method.name} returned a logit Gaussian with NaN or inf for {where}")
    if cov.ndim == 2 and (bad := int((cov < 0).sum())):  # a finite-difference estimate below 0
        cov = cov.clamp_min(0.0)  # as the probit treats it; counted in the run's flags, never quiet
        if negatives is not None:
            negatives.append(f"{bad} of {cov.numel()} variance estimates for {where}")
    harness = gaussian_scores(mean, cov, seed)
    if clash := sorted(harness.keys() & scores.keys()):
        raise BenchError(f"method {method.name} returned a score named {clash[0]!r}, which the harness derives "
                         "from its logit Gaussian; rename the method's score")
    return Prediction(pred.probs.detach().double().cpu(), scores | harness, mean, cov)


def check_same_scores(method: Method, test: Prediction, others: dict[str, Prediction]) -> None:
    """Every evaluation set carries the test set's scores (else an AUROC would silently vanish)."""
    names = sorted(test.scores)
    for where, pred in others.items():
        if sorted(pred.scores) != names:
            raise BenchError(f"method {method.name} returned scores {sorted(pred.scores)} for {where} "
                             f"but {names} for the test set; return the same scores for every input")
