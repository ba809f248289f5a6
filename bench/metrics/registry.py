"""Every metric and OOD score, declared once.

A ``SetMetric`` is a metric of a labelled set (the test set, and each shift set). It declares
its key, its title, which way is better, where the leaderboard shows it, its run-time value
(the field's library where one exists) and, for the paired bootstrap, the per-input terms whose
weighted sums determine it: a resample of the inputs is a vector of multiplicities, and the
metric on that resample is ``from_sums(counts @ terms, n)``. tests/test_paired.py checks that
the two agree on the full sample for every registered metric.

A ``Score`` is an OOD score (higher = more uncertain): computed from the predictive by the
harness (``from_probs``) or supplied by a method under its name (``Prediction.scores``).

Run-time scoring (``bench.metrics.summary``), the paired bootstrap, the tables, the headline, the
answer box, the plots, the site and ``bench run``'s printout all iterate these registries; a plugin
adds a metric or a score with ``register_metric`` / ``register_score``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from bench.formulas import nll_per_input
from bench.metrics.calibration import N_BINS, brier_score, expected_calibration_error, max_calibration_error
from bench.metrics.classification import accuracy, negative_log_likelihood
from bench.metrics.scores import max_prob_score, predictive_entropy
from bench.registry import Registry

TEST, SHIFT = "test", "shift"  # the labelled sets a metric can be shown on


@dataclass
class SetMetric:
    """A metric of a labelled set. ``direction``: +1 higher is better, -1 lower is better."""

    name: str  # the key's last part: ``cls/<name>`` on the test set, ``shift/<set>/<name>`` on a shift set
    title: str
    direction: int
    namespace: str  # the test-set key's first part: ``cls`` or ``cal``
    value: Callable[[torch.Tensor, torch.Tensor], float]  # (probs, labels) → the metric
    terms: Callable[[np.ndarray, np.ndarray], np.ndarray]  # (probs, labels) → (inputs, k) float64
    from_sums: Callable[[np.ndarray, float], np.ndarray]  # (resamples, k) weighted sums, n → (resamples,)
    shown_on: tuple[str, ...] = (TEST, SHIFT)  # leaderboard columns (and paired comparisons) on these sets

    @property
    def test_key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def shift_key(self, shift_set: str) -> str:
        return shift_key(shift_set, self.name)

    @property
    def arrow(self) -> str:
        return "↑" if self.direction > 0 else "↓"


@dataclass
class Score:
    """An OOD score, higher = more uncertain; ``from_probs`` None: a method supplies it."""

    name: str
    description: str
    from_probs: Callable[[torch.Tensor], torch.Tensor] | None = None
    shown: bool = True  # an AUROC column per OOD set on the leaderboard


METRICS: Registry[SetMetric] = Registry("metric")
SCORES: Registry[Score] = Registry("score")


def register_metric(metric: SetMetric) -> SetMetric:
    return METRICS.register(metric.name)(metric)


def register_score(score: Score) -> Score:
    return SCORES.register(score.name)(score)


def set_metrics() -> list[SetMetric]:
    """The registered metrics, in the order they were registered (the leaderboard's column order)."""
    return METRICS.entries()


def metric(name: str) -> SetMetric:
    return METRICS.get(name)


def shown_scores() -> list[Score]:
    return [s for s in SCORES.entries() if s.shown]


def harness_scores(probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every score the harness computes from a predictive alone."""
    return {s.name: s.from_probs(probs).double() for s in SCORES.entries() if s.from_probs is not None}


def auroc_key(ood_set: str, score: str) -> str:
    return f"ood/{ood_set}/auroc/{score}"


def shift_key(shift_set: str, metric_name: str) -> str:
    return f"shift/{shift_set}/{metric_name}"


def parse_auroc_key(key: str) -> tuple[str, str] | None:
    """(OOD set, score) of an :func:`auroc_key`, else None."""
    parts = key.split("/")
    return (parts[1], parts[3]) if len(parts) == 4 and parts[0] == "ood" and parts[2] == "auroc" else None


def parse_shift_key(key: str) -> tuple[str, str] | None:
    """(shift set, metric) of a :meth:`SetMetric.shift_key`, else None."""
    parts = key.split("/")
    return (parts[1], parts[2]) if len(parts) == 3 and parts[0] == "shift" else None


def ood_sets_in(keys: Iterable[str]) -> list[str]:
    """The OOD sets the metric keys have AUROCs on, in name order."""
    return sorted({p[0] for k in keys if (p := parse_auroc_key(k))})


def shift_sets_in(keys: Iterable[str], metric_name: str | None = None) -> list[str]:
    """The shift sets the metric keys have metrics on (only ``metric_name`` if given), in name order."""
    return sorted({p[0] for k in keys if (p := parse_shift_key(k)) and metric_name in (None, p[1])})


# --- per-input terms of the built-in metrics --------------------------------------------------


def confidence_bins(confidence: np.ndarray, n_bins: int = N_BINS) -> np.ndarray:
    """The equal-width bin of each top-label confidence, as torchmetrics bins it (a bin holds
    [left edge, right edge); a confidence of exactly 1 goes to the last bin). The one binning of
    ECE, MCE and the reliability diagrams."""
    conf = np.minimum(confidence, np.nextafter(1.0, 0.0))
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64).numpy()  # torchmetrics' edges
    return np.searchsorted(edges, conf, side="right") - 1


def _top_label(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each input's bin one-hot (inputs, bins) and its correctness minus its confidence."""
    conf = probs.max(1)
    gap = (probs.argmax(1) == labels).astype(np.float64) - np.minimum(conf, np.nextafter(1.0, 0.0))
    one_hot = np.zeros((len(conf), N_BINS))
    one_hot[np.arange(len(conf)), confidence_bins(conf)] = 1.0
    return one_hot, gap


def _ece_terms(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    one_hot, gap = _top_label(probs, labels)
    return one_hot * gap[:, None]


def _mce_terms(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    one_hot, gap = _top_label(probs, labels)
    return np.concatenate([one_hot * gap[:, None], one_hot], 1)


def _mce_from_sums(sums: np.ndarray, n: float) -> np.ndarray:
    gaps, counts = sums[:, :N_BINS], sums[:, N_BINS:]
    return np.where(counts > 0, np.abs(gaps) / np.maximum(counts, 1e-300), 0.0).max(1)


def _mean(sums: np.ndarray, n: float) -> np.ndarray:
    return sums[:, 0] / n


def _column(per_input: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[..., np.ndarray]:
    def terms(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return per_input(torch.from_numpy(probs).double(), torch.from_numpy(labels).long()).numpy()[:, None]

    return terms


def _brier_per_input(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((p - torch.nn.functional.one_hot(y, p.shape[1])) ** 2).sum(1)


register_metric(SetMetric("acc", "Acc", 1, "cls", accuracy,
                          _column(lambda p, y: (p.argmax(1) == y).double()), _mean))
register_metric(SetMetric("nll", "NLL", -1, "cls", negative_log_likelihood, _column(nll_per_input), _mean))
register_metric(SetMetric("ece", "ECE", -1, "cal", expected_calibration_error, _ece_terms,
                          lambda sums, n: np.abs(sums).sum(1) / n))
register_metric(SetMetric("brier", "Brier", -1, "cls", brier_score, _column(_brier_per_input), _mean,
                          shown_on=(TEST,)))
register_metric(SetMetric("mce", "MCE", -1, "cal", max_calibration_error, _mce_terms, _mce_from_sums,
                          shown_on=()))

register_score(Score("msp", "1 − the predictive's largest probability", max_prob_score, shown=False))
register_score(Score("entropy", "entropy of the predictive", predictive_entropy))
register_score(Score("variance", "the method's own variance (defined per method, not comparable across rows)"))
register_score(Score("mutual_info", "mutual information (ensemble members, dropout masks, or 100 draws of the "
                                    "logit Gaussian)"))
register_score(Score("centred_var", "the trace of the softmax-centred logit covariance (bench/logit_gaussian.py)"))
