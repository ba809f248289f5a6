"""RegVar's regularised fits and their read-out: the MAP objective around θ₀ (``Problem``), the
stacked Newton-CG or L-BFGS fits of a batch of queries, and the variances read from them
(``regvar_response``). The method classes (``methods/regvar/per_input.py``) and the fidelity
study call it; ``per_input``'s module docstring says what is computed and why."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from torch.func import grad, vmap
from torch.utils.data import TensorDataset

from bench.errors import BenchError

from .block import block_cg
from .common import (
    FlatModel,
    Optimizer,
    Regularizer,
    SolverSettings,
    StackedObjective,
    solve,
    train_tensors,
)
from .kfac import KroneckerPreconditioner
from .mlp import MLPProducts
from .newton import ENERGY_DELAY, ProductEngine, batched_cg, curvature_products

if TYPE_CHECKING:
    from .per_input import RegVarOptions


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
