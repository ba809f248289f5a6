"""Accuracy and negative log-likelihood (mean, nats)."""

from __future__ import annotations

import torch


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return (probs.argmax(dim=1) == labels).double().mean().item()


def negative_log_likelihood(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean −log p(y|x) in float64.

    A probability of exactly 0 on the true label is floored at the smallest normal float64
    (≈ 708 nats) so that one such point shows as a huge NLL rather than ``inf`` for the mean.
    """
    p = probs.double().gather(1, labels.long().view(-1, 1)).squeeze(1)
    return (-p.clamp_min(torch.finfo(torch.float64).tiny).log()).mean().item()
