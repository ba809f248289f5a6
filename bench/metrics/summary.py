"""All reported metrics for one run, under namespaced keys (``cls/nll``, ``ood/mnist/auroc/msp``)."""

from __future__ import annotations

import torch

from bench.metrics.calibration import (
    N_BINS,
    brier_score,
    expected_calibration_error,
    max_calibration_error,
)
from bench.metrics.classification import accuracy, negative_log_likelihood
from bench.metrics.ood import auroc
from bench.metrics.scores import max_prob_score, predictive_entropy


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return {
        "acc": accuracy(probs, labels),
        "nll": negative_log_likelihood(probs, labels),
        "brier": brier_score(probs, labels),
        "ece": expected_calibration_error(probs, labels, N_BINS),
        "mce": max_calibration_error(probs, labels, N_BINS),
    }


def all_scores(probs: torch.Tensor, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The harness's scores (msp, entropy) plus the method's own, all higher = more uncertain."""
    out = {"msp": max_prob_score(probs), "entropy": predictive_entropy(probs)}
    for name, score in scores.items():
        out[name] = score.double()
    return out


def evaluate(
    test_probs: torch.Tensor,
    test_labels: torch.Tensor,
    test_scores: dict[str, torch.Tensor] | None = None,
    ood: dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]] | None = None,
    shift: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> dict[str, float]:
    """Every metric of a run, from raw predictions only.

    ``ood`` maps a set's name to (probs, method scores); ``shift`` maps a set's name to
    (probs, labels). Keys: ``cls/*`` and ``cal/*`` for the test set, ``shift/<set>/*``,
    ``ood/<set>/auroc/<score>``.
    """
    base = classification_metrics(test_probs, test_labels)
    metrics = {
        "cls/acc": base["acc"],
        "cls/nll": base["nll"],
        "cls/brier": base["brier"],
        "cal/ece": base["ece"],
        "cal/mce": base["mce"],
    }
    in_scores = all_scores(test_probs, test_scores or {})
    for name, (probs, scores) in (ood or {}).items():
        out_scores = all_scores(probs, scores)
        for score_name, score_in in in_scores.items():
            if score_name in out_scores:
                metrics[f"ood/{name}/auroc/{score_name}"] = auroc(score_in, out_scores[score_name])
    for name, (probs, labels) in (shift or {}).items():
        for key, value in classification_metrics(probs, labels).items():
            metrics[f"shift/{name}/{key}"] = value
    return metrics
