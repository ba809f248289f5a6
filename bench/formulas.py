"""The formulas every part of the suite shares: probit predictive, NLL and entropy, once.

Methods (tuning on validation data) and metrics (scoring results) must agree to the last bit on
what "NLL" or "the probit predictive" means, so both import these instead of writing their own.
"""

from __future__ import annotations

import math

import torch

PI_OVER_8 = math.pi / 8
_TINY = torch.finfo(torch.float64).tiny


def _probit_denominator(variance: torch.Tensor, scale: float) -> torch.Tensor:
    """sqrt(1 + π/8 · s · σ²) in float64; negative variances (round-off) count as 0."""
    return torch.sqrt(1.0 + PI_OVER_8 * scale * variance.double().clamp_min(0.0))


def probit_shrink(variance: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The factor by which the probit shrinks each logit, 1 / sqrt(1 + π/8 · s · σ²)."""
    return 1.0 / _probit_denominator(variance, scale)


def probit_probs(logits: torch.Tensor, variance: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The GLM probit predictive softmax(f / sqrt(1 + π/8 · s · σ²)) in float64.

    ``variance`` is the logit variance per input (N,), per logit (N, C), or the full logit
    covariance (N, C, C), of which only the diagonal enters, as in laplace-torch's
    ``link_approx="probit"``.
    """
    var = variance.diagonal(dim1=1, dim2=2) if variance.ndim == 3 else variance
    if var.ndim == 1:
        var = var[:, None]
    return (logits.double() / _probit_denominator(var, scale)).softmax(dim=-1)


def nll_per_input(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """−log p(y|x) for each input in nats, float64.

    A probability of exactly 0 on the true label is floored at the smallest normal float64
    (≈ 708 nats) so that one such point shows as a huge NLL rather than ``inf`` for the mean.
    """
    p = probs.double().gather(1, labels.long().view(-1, 1)).squeeze(1)
    return -p.clamp_min(_TINY).log()


def nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean NLL in nats (:func:`nll_per_input`)."""
    return nll_per_input(probs, labels).mean().item()


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) over the last dimension, float64; 0·log 0 = 0."""
    return torch.special.entr(probs.double()).sum(dim=-1)


def mutual_information(samples: torch.Tensor) -> torch.Tensor:
    """I(y; θ | x) from S × N × C sampled predictive distributions → (N,): entropy of the mean
    minus the mean entropy, float64 (a small difference of two entropies: float32 rounding alone
    would make it negative for confident inputs); ≥ 0 by Jensen, clamped at 0 against ~-1e-16."""
    samples = samples.double()
    return (entropy(samples.mean(dim=0)) - entropy(samples).mean(dim=0)).clamp_min(0.0)
