"""All reported metrics for one run, under namespaced keys (``cls/nll``, ``ood/mnist/auroc/msp``):
every registered metric on the test set and each shift set, and every score's AUROC on each OOD
set (``bench.metrics.registry``)."""

from __future__ import annotations

import torch

from bench.metrics.ood import auroc
from bench.metrics.registry import auroc_key, harness_scores, set_metrics


def all_scores(probs: torch.Tensor, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The harness's scores (msp, entropy, any registered) plus the method's own, all higher = more uncertain."""
    return {**harness_scores(probs), **{name: score.double() for name, score in scores.items()}}


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
    metrics = {m.test_key: m.value(test_probs, test_labels) for m in set_metrics()}
    in_scores = all_scores(test_probs, test_scores or {})
    for name, (probs, scores) in (ood or {}).items():
        out_scores = all_scores(probs, scores)
        for score_name, score_in in in_scores.items():
            if score_name in out_scores:
                metrics[auroc_key(name, score_name)] = auroc(score_in, out_scores[score_name])
    for name, (probs, labels) in (shift or {}).items():
        metrics.update({m.shift_key(name): m.value(probs, labels) for m in set_metrics()})
    return metrics
