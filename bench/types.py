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
    """

    probs: torch.Tensor
    scores: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, value in [("probs", self.probs), *((f"score {k!r}", v) for k, v in self.scores.items())]:
            if not isinstance(value, torch.Tensor):
                raise InvalidPrediction(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if self.probs.ndim != 2:
            raise InvalidPrediction(f"probs must be N x C, got shape {tuple(self.probs.shape)}")
        for name, score in self.scores.items():
            if score.shape != (self.probs.shape[0],):
                raise InvalidPrediction(f"score {name!r} must have shape (N,), got {tuple(score.shape)}")

    @staticmethod
    def concat(parts: list[Prediction]) -> Prediction:
        probs = torch.cat([p.probs for p in parts])
        keys = parts[0].scores.keys()
        return Prediction(probs, {k: torch.cat([p.scores[k] for p in parts]) for k in keys})
