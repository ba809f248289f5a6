"""Laplace approximations through laplace-torch: ``laplace-ll`` (last layer) and ``laplace``
(linearised, all weights).

Both start from a copy of the cached MAP network, fit a Gaussian posterior N(θ_MAP, P⁻¹) with
P = GGN of the training NLL + prior precision (laplace-torch ``Laplace(...).fit``), tune the
prior precision (marginal likelihood by default, or grid search on validation NLL), and predict
with the linearised (GLM) predictive: logits ~ N(f(x; θ_MAP), J Σ Jᵀ), turned into class
probabilities by the probit approximation (default) or Monte Carlo. The uncertainty score is
``variance`` = (1/C)·tr(J Σ Jᵀ) (see ``methods.laplace_common``).

``laplace`` predicts with ``methods.kfac_predictive.FastGLMPredictive`` by default: the same
J Σ Jᵀ from laplace-torch's own fitted posterior, computed from per-layer Jacobian factors
instead of laplace-torch's full batch Jacobian (``python -m bench perf laplace`` measures both).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bench.errors import BenchError
from bench.method_api import FLAGS_KEY, OWN_PREDICTIVE_KEY, PROBIT_AT_1, FitContext, Method, register_method
from bench.options import option
from bench.seeding import derive_seed
from bench.types import Prediction

from .kfac_predictive import FastGLMPredictive, glm_link
from .laplace_common import (
    Link,
    PriorMethod,
    PriorStructure,
    loader,
    log_grid,
    nll_of,
    predict_batched,
    prior_summary,
    quiet_laplace,
    tune_prior,
)
from .laplace_private import glm_functional, last_layer_name

# laplace-torch's own all-weights predictive holds an N x C x P Jacobian (and more inside
# jacrev); this many inputs per call keeps it near 0.5 GB for a 100k-parameter model.
LAPLACE_TORCH_BATCH = 32


class LastLayerStructure(str, Enum):
    """Hessian structure of the last-layer posterior (laplace-torch ``hessian_structure``)."""

    KRON = "kron"
    """Kronecker-factored GGN (KFAC)"""
    FULL = "full"
    """dense GGN of the last layer"""
    DIAG = "diag"
    """diagonal GGN"""


class Structure(str, Enum):
    """Hessian structure of the all-weights posterior (laplace-torch ``hessian_structure``)."""

    KRON = "kron"
    """Kronecker-factored GGN (KFAC), one block per parameter tensor"""
    DIAG = "diag"
    """diagonal GGN"""
    FULL = "full"
    """dense GGN: P² memory, refused above ``max_full_params``"""


class Backend(str, Enum):
    """laplace-torch curvature backend for the all-weights fit."""

    AUTO = "auto"
    """curvlinops for kron and full; for diag, BackPack on nn.Sequential models (its
    second-order extensions need one) and ASDL otherwise (both ~50x faster than curvlinops'
    exact diagonal, which laplace-torch uses by default)"""
    CURVLINOPS = "curvlinops"
    """laplace.curvature.CurvlinopsGGN (laplace-torch's default)"""
    BACKPACK = "backpack"
    """laplace.curvature.BackPackGGN (needs an nn.Sequential of supported layers)"""
    ASDL = "asdl"
    """laplace.curvature.AsdlGGN"""


class Predictive(str, Enum):
    """Which code computes the all-weights GLM functional covariance J Σ Jᵀ."""

    FAST = "fast"
    """methods.kfac_predictive: exact, from per-layer Jacobian factors (Linear/Conv2d)"""
    LAPLACE_TORCH = "laplace-torch"
    """laplace-torch's own ``_glm_predictive_distribution`` (full batch Jacobians, slow)"""


@dataclass
class _Shared:
    prior_method: PriorMethod = option(PriorMethod.MARGLIK, "how the prior precision is chosen")
    prior_structure: PriorStructure = option(
        PriorStructure.AUTO, "marglik: one precision or one per parameter tensor (auto: see the enum)"
    )
    prior_precision: float = option(1.0, "initial value (marglik) or the value (fixed)", min=1e-12)
    marglik_steps: int = option(100, "Adam steps on the log marginal likelihood", min=1)
    marglik_lr: float = option(0.1, "Adam learning rate on log prior precision", min=1e-6)
    grid_min: float = option(-4.0, "gridsearch: log10 of the smallest prior precision")
    grid_max: float = option(4.0, "gridsearch: log10 of the largest prior precision")
    grid_size: int = option(21, "gridsearch: number of log-spaced values", min=2)
    link: Link = option(Link.PROBIT, "GLM link approximation")
    n_samples: int = option(100, "link=mc: draws from the logit Gaussian per input", min=1)
    fit_batch_size: int = option(256, "training inputs per curvature batch", min=1)
    batch_size: int = option(256, "inputs per predictive batch (bounds memory)", min=1)


@dataclass
class LastLayerOptions(_Shared):
    structure: LastLayerStructure = option(LastLayerStructure.KRON, "last-layer Hessian structure")


@dataclass
class LaplaceOptions(_Shared):
    structure: Structure = option(Structure.KRON, "all-weights Hessian structure")
    backend: Backend = option(Backend.AUTO, "curvature backend")
    predictive: Predictive = option(Predictive.FAST, "GLM predictive implementation")
    max_full_params: int = option(
        20000, "structure=full: refuse models with more parameters", min=1
    )


class _ProgressLoader:
    """A DataLoader seen through ``ctx.progress`` (laplace-torch reads ``.dataset`` for N).

    laplace-torch peeks at one batch (``next(iter(loader))``) before its pass, so the bar only
    starts once a second batch is asked for.
    """

    def __init__(self, data: DataLoader, progress: Any, desc: str) -> None:
        self.data, self.progress, self.desc = data, progress, desc
        self.dataset = data.dataset

    def __iter__(self) -> Iterator:
        batches = iter(self.data)
        first = next(batches, None)
        if first is None:
            return
        yield first
        yield from self.progress(batches, desc=self.desc, unit="batch", total=len(self.data) - 1)

    def __len__(self) -> int:
        return len(self.data)


def resolve_backend(choice: Backend, structure: Structure, model: nn.Module) -> type:
    from laplace.curvature import AsdlGGN, BackPackGGN, CurvlinopsGGN

    if choice is Backend.AUTO:
        if structure is Structure.DIAG:
            return BackPackGGN if isinstance(model, nn.Sequential) else AsdlGGN
        return CurvlinopsGGN
    classes = {Backend.CURVLINOPS: CurvlinopsGGN, Backend.BACKPACK: BackPackGGN}
    return classes.get(choice, AsdlGGN)


def _require_map(ctx: FitContext, name: str) -> nn.Module:
    if ctx.map_model is None:
        raise BenchError(f"{name} needs the task's MAP network; the harness did not provide one")
    return copy.deepcopy(ctx.map_model).eval()


class _LaplaceBase(Method):
    """Fit → tune prior → batched GLM predictive; subclasses build the laplace-torch object."""

    citation = (
        'E. Daxberger, A. Kristiadi, A. Immer, R. Eschenhagen, M. Bauer and P. Hennig, "Laplace '
        'Redux: Effortless Bayesian Deep Learning", NeurIPS 2021; A. Immer, M. Korzepa and M. '
        'Bauer, "Improving predictions of Bayesian neural nets via local linearization", AISTATS '
        '2021'
    )

    desc = "laplace"
    model_hint: str | None = None  # advice when laplace-torch refuses the model with a ValueError
    has_layerwise_prior = True  # laplace-torch's last-layer posteriors have none

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.la: Any = None
        self.info: dict[str, Any] = {}

    def _build(self, ctx: FitContext) -> Any:
        raise NotImplementedError

    def _functional(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return glm_functional(self.la, x.to(self.device))

    def _pred_batch(self) -> int:
        return self.options.batch_size

    def _val_nll(self, val: TensorDataset) -> Any:
        return None  # laplace-torch's own grid search

    def fit(self, ctx: FitContext) -> None:
        o = self.options
        self.device, self.progress = ctx.device, ctx.progress
        self.generator = torch.Generator(device=ctx.device)
        self.generator.manual_seed(derive_seed(ctx.seed, "laplace-mc"))
        self.la = self._build(ctx)
        train_loader = loader(ctx.data.train, o.fit_batch_size)
        train = _ProgressLoader(train_loader, ctx.progress, f"{self.desc} fit")
        t0 = time.perf_counter()
        try:
            with quiet_laplace():
                self.la.fit(train)
        except NotImplementedError as err:  # BackPack: unsupported module or container
            raise BenchError(
                f"{self.name}: the curvature backend cannot handle this model ({err}); "
                "use backend=auto or backend=asdl"
            ) from None
        except ValueError as err:
            if self.model_hint is None:
                raise
            raise BenchError(f"{self.name}: laplace-torch cannot use this model ({err}); {self.model_hint}") from None
        t1 = time.perf_counter()
        self._after_fit()
        structure = self._prior_structure()
        flag = tune_prior(
            self.la, o.prior_method, structure,
            len(ctx.data.train) * ctx.recipe.weight_decay if o.prior_method is PriorMethod.OBJECTIVE
            else o.prior_precision,
            marglik_steps=o.marglik_steps, marglik_lr=o.marglik_lr,
            grid=log_grid(o.grid_min, o.grid_max, o.grid_size), val=ctx.data.val,
            batch_size=self._pred_batch(), link=o.link, n_samples=o.n_samples,
            val_nll=self._val_nll(ctx.data.val), log=ctx.log,
        )
        t2 = time.perf_counter()
        with torch.no_grad():
            log_marglik = float(self.la.log_marginal_likelihood())
        self.info = {
            "structure": o.structure.value,
            "prior_method": o.prior_method.value,
            "prior_structure": structure.value,
            "prior_precision": prior_summary(self.la),
            "link": o.link.value,
            OWN_PREDICTIVE_KEY: PROBIT_AT_1 if o.link is Link.PROBIT else f"the {o.link.value} link of its Gaussian",
            "n_params": int(self.la.n_params),
            "backend": type(self.la.backend).__name__,
            "log_marglik": log_marglik,
            "curvature_fit_s": t1 - t0,
            "prior_tuning_s": t2 - t1,
        } | ({FLAGS_KEY: [flag]} if flag else {})
        ctx.log(f"{self.name}: prior precision {self.info['prior_precision']}, "
                f"log marglik {log_marglik:.1f}, {self.info['n_params']} params")

    def _after_fit(self) -> None:
        pass

    def _prior_structure(self) -> PriorStructure:
        """``auto`` resolved: layerwise for marglik where the method has it, else scalar."""
        chosen, method = self.options.prior_structure, self.options.prior_method
        if chosen is not PriorStructure.AUTO:
            return chosen
        layerwise = self.has_layerwise_prior and method is PriorMethod.MARGLIK
        return PriorStructure.LAYERWISE if layerwise else PriorStructure.SCALAR

    def _link(self, f_mu: torch.Tensor, f_var: torch.Tensor) -> torch.Tensor:
        o = self.options
        return glm_link(self.la, f_mu, f_var, o.link.value, o.n_samples, self.generator)

    def predict(self, x: torch.Tensor) -> Prediction:
        if self.la is None:
            raise RuntimeError("predict called before fit")
        return predict_batched(self._functional, self._link, x, self._pred_batch(), self.progress,
                               f"{self.desc} predict")

    def summary(self) -> dict[str, Any]:
        return dict(self.info)


@register_method("laplace-ll")
class LastLayerLaplace(_LaplaceBase):
    """Last-layer Laplace (KFAC GGN by default) with laplace-torch's own GLM predictive."""

    Options = LastLayerOptions
    desc = "laplace-ll"
    has_layerwise_prior = False
    # laplace-torch finds the last layer itself: it must be an nn.Linear after other modules.
    model_hint = "last-layer Laplace needs a model whose last module is an nn.Linear after others; use laplace"

    def _build(self, ctx: FitContext) -> Any:
        from laplace import Laplace

        if self.options.prior_structure is PriorStructure.LAYERWISE:
            raise BenchError(
                "laplace-ll takes prior_structure=scalar only (laplace-torch's last-layer "
                "posteriors have no per-layer prior); use laplace for a layerwise prior"
            )
        model = _require_map(ctx, self.name)
        return Laplace(model, "classification", subset_of_weights="last_layer",
                       hessian_structure=self.options.structure.value)

    def summary(self) -> dict[str, Any]:
        return {**self.info, "last_layer": last_layer_name(self.la) if self.la else None}


@register_method("laplace")
class LinearizedLaplace(_LaplaceBase):
    """Linearised Laplace over all trainable weights; fast exact GLM predictive by default."""

    Options = LaplaceOptions
    desc = "laplace"
    model_hint: str | None = None  # advice when laplace-torch refuses the model with a ValueError

    def __init__(self, options: LaplaceOptions | None = None) -> None:
        super().__init__(options)
        self.fast: FastGLMPredictive | None = None

    def _build(self, ctx: FitContext) -> Any:
        from laplace import Laplace

        o = self.options
        model = _require_map(ctx, self.name)
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if o.structure is Structure.FULL and n_params > o.max_full_params:
            raise BenchError(
                f"laplace structure=full needs a {n_params}x{n_params} matrix: the model has "
                f"{n_params} parameters > max_full_params={o.max_full_params}; use structure=kron "
                f"or structure=diag (or laplace-ll)"
            )
        backend = resolve_backend(o.backend, o.structure, model)
        return Laplace(model, "classification", subset_of_weights="all",
                       hessian_structure=o.structure.value, backend=backend)

    def _after_fit(self) -> None:
        if self.options.predictive is Predictive.FAST:
            self.fast = FastGLMPredictive(self.la)

    def _functional(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fast is not None:
            return self.fast.functional(x)
        return super()._functional(x)

    def _pred_batch(self) -> int:
        if self.options.predictive is Predictive.FAST:
            return self.options.batch_size
        return min(self.options.batch_size, LAPLACE_TORCH_BATCH)

    def _val_nll(self, val: TensorDataset) -> Any:
        if self.fast is None:
            return None
        x_val, y_val = val.tensors

        def score() -> float:
            return float(nll_of(self.predict(x_val).probs, y_val))

        return score

    def summary(self) -> dict[str, Any]:
        return {**self.info, "predictive": self.options.predictive.value}
