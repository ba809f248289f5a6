"""Metrics cross-checked against independent implementations (netcal, sklearn, numpy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from netcal.metrics import ECE, MCE
from sklearn.metrics import log_loss, roc_auc_score

from bench.metrics import (
    accuracy,
    auroc,
    brier_score,
    evaluate,
    expected_calibration_error,
    max_calibration_error,
    negative_log_likelihood,
    predictive_entropy,
)


def numpy_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15, norm: str = "l1") -> float:
    """Top-label equal-width ECE in a few lines: bins (lo, hi], the first closed at 0."""
    conf, pred = probs.max(1), probs.argmax(1)
    correct = (pred == labels).astype(float)
    edges = np.linspace(0, 1, n_bins + 1)
    gaps, weights = [], []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        if in_bin.any():
            gaps.append(abs(correct[in_bin].mean() - conf[in_bin].mean()))
            weights.append(in_bin.mean())
    gaps, weights = np.array(gaps), np.array(weights)
    return float((gaps * weights).sum()) if norm == "l1" else float(gaps.max())


def random_probs(n: int, c: int, seed: int, sharp: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = sharp * torch.randn(n, c, generator=g, dtype=torch.float64)
    probs = torch.softmax(logits, 1)
    labels = torch.multinomial(probs, 1, generator=g).squeeze(1)  # roughly calibrated
    return probs, labels


# torchmetrics bins in float32, so agreement is to ~1e-7, not to float64 round-off.
TOL = 1e-6


@pytest.mark.parametrize("seed,classes", [(0, 3), (1, 10), (2, 5)])
def test_ece_matches_netcal_and_numpy(seed: int, classes: int) -> None:
    probs, labels = random_probs(2000, classes, seed)
    ours = expected_calibration_error(probs, labels)
    assert ours == pytest.approx(ECE(bins=15).measure(probs.numpy(), labels.numpy()), abs=TOL)
    assert ours == pytest.approx(numpy_ece(probs.numpy(), labels.numpy()), abs=TOL)


def test_binary_ece_is_top_label() -> None:
    """netcal scores p(class 1) for two columns; our ECE stays top-label, like numpy's."""
    probs, labels = random_probs(2000, 2, 0)
    assert expected_calibration_error(probs, labels) == pytest.approx(
        numpy_ece(probs.numpy(), labels.numpy()), abs=TOL
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_mce_matches_netcal(seed: int) -> None:
    probs, labels = random_probs(3000, 4, seed)
    ours = max_calibration_error(probs, labels)
    assert ours == pytest.approx(MCE(bins=15).measure(probs.numpy(), labels.numpy()), abs=TOL)
    assert ours == pytest.approx(numpy_ece(probs.numpy(), labels.numpy(), norm="max"), abs=TOL)


def test_confidence_exactly_one_lands_in_last_bin() -> None:
    """A confident wrong prediction at conf = 1.0 must count fully (|0 − 1| in the top bin)."""
    probs = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.6, 0.4], [0.3, 0.7]], dtype=torch.float64)
    labels = torch.tensor([1, 0, 1, 1])
    # bins: conf 1.0 → last bin (acc 0.5, conf 1.0, weight 2/4); 0.6 (wrong) and 0.7 (right)
    expected = (2 / 4) * 0.5 + (1 / 4) * 0.6 + (1 / 4) * 0.3
    assert expected_calibration_error(probs, labels) == pytest.approx(expected, abs=TOL)
    assert numpy_ece(probs.numpy(), labels.numpy()) == pytest.approx(expected, abs=1e-12)
    assert max_calibration_error(probs, labels) == pytest.approx(0.6, abs=TOL)


def test_nll_brier_accuracy_match_sklearn_and_numpy() -> None:
    probs, labels = random_probs(500, 6, 3)
    p, y = probs.numpy(), labels.numpy()
    assert negative_log_likelihood(probs, labels) == pytest.approx(log_loss(y, p, labels=range(6)), rel=1e-9)
    onehot = np.eye(6)[y]
    assert brier_score(probs, labels) == pytest.approx(((p - onehot) ** 2).sum(1).mean(), rel=1e-12)
    assert accuracy(probs, labels) == pytest.approx((p.argmax(1) == y).mean())


def test_nll_of_zero_probability_is_large_not_inf() -> None:
    probs = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    value = negative_log_likelihood(probs, torch.tensor([1]))
    assert 700 < value < 710


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_matches_sklearn_with_ood_positive(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    s_in = torch.randn(300, generator=g, dtype=torch.float64)
    s_out = torch.randn(200, generator=g, dtype=torch.float64) + 0.7
    target = np.r_[np.zeros(300), np.ones(200)]
    expected = roc_auc_score(target, np.r_[s_in.numpy(), s_out.numpy()])
    assert auroc(s_in, s_out) == pytest.approx(expected, abs=TOL)
    assert auroc(s_in, s_out) > 0.5  # OOD scored higher → AUROC above chance


def test_auroc_with_ties_matches_sklearn() -> None:
    s_in = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    s_out = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    expected = roc_auc_score([0, 0, 0, 0, 1, 1, 1], np.r_[s_in.numpy(), s_out.numpy()])
    assert auroc(s_in, s_out) == pytest.approx(expected)


def _mann_whitney_auroc(s_in: np.ndarray, s_out: np.ndarray) -> float:
    """AUROC as P(score_out > score_in) + ½ P(tie), counted pair by pair (independent of sklearn)."""
    diff = s_out[:, None] - s_in[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


SCALES = {
    "in [0, 1]": lambda g: (torch.rand(300, generator=g, dtype=torch.float64) * 0.8,
                            torch.rand(200, generator=g, dtype=torch.float64) * 0.8 + 0.2),
    "large, overlapping": lambda g: (40 + 10 * torch.rand(300, generator=g, dtype=torch.float64),
                                     45 + 15 * torch.rand(200, generator=g, dtype=torch.float64)),
    "huge": lambda g: (1e19 * torch.rand(300, generator=g, dtype=torch.float64),
                       1e19 * (0.3 + torch.rand(200, generator=g, dtype=torch.float64))),
    "negative": lambda g: (-50 - torch.randn(300, generator=g, dtype=torch.float64),
                           -49.5 - torch.randn(200, generator=g, dtype=torch.float64)),
    "tied": lambda g: (torch.randint(0, 4, (300,), generator=g).double(),
                       torch.randint(1, 5, (200,), generator=g).double()),
}


@pytest.mark.parametrize("scale", SCALES)
def test_auroc_is_rank_based_on_any_score_scale(scale: str) -> None:
    """Scores outside [0, 1] are ranked as they are (torchmetrics' sigmoid got these wrong)."""
    s_in, s_out = SCALES[scale](torch.Generator().manual_seed(4))
    ours = auroc(s_in, s_out)
    target = np.r_[np.zeros(len(s_in)), np.ones(len(s_out))]
    assert ours == pytest.approx(roc_auc_score(target, np.r_[s_in.numpy(), s_out.numpy()]), abs=1e-12)
    assert ours == pytest.approx(_mann_whitney_auroc(s_in.numpy(), s_out.numpy()), abs=1e-12)
    assert 0.5 < ours < 1.0


def test_perfectly_separated_large_scores_give_auroc_one() -> None:
    s_in = torch.linspace(40, 49, 100, dtype=torch.float64)
    s_out = torch.linspace(51, 60, 80, dtype=torch.float64)
    assert auroc(s_in, s_out) == 1.0
    assert auroc(s_out, s_in) == 0.0
    assert auroc(-s_out, -s_in) == 1.0  # negative scores too


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_auroc_refuses_non_finite_scores(bad: float) -> None:
    """A NaN score must never turn into a chance-level 0.5."""
    s_in = torch.tensor([0.1, 0.2, bad], dtype=torch.float64)
    with pytest.raises(ValueError, match="finite"):
        auroc(s_in, torch.tensor([0.5, 0.6], dtype=torch.float64))


def test_entropy_matches_numpy() -> None:
    probs, _ = random_probs(50, 4, 5)
    p = probs.numpy()
    assert torch.allclose(predictive_entropy(probs), torch.from_numpy(-(p * np.log(p)).sum(1)))


def test_evaluate_keys_are_namespaced() -> None:
    probs, labels = random_probs(200, 3, 6)
    ood_probs, _ = random_probs(100, 3, 7, sharp=0.5)
    metrics = evaluate(
        probs, labels, {"variance": torch.rand(200, dtype=torch.float64)},
        ood={"far": (ood_probs, {"variance": torch.rand(100, dtype=torch.float64)})},
        shift={"noisy": (probs[:50], labels[:50])},
    )
    assert {"cls/acc", "cls/nll", "cls/brier", "cal/ece", "cal/mce"} <= metrics.keys()
    assert {"ood/far/auroc/msp", "ood/far/auroc/entropy", "ood/far/auroc/variance"} <= metrics.keys()
    assert metrics["shift/noisy/acc"] == pytest.approx(accuracy(probs[:50], labels[:50]))
    # less confident OOD predictions are detected by entropy better than chance
    assert metrics["ood/far/auroc/entropy"] > 0.7


def test_a_confidence_of_one_shares_the_top_bin_with_the_others() -> None:
    """torchmetrics bins in float32, where 1 − 1e-9 is 1: such a confidence must still be averaged
    with the rest of the top bin (one bin: acc 1/2, conf 0.975), not kept in a bin of its own."""
    probs = torch.tensor([[1.0, 0.0], [1 - 1e-9, 1e-9], [0.95, 0.05], [0.95, 0.05]], dtype=torch.float64)
    labels = torch.tensor([1, 1, 0, 0])
    expected = abs(0.5 - (1.0 + (1 - 1e-9) + 0.95 + 0.95) / 4)
    assert numpy_ece(probs.numpy(), labels.numpy()) == pytest.approx(expected, abs=1e-12)
    assert expected_calibration_error(probs, labels) == pytest.approx(expected, abs=TOL)
    assert max_calibration_error(probs, labels) == pytest.approx(expected, abs=TOL)
    assert ECE(bins=15).measure(probs.numpy(), labels.numpy()) == pytest.approx(expected, abs=TOL)
