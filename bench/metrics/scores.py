"""Uncertainty scores derived from a predictive distribution alone (higher = more uncertain)."""

from __future__ import annotations

import torch


def max_prob_score(probs: torch.Tensor) -> torch.Tensor:
    """1 − max-softmax probability (so that higher means more uncertain)."""
    return 1.0 - probs.double().max(dim=1).values


def predictive_entropy(probs: torch.Tensor) -> torch.Tensor:
    p = probs.double()
    return -(p * p.clamp_min(1e-300).log()).sum(dim=1)
