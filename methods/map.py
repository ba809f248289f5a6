"""``map``: the trained network as is. ``map-ts``: plus temperature scaling on validation NLL."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from bench.method_api import FitContext, Method, batched_logits, register_method
from bench.types import Prediction


@register_method("map")
class MAP(Method):
    """Maximum a posteriori network: softmax of its logits (the baseline every row compares to)."""

    def fit(self, ctx: FitContext) -> None:
        assert ctx.map_model is not None
        self.model: nn.Module = ctx.map_model
        self.device = ctx.device

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return batched_logits(self.model, x, self.device)

    def predict(self, x: torch.Tensor) -> Prediction:
        return Prediction(torch.softmax(self.logits(x).double(), dim=1))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature minimising NLL, by L-BFGS on log T.

    Hand-written (a one-parameter convex problem on held-out logits): netcal's
    TemperatureScaling works from probabilities on numpy and would only re-derive these logits.
    """
    logits, labels = logits.double(), labels.long()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    temperature = float(log_t.detach().exp())
    if not math.isfinite(temperature) or temperature <= 0:
        raise RuntimeError("temperature scaling diverged")
    return temperature


@register_method("map-ts")
class MAPTemperatureScaled(MAP):
    """MAP logits divided by one temperature fitted on the validation split's NLL."""

    citation = 'C. Guo, G. Pleiss, Y. Sun and K. Q. Weinberger, "On Calibration of Modern Neural Networks", ICML 2017'

    def fit(self, ctx: FitContext) -> None:
        super().fit(ctx)
        x_val, y_val = ctx.data.val.tensors
        self.temperature = fit_temperature(self.logits(x_val), y_val)
        ctx.log(f"map-ts: temperature {self.temperature:.4f} (fitted on {len(y_val)} validation points)")

    def predict(self, x: torch.Tensor) -> Prediction:
        return Prediction(torch.softmax(self.logits(x).double() / self.temperature, dim=1))

    def summary(self) -> dict[str, Any]:
        return {"temperature": self.temperature}
