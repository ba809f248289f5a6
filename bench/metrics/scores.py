"""Uncertainty scores derived from a predictive distribution alone (higher = more uncertain)."""

from __future__ import annotations

import torch

from bench.formulas import entropy


def max_prob_score(probs: torch.Tensor) -> torch.Tensor:
    """1 − max-softmax probability (so that higher means more uncertain)."""
    return 1.0 - probs.double().max(dim=1).values


def predictive_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy of each row of an N × C predictive (``bench.formulas.entropy``)."""
    return entropy(probs)
