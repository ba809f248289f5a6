"""Top-label calibration errors (torchmetrics) and the multiclass Brier score."""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import multiclass_calibration_error

N_BINS = 15


def _guard_confidence_one(probs: torch.Tensor) -> torch.Tensor:
    """Guard against torchmetrics binning a confidence of exactly 1.0 into a phantom bin.

    torchmetrics buckets with ``bucketize(conf, linspace(0, 1, n+1), right=True) - 1``, which
    sends conf == 1.0 to a phantom bin n in the releases with the open bug (1.9.0 handles it;
    tests/test_metrics.py checks the value either way). Every equal-width ECE puts 1.0 in the
    last bin; nudging it to the next float below 1.0 does exactly that and changes nothing else.
    """
    one = torch.ones((), dtype=probs.dtype)
    below = torch.nextafter(one, torch.zeros((), dtype=probs.dtype))
    return torch.where(probs >= 1.0, below, probs)


def _calibration(probs: torch.Tensor, labels: torch.Tensor, norm: str, n_bins: int) -> float:
    probs = _guard_confidence_one(probs.double())
    value = multiclass_calibration_error(
        probs, labels.long(), num_classes=probs.shape[1], n_bins=n_bins, norm=norm
    )
    return float(value)


def expected_calibration_error(
    probs: torch.Tensor, labels: torch.Tensor, n_bins: int = N_BINS
) -> float:
    """Top-label ECE, ``n_bins`` equal-width bins, L1 (the field's convention)."""
    return _calibration(probs, labels, "l1", n_bins)


def max_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = N_BINS) -> float:
    """Top-label MCE: the largest |accuracy − confidence| over non-empty bins."""
    return _calibration(probs, labels, "max", n_bins)


def brier_score(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Multiclass Brier: squared error summed over classes, mean over points.

    Hand-written because torchmetrics has no multiclass Brier score; it is one line.
    """
    onehot = torch.nn.functional.one_hot(labels.long(), probs.shape[1]).double()
    return ((probs.double() - onehot) ** 2).sum(dim=1).mean().item()
