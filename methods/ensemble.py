"""Deep ensembles (Lakshminarayanan et al., 2017): M networks trained independently.

Each member is the task's own model trained with the task's MAP recipe from a different seed
(initialisation and data order); the harness's ``ctx.train_model(member)`` does the training
and caches checkpoints, and member 0 is the MAP network itself. The predictive is the mean of
the members' softmax outputs; their disagreement is the mutual information.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bench.errors import BenchError
from bench.method_api import FitContext, Method, register_method
from bench.options import option
from bench.types import Prediction

from .sample_scores import batched_summary


@dataclass
class EnsembleOptions:
    members: int = option(5, "number of independently seeded members (member 0 is MAP)", min=1)
    batch_size: int = option(1024, "inputs per forward pass at predict time", min=1)


@register_method("ensemble")
class DeepEnsemble(Method):
    """Mean of M independently trained members; scores ``mutual_info`` and ``expected_entropy``."""

    citation = (
        'B. Lakshminarayanan, A. Pritzel and C. Blundell, "Simple and Scalable Predictive '
        'Uncertainty Estimation using Deep Ensembles", NeurIPS 2017'
    )

    Options = EnsembleOptions
    # Member 0 comes from ctx.train_model(0) (the cached MAP checkpoint), so the harness need
    # not prepare the MAP network separately.
    uses_map = False

    def __init__(self, options: EnsembleOptions | None = None) -> None:
        super().__init__(options)
        self.models: list[nn.Module] = []
        self.device = torch.device("cpu")

    def fit(self, ctx: FitContext) -> None:
        self.device = ctx.device
        self.models = []
        for member in range(self.options.members):
            model = ctx.train_model(member)
            # All members stay resident on the device: the predict-time peak memory the harness
            # measures is then that of the whole ensemble, as a user would deploy it.
            self.models.append(model.to(ctx.device).eval())
        ctx.log(f"ensemble: {len(self.models)} members ready on {ctx.device}")

    def _member_probs(self, xb: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(xb).double().softmax(dim=-1) for m in self.models])

    def predict(self, x: torch.Tensor) -> Prediction:
        if not self.models:
            raise BenchError("ensemble: predict called before fit; call fit(ctx) first")
        for model in self.models:
            model.eval()
        return batched_summary(x, self._member_probs, self.device, self.options.batch_size)

    def summary(self) -> dict[str, Any]:
        return {"members": len(self.models)}
