"""Out-of-distribution detection: AUROC with OOD as the positive class."""

from __future__ import annotations

import numpy as np
import torch


def auroc(score_in: torch.Tensor, score_out: torch.Tensor) -> float:
    """AUROC of separating OOD (positive) from in-distribution by a score (higher = OOD).

    Computed from ranks by sklearn's ``roc_auc_score``, which takes any real scores (ties count
    one half). torchmetrics' ``binary_auroc`` is not used: it reads scores outside [0, 1] as
    logits and squashes them with a sigmoid, which rounds every score above ≈ 37 to 1.0.
    Non-finite scores are refused: they have no rank (the harness rejects them earlier).
    """
    from sklearn.metrics import roc_auc_score  # here: a second of import for commands that score nothing

    scores = torch.cat([score_in, score_out]).detach().double().cpu().numpy()
    if not np.isfinite(scores).all():
        raise ValueError("AUROC needs finite scores; got NaN or inf")
    target = np.concatenate([np.zeros(len(score_in)), np.ones(len(score_out))])
    return float(roc_auc_score(target, scores))
