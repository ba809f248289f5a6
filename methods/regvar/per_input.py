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
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import TensorDataset

from bench.errors import BenchError
from bench.formulas import probit_probs
from bench.method_api import FLAGS_KEY, OWN_PREDICTIVE_KEY, PROBIT_AT_1, FitContext, Method, register_method
from bench.options import option
from bench.planning import VALIDATION_INPUTS_CAPPED, CostPlan, Estimate, duration, random_inputs, validation_inputs
from bench.types import Prediction

from .common import (
    FlatModel,
    Precision,
    train_tensors,
)
from .newton import CurvatureProducts, ProductEngine, curvature_products
from .response import (
    Difference,
    FitConfig,
    FitStats,
    Output,
    Preconditioner,
    Problem,
    Solver,
    output_weights,
    regvar_response,
)

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
