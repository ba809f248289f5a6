"""Shared pieces of the two Laplace methods: option enums, prior tuning, batched GLM prediction.

Both methods wrap laplace-torch (``laplace.Laplace``): it fits the curvature and the posterior,
tunes the prior precision (marginal likelihood by default), and its GLM predictive with the
probit link is the default predictive. What is added here:

* grid search on validation NLL guarded against two pitfalls of laplace-torch 0.3's
  ``_gridsearch``: its default ``RunningNLLMetric`` takes ``log`` of probabilities that may be 0
  (NLL = inf at every grid point, so ``argmin`` silently returns the *smallest* prior), and as a
  torchmetrics ``Metric`` it is never reset between grid points (``validate`` only updates it),
  so later points are scored on the running mean of all earlier ones. We pass a stateless
  callable instead, clamp probabilities at the smallest normal float, map NaN to inf and refuse
  a search where no grid point gave a finite NLL;
* predictions in bounded batches with a progress bar, returning the predictive variance score.

The uncertainty score is ``variance``: the mean over classes of the diagonal of the GLM
functional covariance, (1/C)·tr(J Σ Jᵀ) — the posterior variance of the logits averaged over
classes. It is the quantity the Laplace approximation adds to the MAP network (an epistemic
score), independent of the link approximation and of MC noise.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from enum import Enum
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from bench.errors import BenchError
from bench.formulas import nll
from bench.method_api import grid_edge_flag
from bench.types import Prediction


class PriorMethod(str, Enum):
    """How the prior precision (weight decay of the Gaussian prior) is chosen."""

    MARGLIK = "marglik"
    """maximise laplace-torch's Laplace log marginal likelihood on the training data (Adam)"""
    GRIDSEARCH = "gridsearch"
    """the value on a log grid with the lowest validation NLL of the chosen predictive"""
    FIXED = "fixed"
    """use the ``prior_precision`` option as is"""
    OBJECTIVE = "objective"
    """the MAP objective's own prior, n·wd (mean CE + (wd/2)‖θ‖² times n): the precision RegVar
    reads, so ``laplace`` vs ``regvar`` and ``laplace-ll`` vs ``regvar-ll`` differ by method only"""


class PriorStructure(str, Enum):
    """Shape of the prior precision tuned by marglik."""

    AUTO = "auto"
    """layerwise where the method has it and the prior is tuned by marglik (all-weights
    ``laplace``: it matched or beat scalar on NLL, ECE and OOD AUROC on all three tasks, see the
    README's prior study); scalar otherwise (``laplace-ll``, gridsearch, fixed)"""
    SCALAR = "scalar"
    """one precision for all weights"""
    LAYERWISE = "layerwise"
    """one precision per parameter tensor (laplace-torch's "layerwise")"""


class Link(str, Enum):
    """How the Gaussian over logits becomes class probabilities (laplace-torch ``link_approx``)."""

    PROBIT = "probit"
    """probit approximation: softmax(f_mu / sqrt(1 + π/8 · diag f_var)); deterministic"""
    MC = "mc"
    """mean of softmax over ``n_samples`` draws from N(f_mu, f_var)"""




class GuardedNLL:
    """Mean NLL of class probabilities, finite unless inputs are NaN; keeps every value it gave.

    Passed to laplace-torch's grid search as a plain callable (its "offline" loss), so nothing
    carries over between grid points.
    """

    def __init__(self) -> None:
        self.history: list[float] = []

    def __call__(self, probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        nll = nll_of(probs, targets)
        self.history.append(float(nll))
        return nll


def nll_of(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``bench.formulas.nll`` as a tensor, with NaN (NaN probabilities) read as +inf."""
    value = nll(probs, targets)
    return torch.tensor(value if math.isfinite(value) else math.inf, dtype=torch.float64)


@contextmanager
def quiet_laplace() -> Iterable[None]:
    """laplace-torch warns on every prior optimisation about its default link; silence that."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*link_approx.*")
        warnings.filterwarnings("ignore", message=".*val_loader.*")
        yield


def loader(data: TensorDataset, batch_size: int) -> DataLoader:
    """Deterministic (unshuffled) loader; laplace-torch reads N from ``loader.dataset``."""
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def log_grid(lo: float, hi: float, size: int) -> torch.Tensor:
    """laplace-torch's grid: ``torch.logspace(lo, hi, size)`` (base 10)."""
    if hi < lo:
        raise BenchError(f"grid_max={hi} is below grid_min={lo}; swap them")
    return torch.logspace(lo, hi, size)


def _marglik(la: Any, structure: PriorStructure, init: float, steps: int, lr: float, link: Link,
             n_samples: int) -> None:
    """laplace-torch's marginal-likelihood prior; a non-finite or non-positive result is an error."""
    with quiet_laplace():
        la.optimize_prior_precision(
            pred_type="glm",
            method="marglik",
            n_steps=steps,
            lr=lr,
            init_prior_prec=float(init),
            prior_structure=structure.value,
            link_approx=link.value,
            n_samples=n_samples,
        )
    if not torch.isfinite(la.prior_precision).all() or (la.prior_precision <= 0).any():
        raise BenchError(
            "marglik gave a non-finite prior precision; try prior_method=gridsearch or a "
            "smaller marglik_lr"
        )


def _grid_search(la: Any, grid: torch.Tensor, val: TensorDataset, batch_size: int, link: Link, n_samples: int,
                 val_nll: Callable[[], float] | None) -> list[float]:
    """Set the grid value with the lowest validation NLL; returns the NLL at every grid value."""
    if val_nll is None:
        metric = GuardedNLL()
        with quiet_laplace():
            la.optimize_prior_precision(
                pred_type="glm",
                method="gridsearch",
                val_loader=loader(val, batch_size),
                loss=metric,
                log_prior_prec_min=float(torch.log10(grid[0])),
                log_prior_prec_max=float(torch.log10(grid[-1])),
                grid_size=len(grid),
                link_approx=link.value,
                n_samples=n_samples,
            )
        return metric.history
    scores = []
    for value in grid:
        la.prior_precision = float(value)
        scores.append(val_nll())
    la.prior_precision = float(grid[int(torch.tensor(scores).argmin())])
    return scores


def tune_prior(
    la: Any,
    method: PriorMethod,
    structure: PriorStructure,
    init: float,
    *,
    marglik_steps: int,
    marglik_lr: float,
    grid: torch.Tensor,
    val: TensorDataset,
    batch_size: int,
    link: Link,
    n_samples: int,
    val_nll: Callable[[], float] | None = None,
    log: Callable[[str], None] = lambda _m: None,
) -> str | None:
    """Set ``la.prior_precision`` by ``method``; a flag if a grid search chose a grid edge.

    Grid search uses laplace-torch's ``optimize_prior_precision(method="gridsearch")`` with a
    guarded NLL, unless ``val_nll`` is given: then each grid value is scored by that function
    (the all-weights method passes its fast predictive, since laplace-torch's grid search would
    call laplace-torch's own slow predictive on the whole validation set at every grid point).
    """
    if method in (PriorMethod.FIXED, PriorMethod.OBJECTIVE):  # OBJECTIVE: the caller passes n·wd as init
        la.prior_precision = float(init)
        return None
    if method is PriorMethod.MARGLIK:
        _marglik(la, structure, init, marglik_steps, marglik_lr, link, n_samples)
        return None
    if structure is not PriorStructure.SCALAR:
        raise BenchError(
            "gridsearch tunes one scalar prior precision; use prior_structure=scalar or "
            "prior_method=marglik"
        )
    if len(val) == 0:
        raise BenchError("prior_method=gridsearch needs a non-empty validation split")
    scores = _grid_search(la, grid, val, batch_size, link, n_samples, val_nll)
    if not any(math.isfinite(s) for s in scores):
        raise BenchError(
            "gridsearch: the validation NLL is not finite at any grid value; widen "
            "grid_min/grid_max or use prior_method=marglik"
        )
    log(f"gridsearch: best validation NLL {min(scores):.4f} over {len(scores)} prior values")
    return grid_edge_flag("prior precision", float(torch.as_tensor(la.prior_precision).reshape(-1)[0]), grid.tolist(),
                          "the best prior may lie outside the grid (widen grid_min/grid_max)")


def prior_summary(la: Any) -> float | list[float]:
    """The tuned prior precision as a float (scalar) or a list (one per parameter tensor)."""
    prior = la.prior_precision.detach().cpu().reshape(-1)
    return float(prior[0]) if len(prior) == 1 else [float(v) for v in prior]


def predict_batched(
    functional: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    link: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    batch_size: int,
    progress: Callable[..., Iterable],
    desc: str,
) -> Prediction:
    """Run ``functional`` (→ f_mu, f_var) and ``link`` batch by batch; CPU float64 outputs."""
    probs, variance, means, covs = [], [], [], []
    starts = range(0, len(x), batch_size)
    for s in progress(starts, desc=desc, unit="batch", total=len(starts)):
        f_mu, f_var = functional(x[s : s + batch_size])
        probs.append(link(f_mu, f_var).double().cpu())
        variance.append(f_var.diagonal(dim1=1, dim2=2).mean(1).double().cpu())
        means.append(f_mu.detach().double().cpu())
        covs.append(f_var.detach().double().cpu())
    if not probs:
        empty = torch.empty(0, dtype=torch.float64)
        return Prediction(empty.reshape(0, 0), {"variance": empty})
    # The logit Gaussian itself (full C x C covariance) goes to the harness too, which derives
    # the scores and the s=1 / s-tuned predictives shared by every Gaussian method.
    return Prediction(torch.cat(probs), {"variance": torch.cat(variance)}, torch.cat(means), torch.cat(covs))
