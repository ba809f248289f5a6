"""RegVar, per input (McInerney & Kallus, AISTATS 2025, "Variation Due to Regularization").

For a query x*, refit the MAP with the prediction added to the log-joint,
``θ̂_λ = argmax L(θ) + λ·g(x*; θ)``, and read the variance as the change of the prediction per
unit λ: ``σ²(x*) ≈ [g(x*; θ̂_λ) − g(x*; θ̂)] / λ``. As λ → 0 this is g'ᵀP⁻¹g', the linearized
Laplace predictive variance with P the Hessian of the negative log-joint at θ̂ (the paper's
Theorem 4.1). No curvature matrix is formed or inverted. The objective is in
``methods/regvar/common.py`` (mean cross-entropy + (wd/2)‖θ‖², prior precision n·wd). Option
``lam`` is λ per example: the minimised mean loss gets the term −lam·g(x*), i.e. the paper's
log-joint λ is lam·n.

Two registered methods, named by what they refit (never switched silently):

- ``regvar``: every trainable weight, as in the paper. Before the run embeds or trains anything
  it prices its solves from a Hessian-vector product timed on random inputs of the
  network's shape (``estimate``), and the harness refuses, with one line, a run whose whole
  estimate exceeds ``budget_s``; the fit checks again on the real rows.
- ``regvar-ll``: only the final ``nn.Linear`` on the MAP's fixed features (the counterpart of
  ``laplace-ll``); cheap, so it evaluates more inputs by default.

One network: the fits start from θ₀, the shared MAP every other method reads (finished by the
harness to a certified minimum of P where the task's recipe affords it, ``bench.map_finish``),
and the predictive mean is θ₀'s logits, so mean and variance come from the same weights as the
``map`` row's. The fits minimise the *tilted* objective ``P(θ) − ∇P(θ₀)ᵀθ − lam·g(x*; θ)``: the
linear term makes θ₀ an exact stationary point (its λ = 0 fit is θ₀ itself) and leaves every
second derivative, hence the variance, unchanged; at a certified MAP it is below 1e-6. Where the
MAP is not certified (the run record's ``map_certificate`` says so and flags the row), ∇²P may
be indefinite there and the solver's negative-curvature count below says whether it was met.

Solvers (option ``solver``), both Hessian-free:

- ``newton-cg`` (default): the fits move O(λ) from θ₀, where the tilted objective is
  stationary, so one Newton step ``∇²P(θ₀)·d = lam·∇g(x*)`` solves them; conjugate gradients
  solve it with exact Hessian-vector products (``methods/regvar/newton.py``), all fits of a stack
  of ``query_batch`` queries at the shared θ₀; by default (``cg_block``) as one block CG over a
  Krylov space the stack shares (``methods/regvar/block.py``), which needs far fewer products per
  query than a CG per query. The step is linear in λ, so one solve u serves
  the ± pair, θ₀ ± lam·u; with central differences the fits' O(λ²) remainder cancels in the
  read-out to O(λ³). CG stops when the read-out's variance grew by ≤ ``cg_tol`` (relative) over
  its last ``cg_window`` iterations (the standard lower estimate of its remaining error; 1 for a
  block, whose iterations each cut the error about 30×, 5 preconditioned, else 10).
  Products (option ``products``): ``auto`` computes them in closed form where the network is a
  linear read-out or an MLP head (``methods/regvar/mlp.py``: one GEMM per layer for the whole
  stack), ``autograd`` through torch.func for any network; the values are the same. Option
  ``preconditioner``: ``auto`` preconditions CG with KFAC of the Gauss-Newton matrix where the
  products are the MLP ones (``methods/regvar/kfac.py``); CG still solves the exact system, to the
  same tolerance, so only the iteration count changes (the cg_tol rule then reads a 5-iteration
  window instead of 10). The run record names both.
- ``lbfgs``: full-batch L-BFGS per fit from θ₀ (gradients only), checked afterwards: each fit's
  float64 gradient relative to its λ term must be ≤ ``fit_rtol``.

Nothing fails silently: the summary (``solver_flags``) counts CG solves that stopped without
converging or at a direction of non-positive curvature (P is not positive definite there),
L-BFGS fits that did not converge, solves whose ± read-outs are not antisymmetric to 10 %
(λ outside the linear regime), and variances no posterior can have (negative, or above the
prior's ‖∇g‖²/(n·wd)); a non-empty ``solver_flags`` is also logged as a warning. A non-finite
variance is an error.

Which output g is regularised (option ``output``) — for a C-class model the "prediction" is a
vector of logits f, and we regularise one fixed linear read-out g = wᵀf per fit, reading the
change of *every* logit: fit k gives the row ``J P⁻¹ J_kᵀ`` of the logit covariance.

- ``top`` (default): g = f_ŷ, θ₀'s predicted class's logit; σ² = J_ŷ P⁻¹ J_ŷᵀ, applied to
  every logit in the probit.
- ``logits``: one solve per logit (C times the cost): the full C×C logit covariance
  ``J P⁻¹ Jᵀ`` (``covariance``); the probit uses each logit's own σ²_k.
- ``mean-abs``: g = mean_k |f_k| (the paper listing's output), linearised at θ₀'s signs.

Finite difference (option ``difference``): ``central`` [g(θ₊) − g(θ₋)]/(2λ) cancels the O(λ)
bias; ``forward`` [g(θ₊) − g(θ₀)]/λ. Read-outs are evaluated in float64 (the difference is
small); the solver's arithmetic is ``precision``.

The ``variance`` score is σ² of the regularised output (``logits``: mean over logits). The
predictive is the linearized-Laplace probit per logit, ``softmax(f_θ₀ / sqrt(1 + π/8 · s ·
σ²))`` at s = 1: the method tunes nothing. The harness tunes s once per run, by one rule for
every method with a logit Gaussian, on its validation inputs (the ``[s tuned]`` row).

Cost and the evaluated subset: each input costs one (``top``) or C solves. ``predict`` computes
the variance of every input it is given and refuses more than ``max_queries`` inputs per call
(or the harness's validation subset, ``bench.planning.validation_inputs``, if larger);
the harness evaluates a subset of each evaluation set for methods that set ``eval_limit``.
"""

from __future__ import annotations

import copy
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torch.func import grad, vmap
from torch.utils.data import TensorDataset

from bench.errors import BenchError
from bench.formulas import probit_probs
from bench.method_api import FLAGS_KEY, OWN_PREDICTIVE_KEY, PROBIT_AT_1, FitContext, Method, register_method
from bench.options import option
from bench.planning import VALIDATION_INPUTS_CAPPED, CostPlan, Estimate, duration, random_inputs, validation_inputs
from bench.types import Prediction

from .block import block_cg
from .common import (
    FlatModel,
    Optimizer,
    Precision,
    Regularizer,
    SolverSettings,
    StackedObjective,
    solve,
    train_tensors,
)
from .kfac import KroneckerPreconditioner
from .mlp import MLPProducts
from .newton import ENERGY_DELAY, CurvatureProducts, ProductEngine, batched_cg, curvature_products

# Planning figures for the budget estimate (`python -m bench perf regvar`; IMDB's head: 18 CG
# iterations per solve): CG iterations per solve, and L-BFGS iterations per fit.
PLANNING_CG_ITERATIONS = 40
PLANNING_CG_ITERATIONS_PRECONDITIONED = 8
PLANNING_CG_ITERATIONS_BLOCK = 5
PLANNING_LBFGS_ITERATIONS = 150
# The budget probe times products on a slice of the training rows that doubles from
# PROBE_MIN_ROWS until one product takes PROBE_SECONDS (then its time is the per-row cost, not
# call overhead) or the slice reaches PROBE_ROWS; a transformer's double backward is timed on
# 16 rows in seconds instead of on 1,024 for a quarter of an hour.
PROBE_MIN_ROWS = 16
PROBE_ROWS = 1024
PROBE_SECONDS = 1.0
PROBE_STACK = 8


class Output(str, enum.Enum):
    """Which read-out of the logits is regularised (see the module docstring)."""

    TOP = "top"
    """The MAP-predicted class's logit: one solve per input."""
    LOGITS = "logits"
    """Every logit in turn: C solves per input, the full logit covariance."""
    MEAN_ABS = "mean-abs"
    """The mean absolute logit (the paper's listing), linearised at the MAP's signs."""


class Difference(str, enum.Enum):
    """How the change of the prediction is measured."""

    CENTRAL = "central"
    """[g(θ₊λ) − g(θ₋λ)] / 2λ: cancels the O(λ) bias."""
    FORWARD = "forward"
    """[g(θ₊λ) − g(θ̂)] / λ against the MAP (the λ = 0 fit of the tilted objective)."""


class Solver(str, enum.Enum):
    """How each regularised fit is solved; neither forms a curvature matrix."""

    NEWTON_CG = "newton-cg"
    """Newton steps, each solved by conjugate gradients on exact Hessian-vector products."""
    LBFGS = "lbfgs"
    """Full-batch L-BFGS from the MAP (gradients only; slower on ill-conditioned fits)."""


class Preconditioner(str, enum.Enum):
    """What preconditions conjugate gradients; the system solved is the exact one either way."""

    AUTO = "auto"
    """kfac where the products are the closed-form MLP ones and CG is not blocked, else none
    (a block's shared Krylov space already captures what KFAC would, and measured faster alone)."""
    KFAC = "kfac"
    """Kronecker-factored Gauss-Newton blocks + wd·I, inverted through their eigenvectors."""
    NONE = "none"
    """Plain conjugate gradients."""


@dataclass
class RegVarOptions:
    lam: float = option(1e-5, "λ/n: the loss term is −lam·g(x*) (the paper's λ is lam·n_train)", min=0.0)
    output: Output = option(Output.TOP, "regularised read-out of the logits")
    difference: Difference = option(Difference.CENTRAL, "finite-difference scheme")
    solver: Solver = option(Solver.NEWTON_CG, "solver of the regularised fits (both Hessian-free)")
    precision: Precision = option(Precision.FLOAT32, "arithmetic of the solver (read-outs: float64)")
    cg_tol: float = option(1e-3, "CG stops when the variance grew ≤ cg_tol (relative) over cg_window iterations",
                           min=0.0)
    cg_max_iter: int = option(500, "most CG iterations per solve (then: counted as not converged)", min=1)
    cg_window: int = option(
        0, "iterations over which the variance's growth is read by the cg_tol rule (0: 1 for block CG, "
        "5 preconditioned, else 10)",
        min=0)
    cg_block: bool = option(True, "block CG: the stacked queries share one Krylov space (fewer iterations each)")
    products: ProductEngine = option(ProductEngine.AUTO, "how exact Hessian-vector products are computed")
    preconditioner: Preconditioner = option(Preconditioner.AUTO, "CG preconditioner (the solve stays exact)")
    lbfgs_steps: int = option(500, "solver=lbfgs: most iterations per fit", min=1)
    lbfgs_history: int = option(100, "solver=lbfgs: history length", min=1)
    fit_rtol: float = option(1e-2, "solver=lbfgs: converged when the fit's gradient ≤ fit_rtol × its λ term's", min=0.0)
    query_batch: int = option(128, "solves stacked into one pass over the training rows (and one CG block)", min=1)
    max_queries: int = option(100, "most inputs per predict call (see eval_limit)", min=1)
    budget_s: float = option(
        4 * 3600.0, "most seconds the whole run may take, estimated before it embeds or trains anything", min=0.0
    )


@dataclass
class RegVarLLOptions(RegVarOptions):
    max_queries: int = option(500, "most inputs per predict call (see eval_limit)", min=1)


def output_weights(logits: torch.Tensor, output: Output) -> torch.Tensor:
    """Read-out weights w (N, K, C) so that g_k = w_kᵀ f for the K fits per input."""
    n, c = logits.shape
    if output is Output.TOP:
        return torch.nn.functional.one_hot(logits.argmax(1), c).to(logits.dtype)[:, None, :]
    if output is Output.LOGITS:
        return torch.eye(c, dtype=logits.dtype).expand(n, c, c).clone()
    return (logits.sign() / c)[:, None, :]


@dataclass
class FitConfig:
    """The resolved solver settings of one RegVar run."""

    solver: Solver = Solver.NEWTON_CG
    difference: Difference = Difference.CENTRAL
    cg_tol: float = 1e-3
    cg_max_iter: int = 500
    cg_window: int = 0
    cg_block: bool = True
    lbfgs_steps: int = 500
    lbfgs_history: int = 100
    fit_rtol: float = 1e-2
    query_batch: int = 128

    @classmethod
    def from_options(cls, o: RegVarOptions) -> FitConfig:
        return cls(**{k: getattr(o, k) for k in cls.__dataclass_fields__})


BLOCK_WINDOW = 1  # block CG: each iteration cuts the variance's error ~30×, so one gain bounds the last
PRECONDITIONED_WINDOW = 5  # Kronecker-preconditioned CG: variance within 1e-3 in 4-8 iterations
CG_RTOL = 1e-6  # CG also stops once its residual is this small (then bᵀx is exact to round-off)
NONLINEAR_TOL = 0.1  # |g₊ + g₋ − 2g₀| / |g₊ − g₋| above this: λ is outside the linear regime


@dataclass
class FitStats:
    """Counts over every solve of a run (``summary()``): nothing fails silently."""

    solves: int = 0
    cg_iterations_sum: int = 0
    cg_iterations_max: int = 0
    cg_rel_residual_max: float = 0.0
    cg_variance_gain_max: float = 0.0
    cg_not_converged: int = 0
    negative_curvature: int = 0
    lbfgs_iterations_max: int = 0
    lbfgs_stalled: int = 0
    fit_rel_residual_max: float = 0.0
    fits_not_converged: int = 0
    nonlinearity_max: float = 0.0
    nonlinear_solves: int = 0
    negative_variances: int = 0
    above_prior_variance: int = 0

    FLAGS: ClassVar[tuple[str, ...]] = (
        "cg_not_converged",
        "negative_curvature",
        "lbfgs_stalled",
        "fits_not_converged",
        "nonlinear_solves",
        "negative_variances",
        "above_prior_variance",
    )

    def failures(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.FLAGS if getattr(self, k)}

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["cg_iterations_mean"] = self.cg_iterations_sum / self.solves if self.solves else 0.0
        return out


class Problem:
    """The MAP objective P on the training rows around θ₀ (``theta0``, default the network's
    weights), shared by every fit. ``fm``: the network in the solver's dtype; ``fm64``: float64,
    for read-outs and checks; ``grad_map``: ∇P(θ₀) in float64, the tilt that makes θ₀ stationary."""

    def __init__(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, weight_decay: float,
                 dtype: torch.dtype, device: torch.device, theta0: torch.Tensor | None = None,
                 engine: ProductEngine = ProductEngine.AUTO,
                 preconditioner: Preconditioner = Preconditioner.AUTO) -> None:
        self.fm = FlatModel(net, dtype, device)
        self.fm64 = FlatModel(net, torch.float64, device)
        if theta0 is not None:
            self.fm.theta0 = theta0.to(device, dtype).clone()
            self.fm64.theta0 = theta0.to(device, torch.float64).clone()
        self.x, self.y = train_tensors(TensorDataset(x, y), self.fm)
        self.wd, self.n = weight_decay, len(x)
        self.products = curvature_products(self.fm, self.x, self.y, weight_decay, engine=engine)
        self.products64 = curvature_products(self.fm64, self.fm64.inputs(self.x), self.y, weight_decay, engine=engine)
        self.grad_map = self.products64.gradient(self.fm64.theta0[None])[0]
        self.precondition = self._preconditioner(preconditioner)

        def readout(theta: torch.Tensor, xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
            return (wq * self.fm64(theta, xq[None])[0]).sum()

        self._readout_grad64 = vmap(grad(readout), in_dims=(0, 0, 0))

    @property
    def dim(self) -> int:
        return self.fm.dim

    def _preconditioner(self, kind: Preconditioner) -> KroneckerPreconditioner | None:
        mlp = isinstance(self.products, MLPProducts)
        if kind is Preconditioner.KFAC and not mlp:
            raise BenchError("regvar: preconditioner=kfac needs an MLP network with products=auto; "
                             "use preconditioner=auto or none")
        if kind is Preconditioner.NONE or not mlp:
            return None
        return KroneckerPreconditioner(self.products, self.fm.theta0)

    @property
    def default_window(self) -> int:
        """The cg_tol rule's window: a preconditioned solve converges in a few iterations."""
        return ENERGY_DELAY if self.precondition is None else PRECONDITIONED_WINDOW

    @property
    def preconditioner_name(self) -> str:
        return "none" if self.precondition is None else "kfac"

    def readout_grads(self, thetas: torch.Tensor, xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
        """∇_θ wᵀf(x_q; θ_q) for each stacked fit, float64 (B, D)."""
        return self._readout_grad64(thetas, self.fm64.inputs(xq), wq.to(torch.float64))

    def fit_gradient(
        self, thetas: torch.Tensor, coef: torch.Tensor, xq: torch.Tensor, wq: torch.Tensor
    ) -> torch.Tensor:
        """Gradient of each fit's tilted, regularised objective P(θ) − ∇P(θ₀)ᵀθ − coef·g(θ)."""
        data = self.products64.gradient(thetas)
        return data - self.grad_map - coef[:, None] * self.readout_grads(thetas, xq, wq)


@dataclass
class Response:
    """Δf/λ for every input (N), read-out (K), λ (L) and logit (C): row k of the logit
    covariance per input. ``at[k]``: the same after k solver iterations (CG or L-BFGS)."""

    final: torch.Tensor
    at: dict[int, torch.Tensor] = field(default_factory=dict)


def regvar_response(
    problem: Problem,
    queries: torch.Tensor,
    weights: torch.Tensor,
    lams: tuple[float, ...],
    config: FitConfig,
    stats: FitStats | None = None,
    checkpoints: tuple[int, ...] = (),
    progress: Callable[..., Any] | None = None,
) -> Response:
    """RegVar's Δf/λ (log-joint λ = lam·n for each ``lams`` entry, which are per example) for
    every query and read-out ``weights`` (N, K, C), solves stacked ``config.query_batch`` at a time."""
    if not lams or any(lam <= 0 for lam in lams):
        raise BenchError("RegVar needs λ > 0 (option lam)")
    stats = stats if stats is not None else FitStats()
    n_q, k_out, c = weights.shape
    qi = torch.arange(n_q).repeat_interleave(k_out)
    ki = torch.arange(k_out).repeat(n_q)
    final = torch.empty(n_q * k_out, len(lams), c, dtype=torch.float64)
    at = {k: torch.empty_like(final) for k in checkpoints}
    starts = range(0, len(qi), config.query_batch)
    if progress is not None:
        starts = progress(starts, desc=f"regvar solves ({n_q} inputs)", unit="stack")
    fit = _newton_stack if config.solver is Solver.NEWTON_CG else _lbfgs_stack
    for start in starts:
        sl = slice(start, min(start + config.query_batch, len(qi)))
        xq, wq = queries[qi[sl]], weights[qi[sl], ki[sl]].to(torch.float64)
        out, out_at = fit(problem, xq, wq, lams, config, stats, checkpoints)
        final[sl] = out
        for k in checkpoints:
            at[k][sl] = out_at[k]
        _count_values(stats, problem, xq, wq, out, lams)
    shape = (n_q, k_out, len(lams), c)
    return Response(final.view(shape), {k: v.view(shape) for k, v in at.items()})


def _fits(lams: tuple[float, ...], config: FitConfig, b: int, device: torch.device
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients (B·L·S,) of the fits of a stack of B solves, ordered (solve, λ, sign), and
    the solve each fit belongs to."""
    signs = (1.0, -1.0) if config.difference is Difference.CENTRAL else (1.0,)
    lam_t = torch.tensor(lams, dtype=torch.float64)
    coef = (lam_t[:, None] * torch.tensor(signs, dtype=torch.float64)).reshape(-1)  # (L·S,)
    return coef.repeat(b).to(device), torch.arange(b).repeat_interleave(len(coef))


def _read(problem: Problem, thetas: torch.Tensor, xq: torch.Tensor, lams: tuple[float, ...],
          config: FitConfig) -> torch.Tensor:
    """Δf/λ_joint (B, L, C) from the fits' parameters (B·L·S, D), float64."""
    b, n_l = len(xq), len(lams)
    f = problem.fm64.stacked_logits(thetas, xq.repeat_interleave(len(thetas) // b, 0)).cpu()
    lam_joint = torch.tensor(lams, dtype=torch.float64)[None, :, None] * problem.n
    if config.difference is Difference.CENTRAL:
        f = f.view(b, n_l, 2, -1)
        return (f[:, :, 0] - f[:, :, 1]) / (2.0 * lam_joint)
    return (f.view(b, n_l, -1) - _reference_logits(problem, xq)[:, None]) / lam_joint


def _reference_logits(problem: Problem, xq: torch.Tensor) -> torch.Tensor:
    return problem.fm64.stacked_logits(problem.fm64.theta0.expand(len(xq), -1), xq).cpu()


def _newton_stack(problem: Problem, xq: torch.Tensor, wq: torch.Tensor, lams: tuple[float, ...],
                  config: FitConfig, stats: FitStats, checkpoints: tuple[int, ...]
                  ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """One Newton step per fit from θ₀, where the tilted objective is stationary:
    ∇²P(θ₀)·d = coef·∇g(θ₀). The step is linear in coef (and CG exactly homogeneous in its
    right-hand side), so one CG solve u per query and read-out serves all its fits, θ₀ ± coef·u.
    With central differences the fits' O(λ²) remainder cancels in the read-out to O(λ³)."""
    b = len(xq)
    fm, theta64 = problem.fm, problem.fm64.theta0
    jg = problem.readout_grads(theta64.expand(b, -1), xq, wq)
    coef, owner = _fits(lams, config, b, theta64.device)
    at: dict[int, torch.Tensor] = {}

    def record(k: int, u: torch.Tensor) -> None:
        at[k] = _read(problem, theta64 + coef[:, None] * u.double()[owner], xq, lams, config)

    theta = fm.theta0
    solver = block_cg if config.cg_block else batched_cg
    window = config.cg_window or (BLOCK_WINDOW if config.cg_block else problem.default_window)
    cg = solver(lambda p, _rows: problem.products.at(theta, p), jg.to(fm.dtype), CG_RTOL,
                config.cg_max_iter, config.cg_tol, checkpoints, record, problem.precondition, window)
    stats.solves += b
    stats.cg_iterations_sum += int(cg.iterations.sum())
    stats.cg_iterations_max = max(stats.cg_iterations_max, int(cg.iterations.max()))
    stats.cg_rel_residual_max = max(stats.cg_rel_residual_max, float(cg.rel_residual.max()))
    stats.cg_variance_gain_max = max(stats.cg_variance_gain_max, float(cg.energy_gain.max()))
    stats.negative_curvature += int(cg.negative_curvature.sum())
    stats.cg_not_converged += int((~cg.converged).sum())  # negative curvature included: never converged
    thetas = theta64 + coef[:, None] * cg.x.double()[owner]
    out = _read(problem, thetas, xq, lams, config)
    if config.difference is Difference.CENTRAL:  # how far from linear the response is
        g = (problem.fm64.stacked_logits(thetas, xq[owner]).cpu() * wq[owner].cpu()).sum(1).view(b, -1, 2)
        g0 = (_reference_logits(problem, xq) * wq.cpu()).sum(1)[:, None]
        ratio = ((g[..., 0] + g[..., 1] - 2 * g0).abs() / (g[..., 0] - g[..., 1]).abs().clamp_min(1e-300)).amax(1)
        stats.nonlinearity_max = max(stats.nonlinearity_max, float(ratio.max()))
        stats.nonlinear_solves += int((ratio > NONLINEAR_TOL).sum())
    return out, at


def _lbfgs_stack(problem: Problem, xq: torch.Tensor, wq: torch.Tensor, lams: tuple[float, ...],
                 config: FitConfig, stats: FitStats, checkpoints: tuple[int, ...]
                 ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Every fit by full-batch L-BFGS from θ₀ on the tilted objective, then checked: its float64
    gradient relative to its λ term must be ≤ ``fit_rtol``."""
    b = len(xq)
    fm = problem.fm
    coef, owner = _fits(lams, config, b, problem.fm64.device)
    xq_f, wq_f = xq[owner], wq[owner]
    objective = StackedObjective(
        fm, problem.x, problem.y, problem.wd,
        Regularizer(coef=(coef * problem.n).to(fm.dtype), queries=fm.inputs(xq_f),
                    weights=wq_f.to(fm.device, fm.dtype)),
        tilt=problem.grad_map.to(fm.dtype),
    )
    at: dict[int, torch.Tensor] = {}

    def record(k: int, x: torch.Tensor) -> None:
        if k in checkpoints:
            at[k] = _read(problem, x.double(), xq, lams, config)

    settings = SolverSettings(Optimizer.LBFGS, config.lbfgs_steps, 0.0, 128, config.lbfgs_history,
                              rtol=0.1 * config.fit_rtol)
    thetas = solve(objective, fm.theta0.expand(len(coef), -1).clone(), settings, checkpoints, record).double()
    stats.solves += b
    stats.lbfgs_iterations_max = max(stats.lbfgs_iterations_max, objective.stats.get("iterations", 0))
    stats.lbfgs_stalled += objective.stats["stalled"]
    scale = problem.readout_grads(problem.fm64.theta0.expand(b, -1), xq, wq).norm(dim=1)[owner]
    g = problem.fit_gradient(thetas, coef, xq_f, wq_f)
    rel = g.norm(dim=1) / (coef.abs() * scale).clamp_min(torch.finfo(torch.float64).tiny)
    if not bool(torch.isfinite(rel).all()):
        raise BenchError("regvar: an L-BFGS fit diverged (non-finite gradient); use solver=newton-cg or a smaller lam")
    stats.fit_rel_residual_max = max(stats.fit_rel_residual_max, float(rel.max()))
    stats.fits_not_converged += int((rel > config.fit_rtol).sum())
    return _read(problem, thetas, xq, lams, config), at


def _count_values(stats: FitStats, problem: Problem, xq: torch.Tensor, wq: torch.Tensor, out: torch.Tensor,
                  lams: tuple[float, ...]) -> None:
    """Flag variances that no posterior can have: negative, or above the prior's (no-data)
    variance ‖∇g‖²/(n·wd), which needs negative data curvature; non-finite ones are an error."""
    if not bool(torch.isfinite(out).all()):
        raise BenchError("regvar: a non-finite variance (a fit diverged); see the summary's solver counts")
    var = (out * wq.cpu()[:, None, :]).sum(-1)  # (B, L)
    jg = problem.readout_grads(problem.fm64.theta0.expand(len(xq), -1), xq, wq)
    prior = (jg * jg).sum(1).cpu() / (problem.n * problem.wd)
    stats.negative_variances += int((var < 0).sum())
    stats.above_prior_variance += int((var > prior[:, None] * (1 + 1e-6)).sum())


@register_method("regvar")
class RegVar(Method):
    """Per-input RegVar over every weight: one Hessian-free regularised refit (pair) per input."""

    citation = (
        'J. McInerney and N. Kallus, "Variation Due to Regularization Tractably Recovers Bayesian '
        'Deep Learning", AISTATS 2025 (arXiv 2403.10671)'
    )

    Options: ClassVar[type] = RegVarOptions
    last_layer: ClassVar[bool] = False

    def __init__(self, options: RegVarOptions | None = None) -> None:
        super().__init__(options)
        self.problem: Problem | None = None
        self.featurize: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.info: dict[str, Any] = {}
        self.stats = FitStats()
        self.scale = 1.0
        self.progress: Callable[..., Any] | None = None
        self.log: Callable[[str], None] = lambda _m: None

    @property
    def eval_limit(self) -> int:
        """Most inputs per evaluation set; the harness evaluates a subset beyond it."""
        return self.options.max_queries

    def fit(self, ctx: FitContext) -> None:
        if ctx.map_model is None:
            raise BenchError(f"{self.name} needs the MAP network (uses_map); the harness gave none")
        o = self.options
        self.progress, self.log = ctx.progress, ctx.log
        net = ctx.map_model
        self.featurize = None
        if self.last_layer:
            net, self.featurize = split_last_linear(ctx.map_model, ctx.device)
        dtype = torch.float64 if o.precision is Precision.FLOAT64 else torch.float32
        x_tr, y_tr = ctx.data.train.tensors[0], ctx.data.train.tensors[1]
        n_train = len(x_tr)
        dim = sum(p.numel() for p in net.parameters() if p.requires_grad)
        k_out = ctx.data.num_classes if o.output is Output.LOGITS else 1
        planned = self._planned_inputs(ctx)
        wd = ctx.recipe.weight_decay
        self.info = {
            "weights": "last-layer" if self.last_layer else "all",
            "n_params": dim,
            "n_train": n_train,
            "objective": "mean CE + (wd/2)|θ|² − ∇P(θ₀)ᵀθ (the tilt makes θ₀ stationary), eval mode",
            "prior_precision": n_train * wd,
            "solver": o.solver.value,
            "curvature_formed": False,
            "dtype": str(dtype).removeprefix("torch."),
            "lam": o.lam,
            "lam_joint": o.lam * n_train,
            "output": o.output.value,
            "difference": o.difference.value,
            "mean_and_variance_from": "map",  # one network: θ₀, the shared MAP
            "max_queries": o.max_queries,
            "planned_inputs": planned,
        }
        t0 = time.perf_counter()
        inputs = self.network_inputs(x_tr)
        fm = FlatModel(net, dtype, ctx.device)
        self._check_budget(fm, inputs, y_tr, wd, planned * k_out, ctx)
        self.problem = Problem(net, inputs, y_tr, wd, dtype, ctx.device, None, o.products, self._preconditioner())
        self.info["products"] = type(self.problem.products).__name__
        self.info["preconditioner"] = self.problem.preconditioner_name
        self.info["theta0_grad_norm"] = float(self.problem.grad_map.norm())
        self.info["theta0_grad_inf"] = float(self.problem.grad_map.abs().max())
        self.info["setup_s"] = time.perf_counter() - t0
        ctx.log(
            f"{self.name}: {dim} params ({self.info['weights']}), {o.solver.value}/{self.info['dtype']}, "
            f"θ₀ = the MAP, λ/n={o.lam}, output={o.output.value}, "
            f"≈{duration(self.info['estimated_s'])} estimated"
        )
        self.scale = 1.0  # the harness tunes s (its [s tuned] row), never the method
        self.info["scale"] = self.scale
        self.info[OWN_PREDICTIVE_KEY] = PROBIT_AT_1

    def _planned_inputs(self, ctx: FitContext) -> int:
        """Inputs the run will fit: the validation subset and each capped evaluation set."""
        o, d = self.options, ctx.data
        sizes = [len(d.test), *(len(v) for v in d.ood.values()), *(len(v) for v in d.shift.values())]
        return validation_inputs(o.max_queries, len(d.val)) + sum(min(s, o.max_queries) for s in sizes)

    def _check_budget(self, fm: FlatModel, x: torch.Tensor, y: torch.Tensor, wd: float, solves: int,
                      ctx: FitContext) -> None:
        """Time one stacked curvature product on a slice of the rows (scaled to all of them);
        refuse a run whose fits' estimate exceeds ``budget_s`` before any fit starts."""
        o = self.options
        per_product, rows = product_seconds(fm, x, y, wd, max(1, min(o.query_batch, solves, PROBE_STACK)), o.products)
        per_solve, what = self._per_solve(per_product)
        estimate = solves * per_solve
        self.info.update({"probe_s_per_product": per_product, "probe_rows": rows,
                          "estimated_s": estimate, "budget_s": o.budget_s})
        if estimate > o.budget_s:
            alt = "" if self.last_layer else ", or regvar-ll (last layer)"
            raise BenchError(
                f"{self.name}: {solves} solves over {fm.dim:,} parameters and {len(x):,} rows would take "
                f"≈{duration(estimate)} on {ctx.device} ({what}), over budget_s={o.budget_s:g}: use fewer "
                f"inputs (--set max_queries=N), a GPU (--device cuda){alt}"
            )

    def _per_solve(self, per_product: float) -> tuple[float, str]:
        """Planned seconds of one solve and how they were planned."""
        o = self.options
        if o.solver is Solver.NEWTON_CG:
            its = (PLANNING_CG_ITERATIONS_BLOCK if o.cg_block else
                   PLANNING_CG_ITERATIONS_PRECONDITIONED if self._preconditioned() else PLANNING_CG_ITERATIONS)
            return per_product * (its + 2), f"≈{its} CG iterations per solve, {per_product:.3g} s per product"
        fits = 2 if o.difference is Difference.CENTRAL else 1
        return (per_product * fits * (PLANNING_LBFGS_ITERATIONS + 4),
                f"≈{PLANNING_LBFGS_ITERATIONS} L-BFGS iterations × {fits} fits, {per_product:.3g} s per gradient")

    def _preconditioner(self) -> Preconditioner:
        """``auto`` resolved as far as the options go (the network decides the rest)."""
        o = self.options
        if o.preconditioner is Preconditioner.AUTO and o.cg_block:
            return Preconditioner.NONE
        return o.preconditioner

    def _preconditioned(self) -> bool:
        return (not self.last_layer and self.options.products is ProductEngine.AUTO
                and self._preconditioner() is not Preconditioner.NONE)

    def estimate(self, plan: CostPlan) -> tuple[float, float]:
        """(fit, prediction) seconds from the sizes and a product timed on random inputs of the
        network's shape: the scale-tuning solves, then one solve per evaluated input
        (the capped evaluation sets and the harness's validation subset)."""
        o, sizes = self.options, plan.load.sizes
        net, example = plan.make_model(), plan.load.example
        if self.last_layer:
            net = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]
            example = torch.zeros(1, net.in_features)
        dtype = torch.float64 if o.precision is Precision.FLOAT64 else torch.float32
        fm = FlatModel(net, dtype, plan.device)
        n = sizes["train"]
        rows = min(n, PROBE_ROWS)
        x = random_inputs(example, rows)
        y = torch.randint(0, plan.load.num_classes, (rows,))
        k_out = plan.load.num_classes if o.output is Output.LOGITS else 1
        per_product, _ = product_seconds(fm, x, y, plan.recipe.weight_decay, min(o.query_batch, PROBE_STACK),
                                         o.products, total_rows=n)
        per_solve, _ = self._per_solve(per_product)
        evaluated = [min(v, o.max_queries) for k, v in sizes.items() if k not in ("train", "val")]
        val = validation_inputs(o.max_queries, sizes.get("val", 0))  # the harness's scale-tuning inputs
        return 0.0, (sum(evaluated) + val) * k_out * per_solve

    def check_estimate(self, estimate: Estimate) -> None:
        total = estimate.total_s
        if total is not None and total > self.options.budget_s:
            raise BenchError(
                f"{self.name}: this run is estimated at ≈{duration(total)} (the estimate line above), over "
                f"budget_s={self.options.budget_s:g}: raise budget_s, use fewer inputs (--set max_queries=N) "
                "or a GPU (--device cuda)"
            )

    def reference_network(self) -> nn.Module:
        """A copy of the network at θ₀ (the MAP, in the fits' precision): what a study comparing
        solver settings at the same point starts another fit from."""
        if self.problem is None:
            raise BenchError(f"{self.name}: reference_network called before fit")
        net = copy.deepcopy(self.problem.fm.module).float()
        torch.nn.utils.vector_to_parameters(self.problem.fm64.theta0.float(),
                                            [p for p in net.parameters() if p.requires_grad])
        return net

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MAP logits (N, C) and the regularised outputs' variances (N, K), float64; with
        ``output=logits`` the full logit covariance is ``self.covariance(x)``."""
        logits, response, w = self._response(x)
        return logits, (response * w).sum(-1)

    def covariance(self, x: torch.Tensor) -> torch.Tensor:
        """The logit covariance J P⁻¹ Jᵀ (N, C, C), symmetrised; needs ``output=logits``."""
        if self.options.output is not Output.LOGITS:
            raise BenchError(f"{self.name}: the full logit covariance needs output=logits")
        _, response, _ = self._response(x)
        return 0.5 * (response + response.transpose(1, 2))

    def _response(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        assert self.problem is not None
        o = self.options
        inputs = self.network_inputs(x)
        logits = self.problem.fm64.logits(self.problem.fm64.theta0, inputs).cpu()
        w = output_weights(logits, o.output)
        response = regvar_response(
            self.problem, inputs, w, (o.lam,), FitConfig.from_options(o), self.stats, progress=self.progress
        ).final[:, :, 0]
        if not bool(torch.isfinite(response).all()):
            raise BenchError(f"{self.name}: non-finite variance (a fit diverged); see the summary's solver counts")
        var = (response * w).sum(-1)
        self.stats.negative_variances += int((var < 0).sum())
        failures = self.stats.failures()
        if failures:
            self.log(f"{self.name}: WARNING solver flags so far: {failures} (see the result's method_summary)")
        return logits, response, w

    def network_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """What the fitted network takes: the inputs, or their last-layer features."""
        return x if self.featurize is None else self.featurize(x)

    def _probit_var(self, var: torch.Tensor) -> torch.Tensor:
        return var if self.options.output is Output.LOGITS else var[:, 0]

    def predict(self, x: torch.Tensor) -> Prediction:
        if self.problem is None:
            raise BenchError(f"{self.name}: predict called before fit; call fit(ctx) first")
        if len(x) > max(self.options.max_queries, VALIDATION_INPUTS_CAPPED):
            raise BenchError(
                f"{self.name} refits the model for every input: {len(x)} inputs exceed "
                f"max_queries={self.options.max_queries}; raise it (--set max_queries=N) or evaluate a subset"
            )
        logits, var = self.moments(x)
        probit_var = self._probit_var(var)
        probs = probit_probs(logits, probit_var, self.scale)
        # The Gaussian it estimates, for the harness: per-logit variances (output=logits), or the
        # one read-out's variance on every logit, exactly as its own probit applies it.
        per_logit = probit_var if probit_var.ndim == 2 else probit_var[:, None].expand_as(logits)
        return Prediction(probs.float(), {"variance": var.mean(1).float()}, logits.double(), per_logit.double())

    def summary(self) -> dict[str, Any]:
        failures = self.stats.failures()
        solver = [f"solver: {k.replace('_', ' ')} in {v} of {self.stats.solves} solves (see method_summary)"
                  for k, v in failures.items()]
        flags = [*self.info.get(FLAGS_KEY, []), *solver]
        return {**self.info, **self.stats.as_dict(), "solver_flags": failures} | ({FLAGS_KEY: flags} if flags else {})


@register_method("regvar-ll")
class RegVarLastLayer(RegVar):
    """Per-input RegVar on the last linear layer only (features fixed): counterpart of laplace-ll."""

    Options: ClassVar[type] = RegVarLLOptions
    last_layer: ClassVar[bool] = True


def product_seconds(fm: FlatModel, x: torch.Tensor, y: torch.Tensor, wd: float, stack: int,
                    engine: ProductEngine, total_rows: int | None = None) -> tuple[float, int]:
    """Seconds of one curvature product per vector over ``total_rows`` (default: all of ``x``),
    timed on a slice of ``x`` that doubles from ``PROBE_MIN_ROWS`` until one product takes
    ``PROBE_SECONDS`` (then it measures work, not call overhead); returns it and the slice's rows."""
    n = len(x) if total_rows is None else total_rows
    v = torch.randn(stack, fm.dim, dtype=fm.dtype, device=fm.device)
    rows = min(len(x), PROBE_MIN_ROWS)

    def probe_on(r: int) -> CurvatureProducts:
        return curvature_products(fm, *train_tensors(TensorDataset(x[:r], y[:r]), fm), wd, engine=engine)

    probe = probe_on(rows)
    probe.at(fm.theta0, v[:1])  # warm-up (first-call overheads)
    while (one := _seconds(lambda p=probe: p.at(fm.theta0, v[:1]))) < PROBE_SECONDS and rows < min(len(x), PROBE_ROWS):
        rows = min(2 * rows, len(x), PROBE_ROWS)
        probe = probe_on(rows)
    # The fits stack `stack` products into one pass; time that too where it is quick.
    stacked = one if one * stack > 4 * PROBE_SECONDS else _seconds(lambda: probe.at(fm.theta0, v)) / stack
    return stacked * n / rows, rows


def _seconds(work: Callable[[], object]) -> float:
    """Wall-clock seconds of one call, waiting for CUDA to finish when it returns a CUDA tensor."""
    t0 = time.perf_counter()
    out = work()
    if isinstance(out, torch.Tensor) and out.is_cuda:
        torch.cuda.synchronize(out.device)
    return time.perf_counter() - t0


def split_last_linear(
    model: nn.Module, device: torch.device, batch_size: int = 1024
) -> tuple[nn.Linear, Callable[[torch.Tensor], torch.Tensor]]:
    """The model's last ``nn.Linear`` (a copy) and a function x → its input features, checked
    to reproduce the model's output (the head must be the last operation)."""
    body = copy.deepcopy(model).to(device).eval()
    linears = [m for m in body.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise BenchError("regvar-ll needs an nn.Linear output layer; use regvar (all weights)")
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
                "regvar-ll: the model's output is not its last nn.Linear applied to that "
                "layer's input; use regvar (all weights)"
            )
        return feats

    return run
