"""RegVar, per input (McInerney & Kallus, AISTATS 2025, "Variation Due to Regularization").

For a query x*, refit the MAP with the prediction added to the log-joint,
``θ̂_λ = argmax L(θ) + λ·g(x*; θ)``, and read the variance as the change of the prediction per
unit λ: ``σ²(x*) ≈ [g(x*; θ̂_λ) − g(x*; θ̂)] / λ``. As λ → 0 this is g'ᵀP⁻¹g', the linearized
Laplace predictive variance with P the Hessian of the negative log-joint (the paper's
Theorem 4.1). The estimate needs no Hessian (small fits use one only to start L-BFGS, below).
The objective is in ``methods.regvar_common`` (mean cross-entropy + (wd/2)‖θ‖², prior
precision n·wd). Option ``lam`` is λ per example: the minimised mean loss gets the term
−lam·g(x*), i.e. the paper's log-joint λ is lam·n; a given lam moves the parameters by the same
amount whatever n (default 1e-5, see the fidelity sweep).

Which output g is regularised (option ``output``) — for a C-class model the "prediction" is a
vector of logits f, and we regularise one fixed linear read-out g = wᵀf per fit:

- ``top`` (default): g = f_ŷ, the logit of the MAP's predicted class ŷ. One fit pair per
  input; σ² = J_ŷ P⁻¹ J_ŷᵀ. The predictive applies this σ² to every logit.
- ``logits``: one fit pair per logit k, giving the diagonal J_k P⁻¹ J_kᵀ (C times the cost).
  The predictive uses each logit's own σ²_k; the score is their mean.
- ``mean-abs``: g = mean_k |f_k|, the paper listing's output, linearised at the MAP
  (w = sign(f_MAP)/C); σ² is the variance of the mean absolute logit, applied to every logit.

The ``variance`` score is σ² of the regularised output (for ``logits``: the mean over logits).
The predictive is the linearized-Laplace probit per logit,
``softmax(f_MAP / sqrt(1 + π/8 · s · σ²))``, with the scale s tuned on validation NLL over
``val_queries`` validation inputs (recorded in ``summary()``).

Finite differences (option ``difference``). A MAP from a few epochs of AdamW is not a
stationary point of the objective: refitting moves g even with λ = 0, and that drift divided
by a small λ swamps the variance. ``central`` (default) fits +λ and −λ with the same optimizer,
steps and data order and takes [g(θ̂₊) − g(θ̂₋)]/(2λ): the drift cancels and so does the O(λ)
bias. ``forward`` differences against a λ = 0 fit with the same optimizer, steps and data.
With the full-batch L-BFGS solver the MAP is first continued to a stationary point θ₀ of the
objective (option ``polish``: one λ = 0 fit shared by all queries; the summary records the
gradient before and after and how far the logits moved): fits that start far from their optimum
follow trajectories whose difference is not the λ effect. The variance is then the Laplace
variance at θ₀, while the predictive mean stays the MAP network's logits. Minibatch solvers
(adam, sgd) cannot polish; they rely on the ± pair sharing its data order, and with a fixed
step budget they resolve only the directions of P that they converge in (see ``steps`` and the
summary's ``rel_change_last_half``).

Which parameters (option ``weights``). The paper refits every weight. That is what ``auto``
does when a full-batch L-BFGS fit of the whole network is affordable (the fidelity models,
small heads); on the benchmark's full-size networks it refits the last ``nn.Linear`` on fixed
features instead (the RegVar counterpart of last-layer Laplace), because minibatch Adam from
the MAP does not converge in a CPU budget and an unconverged fit is not RegVar's estimate.
The result records the choice (``weights``); ``weights=all optimizer=adam`` remains available.
The L-BFGS fits are ill-conditioned (weak priors, near-separable classes), hence the long
history (100 pairs); a fit stops when its step falls below ``xtol`` of the distance it has
travelled (``max_iterations`` in the summary). With at most ``hessian_start`` parameters (a last
layer) every fit's L-BFGS starts from the exact P⁻¹ at θ₀ instead of γ·I: all fits start at θ₀
and move O(λ) from it, so the first step is nearly Newton's. Same optimum and stopping rules; on
Fashion-MNIST's last layer (650 parameters) fits then stop after ≤ 9 iterations instead of
≤ 241, 0.22 instead of 4.6 s per query, variances within 0.5 % (median 0.02 %) of the
unpreconditioned fits'. No Hessian enters the estimate itself, which remains Δg/λ.

Cost and the evaluated subset: each input costs one (``top``) or C pairs of fits. ``predict``
computes the variance of every input it is given and refuses more than ``max_queries`` inputs
per call rather than inventing scores: the harness evaluates a fixed seeded subset of each
evaluation set for methods that set ``eval_limit`` (this one sets it to ``max_queries``).
"""

from __future__ import annotations

import copy
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from bench.errors import BenchError
from bench.method_api import FitContext, Method, register_method
from bench.options import option
from bench.seeding import derive_seed
from bench.types import Prediction

from .regvar_common import (
    FlatModel,
    Optimizer,
    Regularizer,
    SolverOptions,
    SolverSettings,
    StackedObjective,
    inverse_hessian,
    polish,
    probit_probs,
    resolve,
    solve,
    train_tensors,
    tune_scale,
)


class Output(str, enum.Enum):
    """Which read-out of the logits is regularised (see the module docstring)."""

    TOP = "top"
    """The MAP-predicted class's logit: one fit pair per input."""
    LOGITS = "logits"
    """Every logit in turn: C fit pairs per input, the diagonal of the logit covariance."""
    MEAN_ABS = "mean-abs"
    """The mean absolute logit (the paper's listing), linearised at the MAP's signs."""


class Weights(str, enum.Enum):
    """Which parameters the regularised fits may move."""

    AUTO = "auto"
    """all when a full-batch L-BFGS fit of every parameter is affordable (n_train·n_params ≤
    full_batch_budget), else last-layer: minibatch fits of a large network do not converge in
    a CPU budget (Adam from the MAP drifts for hundreds of steps), and a fit that has not
    converged gives a number that is not RegVar's. The choice is recorded as ``weights``."""
    ALL = "all"
    """Every trainable parameter, as in the paper."""
    LAST_LAYER = "last-layer"
    """Only the final ``nn.Linear`` (features fixed): the RegVar counterpart of last-layer
    Laplace; its full-batch fits are cheap and converge on large tasks."""


class Difference(str, enum.Enum):
    """How the change of the prediction is measured."""

    CENTRAL = "central"
    """[g(θ₊λ) − g(θ₋λ)] / 2λ: cancels optimizer drift and the O(λ) bias."""
    FORWARD = "forward"
    """[g(θ₊λ) − g(θ₀)] / λ against a λ = 0 fit with the same optimizer, steps and data."""


@dataclass
class RegVarOptions(SolverOptions):
    lam: float = option(1e-5, "λ/n: the loss term is −lam·g(x*) (the paper's λ is lam·n_train)", min=0.0)
    output: Output = option(Output.TOP, "regularised read-out of the logits")
    weights: Weights = option(Weights.AUTO, "parameters refitted: all (the paper), last-layer, or auto")
    difference: Difference = option(Difference.CENTRAL, "finite-difference scheme")
    query_batch: int = option(32, "fits solved together in one vmapped stack", min=1)
    max_queries: int = option(100, "most inputs per predict call (see eval_limit)", min=1)
    val_queries: int = option(50, "validation inputs for tuning the variance scale (0: s=1)", min=0)
    hessian_start: int = option(
        1024, "lbfgs: fits start from the exact P⁻¹ at θ₀ when there are at most this many parameters (0: off)", min=0
    )


def output_weights(logits: torch.Tensor, output: Output) -> torch.Tensor:
    """Read-out weights w (N, K, C) so that g_k = w_kᵀ f for the K fits per input."""
    n, c = logits.shape
    if output is Output.TOP:
        return torch.nn.functional.one_hot(logits.argmax(1), c).to(logits.dtype)[:, None, :]
    if output is Output.LOGITS:
        return torch.eye(c, dtype=logits.dtype).expand(n, c, c).clone()
    return (logits.sign() / c)[:, None, :]


def regvar_variance(
    fm: FlatModel,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    weight_decay: float,
    queries: torch.Tensor,
    weights: torch.Tensor,
    lams: tuple[float, ...],
    settings: SolverSettings,
    difference: Difference = Difference.CENTRAL,
    query_batch: int = 32,
    checkpoints: tuple[int, ...] = (),
    stats: dict[str, int] | None = None,
    progress: Callable[..., Any] | None = None,
    curvature: torch.Tensor | None = None,
) -> dict[int, torch.Tensor]:
    """σ² for every query (N), read-out (K) and λ (L): {step: (N, K, L)} at each checkpoint
    and at ``settings.steps`` (the final value). All fits start from ``fm.theta0``, L-BFGS
    ones with ``curvature`` as their starting inverse Hessian when given.
    ``stats["stalled_fits"]`` accumulates L-BFGS fits that stopped without an acceptable step."""
    if any(lam <= 0 for lam in lams):
        raise BenchError("RegVar needs λ > 0 (option lam)")
    n_q, k_out, _ = weights.shape
    signs = (1.0, -1.0) if difference is Difference.CENTRAL else (1.0, 0.0)
    # One copy per (query, read-out, λ, sign), flattened in that order.
    qi, ki, li, si = torch.meshgrid(
        torch.arange(n_q),
        torch.arange(k_out),
        torch.arange(len(lams)),
        torch.arange(2),
        indexing="ij",
    )
    qi, ki, li, si = qi.reshape(-1), ki.reshape(-1), li.reshape(-1), si.reshape(-1)
    lam_t = torch.tensor(lams, dtype=fm.dtype, device=fm.device)
    sign_t = torch.tensor(signs, dtype=fm.dtype, device=fm.device)
    coef = lam_t[li] * sign_t[si]
    x_q = queries.to(fm.device, fm.dtype)
    w_all = weights.to(fm.device, fm.dtype)
    steps = sorted({*checkpoints, settings.steps})
    read: dict[int, torch.Tensor] = {s: torch.empty(len(qi), dtype=fm.dtype) for s in steps}
    total = len(qi)
    starts = range(0, total, query_batch)
    if progress is not None:
        starts = progress(starts, desc=f"regvar fits ({n_q} inputs)", unit="stack")
    for start in starts:
        sl = slice(start, min(start + query_batch, total))
        xq, wq = x_q[qi[sl]], w_all[qi[sl], ki[sl]]
        objective = StackedObjective(
            fm, x_train, y_train, weight_decay, Regularizer(coef=coef[sl], queries=xq, weights=wq)
        )
        theta0 = fm.theta0.expand(xq.shape[0], -1).clone()

        def record(
            step: int,
            thetas: torch.Tensor,
            sl: slice = sl,
            xq: torch.Tensor = xq,
            wq: torch.Tensor = wq,
        ) -> None:
            if step in read:
                read[step][sl] = (fm.stacked_logits(thetas, xq) * wq).sum(1).cpu()

        solve(objective, theta0, settings, checkpoints, record, curvature)
        if stats is not None:
            stats["stalled_fits"] = stats.get("stalled_fits", 0) + objective.stats["stalled"]
            used = objective.stats.get("iterations", settings.steps)
            stats["max_iterations"] = max(stats.get("max_iterations", 0), used)
    out = {}
    denom = (lam_t * (2.0 if difference is Difference.CENTRAL else 1.0)).cpu()
    for step, g in read.items():
        g = g.view(n_q, k_out, len(lams), 2)
        out[step] = (g[..., 0] - g[..., 1]) / denom
    return out


@register_method("regvar")
class RegVar(Method):
    """Per-input RegVar: one regularised refit pair per input (and per logit with 'logits')."""

    Options = RegVarOptions

    def __init__(self, options: RegVarOptions | None = None) -> None:
        super().__init__(options)
        self.fm: FlatModel | None = None
        self.curvature: torch.Tensor | None = None
        self.info: dict[str, Any] = {}
        self.stats: dict[str, int] = {"stalled_fits": 0}
        self.scale = 1.0
        self.progress: Callable[..., Any] | None = None

    @property
    def eval_limit(self) -> int:
        """Most inputs per evaluation set; the harness evaluates a seeded subset beyond it."""
        return self.options.max_queries

    def fit(self, ctx: FitContext) -> None:
        if ctx.map_model is None:
            raise BenchError("regvar needs the MAP network (uses_map); the harness gave none")
        o = self.options
        n_train = len(ctx.data.train)
        net = ctx.map_model
        self.featurize = None
        self.progress = ctx.progress
        weights = resolve_weights(o.weights, n_train, net, o.full_batch_budget)
        if weights is Weights.LAST_LAYER:
            net, self.featurize = split_last_linear(ctx.map_model, ctx.device)
        dim = sum(p.numel() for p in net.parameters() if p.requires_grad)
        opt, dtype = resolve(o.optimizer, o.precision, n_train, dim, o.full_batch_budget)
        self.fm = FlatModel(net, dtype, ctx.device)
        x_tr, y_tr = ctx.data.train.tensors[0], ctx.data.train.tensors[1]
        self.x_train, self.y_train = train_tensors(TensorDataset(self._inputs(x_tr), y_tr), self.fm)
        self.wd = ctx.recipe.weight_decay
        self.settings = o.settings(opt, seed=derive_seed(ctx.seed, "regvar", "data-order"))
        self.info = {
            "objective": "mean CE + (wd/2)|θ|², eval mode",
            "prior_precision": n_train * self.wd,
            "n_train": n_train,
            "n_params": dim,
            "optimizer": opt.value,
            "dtype": str(dtype).removeprefix("torch."),
            "lam": o.lam,
            "lam_joint": o.lam * n_train,
            "output": o.output.value,
            "weights": weights.value,
            "difference": o.difference.value,
            "steps": o.steps,
            "max_queries": o.max_queries,
        }
        ctx.log(
            f"regvar: {dim} params ({weights.value}), {opt.value}/{self.info['dtype']}, "
            f"λ/n={o.lam}, output={o.output.value}"
        )
        self.theta_map = self.fm.theta0.clone()
        if opt is Optimizer.LBFGS and o.polish > 0:
            self.fm.theta0, info = polish(self.fm, self.x_train, self.y_train, self.wd, self.settings, o.polish)
            self.info.update(info)
        self.curvature = None
        if opt is Optimizer.LBFGS and 0 < dim <= o.hessian_start:
            t0 = time.perf_counter()
            objective = StackedObjective(self.fm, self.x_train, self.y_train, self.wd,
                                         Regularizer(coef=self.fm.theta0.new_zeros(1)))
            self.curvature = inverse_hessian(objective, self.fm.theta0)
            self.info["hessian_s"] = time.perf_counter() - t0
        self.info["hessian_start"] = self.curvature is not None
        self.scale = 1.0
        if o.val_queries > 0:
            xv, yv = ctx.data.val.tensors[0], ctx.data.val.tensors[1]
            gen = torch.Generator().manual_seed(derive_seed(ctx.seed, "regvar", "val-subset"))
            pick = torch.randperm(len(xv), generator=gen)[: o.val_queries]
            t0 = time.perf_counter()
            inputs = self._inputs(xv[pick])
            logits = self.fm.logits(self.theta_map, inputs).cpu()
            half = max(1, o.steps // 2)
            var = self._variance(inputs, logits, checkpoints=(half,))
            self.scale, val_nll = tune_scale(logits, self._probit_var(var[o.steps]), yv[pick])
            self.info.update(
                {
                    "scale": self.scale,
                    "val_nll": val_nll,
                    "val_queries": len(pick),
                    "seconds_per_query": (time.perf_counter() - t0) / len(pick),
                    # Convergence: median |σ²(steps) − σ²(steps/2)| / σ²(steps) on validation.
                    "rel_change_last_half": _median_rel(var[half], var[o.steps]),
                }
            )
            ctx.log(
                f"regvar: scale s={self.scale:.3g} (val NLL {val_nll:.4f}), "
                f"{self.info['seconds_per_query']:.2f} s/query"
            )
        self.info["scale"] = self.scale

    def _variance(
        self, x: torch.Tensor, logits: torch.Tensor, checkpoints: tuple[int, ...] = ()
    ) -> dict[int, torch.Tensor]:
        assert self.fm is not None
        o = self.options
        w = output_weights(logits, o.output)
        var = regvar_variance(
            self.fm,
            self.x_train,
            self.y_train,
            self.wd,
            x,
            w,
            (o.lam * len(self.x_train),),
            self.settings,
            o.difference,
            o.query_batch,
            checkpoints,
            self.stats,
            self.progress,
            self.curvature,
        )
        return {k: v[..., 0] for k, v in var.items()}  # (N, K)

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        """What the fitted network takes: the inputs, or their last-layer features."""
        return x if self.featurize is None else self.featurize(x)

    def _probit_var(self, var: torch.Tensor) -> torch.Tensor:
        return var if self.options.output is Output.LOGITS else var[:, 0]

    def predict(self, x: torch.Tensor) -> Prediction:
        if self.fm is None:
            raise BenchError("regvar: predict called before fit; call fit(ctx) first")
        if len(x) > self.options.max_queries:
            raise BenchError(
                f"regvar refits the model for every input: {len(x)} inputs exceed "
                f"max_queries={self.options.max_queries}; raise it (--set max_queries=N) or "
                "evaluate a subset"
            )
        inputs = self._inputs(x)
        logits = self.fm.logits(self.theta_map, inputs).cpu()
        var = self._variance(inputs, logits)[self.options.steps]
        probs = probit_probs(logits, self._probit_var(var), self.scale)
        return Prediction(probs.float(), {"variance": var.mean(1).float()})

    def summary(self) -> dict[str, Any]:
        return {**self.info, **self.stats}


def resolve_weights(weights: Weights, n_train: int, model: nn.Module, full_batch_budget: float) -> Weights:
    """The concrete parameter set ('auto' resolved, see ``Weights.AUTO``)."""
    if weights is not Weights.AUTO:
        return weights
    dim = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Weights.ALL if n_train * dim <= full_batch_budget else Weights.LAST_LAYER


def split_last_linear(
    model: nn.Module, device: torch.device, batch_size: int = 1024
) -> tuple[nn.Linear, Callable[[torch.Tensor], torch.Tensor]]:
    """The model's last ``nn.Linear`` (a copy) and a function x → its input features, checked
    to reproduce the model's output (the head must be the last operation)."""
    body = copy.deepcopy(model).to(device).eval()
    linears = [m for m in body.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise BenchError("regvar weights=last-layer needs an nn.Linear output layer; use weights=all")
    head = linears[-1]

    @torch.no_grad()
    def featurize(x: torch.Tensor) -> torch.Tensor:
        feats: list[torch.Tensor] = []
        hook = head.register_forward_pre_hook(lambda _m, args: feats.append(args[0].detach()))
        try:
            for i in range(0, len(x), batch_size):
                body(x[i : i + batch_size].to(device))
        finally:
            hook.remove()
        return torch.cat(feats).cpu()

    return copy.deepcopy(head), _checked(body, head, featurize)


def _checked(body: nn.Module, head: nn.Linear, featurize: Callable) -> Callable:
    def run(x: torch.Tensor) -> torch.Tensor:
        feats = featurize(x)
        with torch.no_grad():
            sample = x[:8].to(next(body.parameters()).device)
            full = body(sample).float().cpu()
            part = head(feats[:8].to(sample.device)).float().cpu()
        if not torch.allclose(full, part, rtol=1e-4, atol=1e-4):
            raise BenchError(
                "regvar weights=last-layer: the model's output is not its last "
                "nn.Linear applied to that layer's input; use weights=all"
            )
        return feats

    return run


def _median_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs().clamp_min(1e-12)).median())
