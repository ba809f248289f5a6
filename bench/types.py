"""Plain data passed along the flow task → method → predictions → metrics."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from bench.errors import BenchError


class InvalidPrediction(BenchError, ValueError):
    """A :class:`Prediction` built with inconsistent shapes (the harness names the method)."""


@dataclass
class Prediction:
    """What a method returns for a batch of inputs.

    ``probs`` is the predictive distribution (N × C, rows sum to 1). ``scores`` holds the
    method's own per-input uncertainty scores (higher = more uncertain), e.g. ``variance`` or
    ``mutual_info``; the harness adds max-probability and entropy scores itself.

    A method with a Gaussian over logits (Laplace, RegVar) also returns it, as estimated and
    before any tuned scale: ``logit_mean`` (N × C) and ``logit_cov``, either per-logit variances
    (N × C) or the full covariance (N × C × C). The harness then derives, identically for every
    such method, the untuned (s = 1) and validation-tuned probit predictives and the covariance
    scores (``bench.logit_gaussian``).
    """

    probs: torch.Tensor
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    logit_mean: torch.Tensor | None = None
    logit_cov: torch.Tensor | None = None

    def __post_init__(self) -> None:
        tensors = [("probs", self.probs), *((f"score {k!r}", v) for k, v in self.scores.items())]
        gaussian = (("logit_mean", self.logit_mean), ("logit_cov", self.logit_cov))
        tensors += [(k, v) for k, v in gaussian if v is not None]
        for name, value in tensors:
            if not isinstance(value, torch.Tensor):
                raise InvalidPrediction(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if self.probs.ndim != 2:
            raise InvalidPrediction(f"probs must be N x C, got shape {tuple(self.probs.shape)}")
        for name, score in self.scores.items():
            if score.shape != (self.probs.shape[0],):
                raise InvalidPrediction(f"score {name!r} must have shape (N,), got {tuple(score.shape)}")
        self._check_gaussian()

    def _check_gaussian(self) -> None:
        if (self.logit_mean is None) != (self.logit_cov is None):
            raise InvalidPrediction("give logit_mean and logit_cov together, or neither")
        if self.logit_mean is None:
            return
        n, c = self.probs.shape
        if self.logit_mean.shape != (n, c):
            raise InvalidPrediction(f"logit_mean must be N x C = {(n, c)}, got {tuple(self.logit_mean.shape)}")
        if self.logit_cov.shape not in ((n, c), (n, c, c)):
            raise InvalidPrediction(f"logit_cov must be N x C or N x C x C, got {tuple(self.logit_cov.shape)}")

    @property
    def has_gaussian(self) -> bool:
        return self.logit_mean is not None

    @staticmethod
    def concat(parts: list[Prediction]) -> Prediction:
        probs = torch.cat([p.probs for p in parts])
        keys = parts[0].scores.keys()
        gaussian = all(p.has_gaussian for p in parts)
        return Prediction(
            probs, {k: torch.cat([p.scores[k] for p in parts]) for k in keys},
            torch.cat([p.logit_mean for p in parts]) if gaussian else None,
            torch.cat([p.logit_cov for p in parts]) if gaussian else None,
        )
