"""Top-label calibration errors (torchmetrics) and the multiclass Brier score."""

from __future__ import annotations

import torch

N_BINS = 15


def _guard_confidence_one(probs: torch.Tensor) -> torch.Tensor:
    """Keep a confidence of 1 in the last bin, where every equal-width ECE puts it.

    torchmetrics casts confidences to float32 and buckets them with ``bucketize(conf,
    linspace(0, 1, n + 1), right=True) - 1``: a confidence that is 1 in float32 (any above
    1 − 3e-8) lands in a bin n of its own, so it is not averaged with the rest of the top bin
    (an MCE of the top bin read without it; an ECE off when such a prediction is wrong). Clamping
    every probability to float32's largest value below 1 sends those to the last bin and changes
    nothing else (tests/test_metrics.py checks a top bin shared by confidences 1 and 0.95).
    """
    below_one = torch.nextafter(torch.ones((), dtype=torch.float32), torch.zeros((), dtype=torch.float32))
    return torch.clamp(probs, max=below_one.to(probs.dtype))


def _calibration(probs: torch.Tensor, labels: torch.Tensor, norm: str, n_bins: int) -> float:
    # Imported here: torchmetrics loads torchvision and its image metrics, seconds that every
    # command importing the metric registry (``bench list``, a refused run) would otherwise pay.
    from torchmetrics.functional.classification import multiclass_calibration_error

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
