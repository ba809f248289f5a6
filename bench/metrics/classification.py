"""Accuracy and negative log-likelihood (mean, nats)."""

from __future__ import annotations

import torch

from bench.formulas import nll


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return (probs.argmax(dim=1) == labels).double().mean().item()


def negative_log_likelihood(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean −log p(y|x) in float64 (``bench.formulas.nll``: a zero probability reads ≈ 708 nats)."""
    return nll(probs, labels)
