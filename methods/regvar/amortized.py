"""Amortized RegVar: the training-step listing of McInerney & Kallus (AISTATS 2025).

One extra fine-tune of the whole trainable model from the MAP, with the listing's loss
``CE(f, y) − log p(θ)/n + λ·mean|f|/n`` over the *training* batches (mean over the batch and
the logits), serves every test input; inference is two forward passes and
``σ²_k(x) = |f_λ,k(x) − f_ref,k(x)| / λ`` per logit k. Objective, prior and λ scale: see
``methods/regvar/common.py`` (the prior term is (wd/2)‖θ‖², precision n·wd on the log-joint).

What it estimates (derivation in the project's regvar reference, not the paper's claim): by the
implicit-function argument its λ → 0 limit is |J_k(x) P⁻¹ E_x'[Σ_j sign(f_j(x')) J_j(x')ᵀ]|/C,
a signed, averaged posterior covariance between x and the training inputs, **not** the
variance J_k(x) P⁻¹ J_k(x)ᵀ. The paper compensates with a variance rescaling s tuned jointly
with λ on validation NLL. Here λ is the method's choice: the λ of ``lam_grid`` whose best s on
the shared scale grid gives the lowest validation NLL (s profiled out, recorded as
``profile_scale``). The scale itself is the harness's, as for every method with a logit
Gaussian: the method's own predictive is s = 1, and its ``[s tuned]`` row, tuned by the one rule
on the same validation inputs, is the paper's tuned predictive. The fidelity check
(``python -m bench fidelity``) reports how far it is from the Laplace variance; nothing here
is tuned to make it look equal.

Defaults follow the paper's listing: the variance is |f_λ − f_MAP|/λ (``difference=paper``) and
the predictive mean is the MAP's logits (``map_mean=true``), so that the row differs from the
``map`` row only by its variance: the ``map`` row *is* this method with the variance removed
(same logits, scale 0), which the leaderboard shows beside it. Because a MAP from AdamW is not a
stationary point of the objective (the harness finishes it to one only where the task's recipe
affords it), any fine-tune drifts and that drift divided by λ enters the variance (see
regvar.md); the options ``central`` (fine-tunes +λ and −λ with the same optimizer, steps and
data order, |f₊ − f₋|/2λ) and ``forward`` (a λ = 0 fine-tune as the reference) cancel the drift.
With ``map_mean=false`` their mean is the fits' ((f₊ + f₋)/2 or f₀): the MAP refined by 500
more steps, which is then a different network from the MAP. Every fine-tune starts from the
shared MAP itself.
λ is per example (``lam_grid`` holds λ/n, the listing's coefficient of mean|f|; the paper's λ is
λ/n·n, recorded as ``lam_joint``).
The ``variance`` score is σ² of the predicted class's logit (as per-input RegVar's default);
the predictive uses every logit's own σ²_k in the probit.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import torch

from bench.errors import BenchError
from bench.formulas import probit_probs
from bench.method_api import (
    FLAGS_KEY,
    OWN_PREDICTIVE_KEY,
    PROBIT_AT_1,
    FitContext,
    Method,
    grid_edge_flag,
    register_method,
)
from bench.options import option
from bench.scale_tuning import SCALE_GRID, flat_within_noise, scale_curve
from bench.seeding import derive_seed
from bench.types import Prediction

from .common import (
    FlatModel,
    Regularizer,
    SolverOptions,
    StackedObjective,
    resolve,
    solve,
    train_tensors,
)


class Reference(str, enum.Enum):
    """What the λ fine-tune is compared with."""

    CENTRAL = "central"
    """+λ and −λ fine-tunes, same optimizer, steps and data order: |f₊ − f₋| / 2λ."""
    FORWARD = "forward"
    """A λ = 0 fine-tune with the same optimizer, steps and data order: |f_λ − f₀| / λ."""
    PAPER = "paper"
    """The MAP itself, as in the paper's listing: |f_λ − f_MAP| / λ (includes drift)."""


@dataclass
class AmortizedOptions(SolverOptions):
    lam_grid: tuple[float, ...] = option(
        (1e-5, 1e-4, 1e-3), "λ/n values tried (the listing's λ·mean|f|/n; paper's λ = this·n)", min=0.0
    )
    difference: Reference = option(Reference.PAPER, "reference of the finite difference")
    steps: int = option(500, "L-BFGS iterations (at most) or adam/sgd minibatch steps", min=1)
    eval_batch: int = option(512, "inputs per forward pass at predict time", min=1)
    map_mean: bool = option(True, "predictive mean from the MAP network (as the paper) instead of the fits'")


@register_method("regvar-amortized")
class RegVarAmortized(Method):
    """One regularised fine-tune (pair) of the whole model; two forward passes per input."""

    citation = (
        'J. McInerney and N. Kallus, "Variation Due to Regularization Tractably Recovers Bayesian '
        'Deep Learning", AISTATS 2025 (arXiv 2403.10671)'
    )

    Options = AmortizedOptions

    def __init__(self, options: AmortizedOptions | None = None) -> None:
        super().__init__(options)
        self.fm: FlatModel | None = None
        self.pair: tuple[torch.Tensor, torch.Tensor] | None = None
        self.lam = self.lam_joint = 0.0
        self.scale = 1.0  # the own predictive's variance scale: 1 (the harness tunes s; 0 removes the variance)
        self.info: dict[str, Any] = {}

    def fit(self, ctx: FitContext) -> None:
        if ctx.map_model is None:
            raise BenchError("regvar-amortized needs the MAP network; the harness gave none")
        o = self.options
        if not o.lam_grid or any(lam <= 0 for lam in o.lam_grid):
            raise BenchError("regvar-amortized: lam_grid needs values > 0, e.g. lam_grid=1e-5|1e-4|1e-3")
        n_train = len(ctx.data.train)
        dim = sum(p.numel() for p in ctx.map_model.parameters() if p.requires_grad)
        # A full pass costs every weight the inputs go through, frozen ones too (a LoRA backbone).
        passed = sum(p.numel() for p in ctx.map_model.parameters())
        opt, dtype = resolve(o.optimizer, o.precision, n_train, passed, o.full_batch_budget)
        fm = self.fm = FlatModel(ctx.map_model, dtype, ctx.device)
        self.theta_map = fm.theta0.clone()
        x_train, y_train = train_tensors(ctx.data.train, fm)
        settings = o.settings(opt, derive_seed(ctx.seed, "regvar-amortized", "data-order"), ctx.recipe.batch_size)
        lams = torch.tensor(o.lam_grid, dtype=dtype, device=ctx.device) * n_train  # log-joint λ
        self.info = {}
        second = {Reference.CENTRAL: -1.0, Reference.FORWARD: 0.0, Reference.PAPER: None}[o.difference]
        # Copies: λ_j for every j, then the reference fits (−λ_j or 0) unless the MAP is it.
        coefs = [lams] + ([lams * second] if second is not None else [])
        coef = torch.cat(coefs)
        ctx.log(
            f"regvar-amortized: {len(coef)} fine-tune(s) of {dim} params, {opt.value}, "
            f"{o.steps} steps of {settings.batch_size}, λ grid {list(o.lam_grid)}"
        )
        objective = StackedObjective(fm, x_train, y_train, ctx.recipe.weight_decay, Regularizer(coef=coef))
        thetas = solve(objective, fm.theta0.expand(len(coef), -1).clone(), settings, progress=ctx.progress)
        k = len(o.lam_grid)
        refs = thetas[k:] if second is not None else fm.theta0.expand(k, -1)
        # Tune (λ, s) jointly on validation NLL over the whole validation set (2 passes each).
        nll_grid, curves = self._validation_grid(thetas[:k], refs, lams, *ctx.data.val.tensors)
        val_nll, j, i = min((v, j, i) for j, row in enumerate(nll_grid) for i, v in enumerate(row))
        profile_scale = float(SCALE_GRID[i])
        table = {
            str(lam): {"scale": float(SCALE_GRID[min(range(len(row)), key=row.__getitem__)]), "val_nll": min(row)}
            for lam, row in zip(o.lam_grid, nll_grid, strict=True)
        }
        self.lam, self.lam_joint = float(o.lam_grid[j]), float(lams[j])
        self.pair = (thetas[j].clone(), refs[j].clone())
        self.info |= {
            "objective": "mean CE + (wd/2)|θ|² + λ·mean|f|/n, eval mode",
            "prior_precision": n_train * ctx.recipe.weight_decay,
            "optimizer": opt.value,
            "dtype": str(dtype).removeprefix("torch."),
            "steps": o.steps,
            "batch_size": settings.batch_size,
            "difference": o.difference.value,
            "lam": self.lam,
            "lam_joint": self.lam_joint,
            "scale": self.scale,
            OWN_PREDICTIVE_KEY: PROBIT_AT_1,
            "profile_scale": profile_scale,
            "val_nll": val_nll,
            "grid": table,
            # for `bench plot`'s contour: nll[j][i] at lambdas[j], scales[i]
            "validation_nll_grid": {"lambdas": list(o.lam_grid), "scales": list(SCALE_GRID), "nll": nll_grid},
        }
        ctx.log(f"regvar-amortized: λ={self.lam:g} (val NLL {val_nll:.4f} at s={profile_scale:.3g}; "
                "the predictive is s = 1, the harness tunes s)")
        if lam_flag := self._lam_flag(curves):
            self.info[FLAGS_KEY] = [lam_flag]

    def _validation_grid(self, thetas: torch.Tensor, refs: torch.Tensor, lams: torch.Tensor, x_val: torch.Tensor,
                         y_val: torch.Tensor) -> tuple[list[list[float]], list[torch.Tensor]]:
        """nll_grid[j][i]: the validation NLL at λ_j and scale s_i (2 passes per λ); the curves per input."""
        nll_grid, curves = [], []
        for j in range(len(lams)):
            logits, var = self._mean_var(thetas[j], refs[j], float(lams[j]), x_val)
            curves.append(scale_curve(logits, var, y_val, SCALE_GRID))
            nll_grid.append(curves[-1].mean(1).tolist())
        return nll_grid, curves

    def _lam_flag(self, curves: list[torch.Tensor]) -> str | None:
        """A flag when the chosen λ is no choice: a flat validation NLL over λ, or a grid edge."""
        lam_grid = self.options.lam_grid
        at_best_scale = torch.stack([c[int(c.mean(1).argmin())] for c in curves])  # λ × inputs
        if len(lam_grid) > 1 and flat_within_noise(at_best_scale):
            return ("the amortized variance does not change validation NLL here: every λ on the grid is within "
                    "the bootstrap noise of the best, so λ is not a tuned choice")
        return grid_edge_flag("λ", self.lam, lam_grid, "the best λ may lie outside the grid")

    @torch.no_grad()
    def _mean_var(
        self, theta: torch.Tensor, ref: torch.Tensor, lam: float, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictive mean logits and per-logit σ² from the two forward passes."""
        assert self.fm is not None
        f_lam = self.fm.logits(theta, x, self.options.eval_batch).double().cpu()
        f_ref = self.fm.logits(ref, x, self.options.eval_batch).double().cpu()
        if self.options.difference is Reference.CENTRAL:
            mean, var = 0.5 * (f_lam + f_ref), (f_lam - f_ref).abs() / (2.0 * lam)
        else:
            mean, var = f_ref, (f_lam - f_ref).abs() / lam
        if self.options.map_mean:
            mean = self.fm.logits(self.theta_map, x, self.options.eval_batch).double().cpu()
        return mean, var

    def predict(self, x: torch.Tensor) -> Prediction:
        if self.pair is None:
            raise BenchError("regvar-amortized: predict called before fit; call fit(ctx) first")
        logits, var = self._mean_var(*self.pair, self.lam_joint, x)
        probs = probit_probs(logits, var, self.scale)
        top = var.gather(1, logits.argmax(1, keepdim=True)).squeeze(1)
        return Prediction(probs.float(), {"variance": top.float()}, logits.double(), var.double())

    def summary(self) -> dict[str, Any]:
        return dict(self.info)
