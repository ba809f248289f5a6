"""Out-of-distribution detection: AUROC with OOD as the positive class."""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import binary_auroc


def auroc(score_in: torch.Tensor, score_out: torch.Tensor) -> float:
    """AUROC of separating OOD (positive) from in-distribution by a score (higher = OOD)."""
    scores = torch.cat([score_in, score_out]).double()
    target = torch.cat([torch.zeros(len(score_in)), torch.ones(len(score_out))]).long()
    return float(binary_auroc(scores, target))
