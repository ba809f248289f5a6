"""Metrics owned by the harness. They import neither methods nor tasks."""

from bench.metrics.calibration import brier_score, expected_calibration_error, max_calibration_error
from bench.metrics.classification import accuracy, negative_log_likelihood
from bench.metrics.ood import auroc
from bench.metrics.scores import max_prob_score, predictive_entropy
from bench.metrics.summary import evaluate

__all__ = [
    "accuracy",
    "auroc",
    "brier_score",
    "evaluate",
    "expected_calibration_error",
    "max_calibration_error",
    "max_prob_score",
    "negative_log_likelihood",
    "predictive_entropy",
]
