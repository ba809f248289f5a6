"""Fidelity of RegVar against exact linearized Laplace: ``python -m bench fidelity --task T``.

Two checks, ``--model small`` (default) and ``--model full``.

``--model full``: the leaderboard's own MAP network — the cached checkpoint of the task's model
that ``bench run`` trains (``bench.training.map_checkpoint``; absent: run the ``map`` method
first) — on the task's full training set (or a stated seeded ``--train-size`` subset). Both
registered methods run with their default options (variance-scale tuning off: it does not
change the variance) on ``--n`` seeded test inputs, and are compared with the exact
linearised-Laplace variance g'ᵀ(n·∇²P)⁻¹g' at the network each method reads its variance at (its
θ₀), computed by float64 conjugate gradients on exact Hessian-vector products (true Hessian,
and the GGN) to a stated residual: ``regvar`` (all weights) against the all-weight targets,
``regvar-ll`` against the exact last-layer variance and, for scale, the all-weight target.
P is mean CE + (wd/2)‖θ‖² with the task recipe's wd (prior precision n·wd); the JSON says at
which θ₀, and probes ∇²P at the raw AdamW checkpoint for non-positive curvature.

``--model small``: a version of the task's model small enough for exact curvature
(``Task.make_small_model``, ≤ 10k parameters) trained to convergence (full batch, float64,
L-BFGS, on a seeded training subset), where the Hessian is formed densely:
  - the true Hessian: Σ⁻¹ = ∇²[n·P] (chunked Hessian-vector products, ``torch.func``), which is
    the limit of RegVar's finite difference (the paper's Theorem 4.1), and
  - the GGN: laplace-torch ``Laplace(..., "all", "full")`` with prior precision n·wd.
The objective is ``P = mean CE + (wd/2)‖θ‖²`` with wd = prior_precision / n (see
``methods/regvar/common.py``); the default prior precision 1 (not the task recipe's weight decay,
which on a 256-point subset is a nearly flat prior under which L-BFGS does not reach a
stationary point in thousands of iterations) keeps the exact problem well posed. Both RegVar
methods then run with their default settings on the same problem (per-input RegVar from the
converged network, ``reference=map``); we report the median relative error and Spearman's ρ of
their variances against both targets, and the per-input estimator's error as a function of λ
and of CG iterations. Amortized RegVar tunes λ and its scale on validation NLL as usual; we
report its raw variance and the tuned scale, and compare it with its own linear-response limit
|J_k(x) Σ E_x'[Σ_j sign f_j(x') J_j(x')ᵀ]|/C too, both at the λ it chose and at λ/n = 1e-5.
λ values are per example (λ/n), as in the methods' options.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.func import grad, jvp, vmap
from torch.utils.data import DataLoader, TensorDataset

from bench.errors import BenchError
from bench.method_api import FitContext
from bench.profiling import measure
from bench.seeding import derive_seed, seed_everything
from bench.studies import context_around
from bench.tasks.base import TaskData, TrainRecipe

from .amortized import AmortizedOptions, RegVarAmortized
from .common import FlatModel
from .per_input import RegVar, RegVarOptions
from .response import FitConfig, output_weights, regvar_response

DTYPE = torch.float64
AMORTIZED_CHECK_LAM = 1e-5


class TinyCNN(nn.Sequential):
    """Fallback small model (≈ 1.3k params) for tasks without ``make_small_model``; tanh keeps
    the objective smooth for the finite differences."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, 4, 5, stride=2, padding=2),
            nn.Tanh(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(64, 16),
            nn.Tanh(),
            nn.Linear(16, num_classes),
        )


def make_small(task: Any, num_classes: int, example: torch.Tensor) -> nn.Module:
    try:
        return task.make_small_model(num_classes)
    except NotImplementedError:
        if example.ndim != 3:
            raise BenchError(
                f"task {task.name} has no small model and its inputs are not "
                "images; add Task.make_small_model for fidelity checks"
            ) from None
        return TinyCNN(example.shape[0], num_classes)


def train_to_convergence(
    fm: FlatModel, x: torch.Tensor, y: torch.Tensor, wd: float, max_iter: int = 3000
) -> tuple[torch.Tensor, float]:
    """Full-batch float64 L-BFGS (strong Wolfe) on P; returns θ̂ and ‖∇P(θ̂)‖∞."""
    theta = fm.theta0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [theta],
        lr=1.0,
        max_iter=max_iter,
        history_size=50,
        tolerance_grad=1e-11,
        tolerance_change=0.0,
        line_search_fn="strong_wolfe",
    )

    def objective(t: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(fm(t, x), y) + 0.5 * wd * (t * t).sum()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective(theta)
        loss.backward()
        return loss

    opt.step(closure)
    theta = theta.detach()
    g = grad(objective)(theta)
    return theta, float(g.abs().max())


def exact_hessian(
    fm: FlatModel,
    theta: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    wd: float,
    chunk: int = 128,
) -> torch.Tensor:
    """∇²[n·P](θ): the rows are Hessian-vector products (forward-over-reverse, as
    ``torch.func.hessian`` computes them) vmapped over chunks of the identity, because the
    unchunked ``hessian`` would hold D tangents × n activations at once."""
    n = len(x)

    def objective(t: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(fm(t, x), y, reduction="sum") + 0.5 * n * wd * (t * t).sum()

    g = grad(objective)
    eye = torch.eye(fm.dim, dtype=theta.dtype)
    rows = [vmap(lambda v: jvp(g, (theta,), (v,))[1])(eye[i : i + chunk]) for i in range(0, fm.dim, chunk)]
    h = torch.cat(rows)
    return 0.5 * (h + h.T)


def ggn_precision(model: nn.Module, x: torch.Tensor, y: torch.Tensor, prior_precision: float) -> torch.Tensor:
    """Posterior precision of laplace-torch's full GGN Laplace (sum-scale CE + prior)."""
    from laplace import Laplace

    la = Laplace(
        model,
        "classification",
        subset_of_weights="all",
        hessian_structure="full",
        prior_precision=prior_precision,
    )
    la.fit(DataLoader(TensorDataset(x, y), batch_size=64))
    return la.posterior_precision.detach().to(DTYPE)


def output_jacobians(fm: FlatModel, theta: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """J_g = wᵀ ∂f/∂θ for every input and read-out: (N, K, D)."""
    jac = vmap(torch.func.jacrev(lambda t, xi: fm(t, xi[None])[0]), in_dims=(None, 0))(theta, x)
    return torch.einsum("nkc,ncd->nkd", w, jac)


def quad(jg: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """jᵀ precision⁻¹ j for each row of jg (N, K, D) via one Cholesky solve."""
    chol = torch.linalg.cholesky(precision)
    flat = jg.reshape(-1, jg.shape[-1]).T
    z = torch.cholesky_solve(flat, chol)
    return (flat * z).sum(0).reshape(jg.shape[:-1])


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    def ranks(v: torch.Tensor) -> torch.Tensor:
        return v.argsort().argsort().double()

    ra, rb = ranks(a.flatten()), ranks(b.flatten())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-300))


def compare(est: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    rel = (est.double().flatten() - target.flatten()).abs() / target.flatten().abs()
    return {
        "median_rel_err": float(rel.median()),
        "max_rel_err": float(rel.max()),
        "spearman": spearman(est.double(), target),
    }


def timed(log: Callable[[str], None], what: str, fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()`` and its seconds (``bench.profiling.measure``; the checks run on CPU), logged."""
    with measure(torch.device("cpu")) as m:
        out = fn()
    log(f"fidelity: {what} in {m.seconds:.1f} s")
    return out, m.seconds


def top_variance(method: RegVar, x: torch.Tensor) -> torch.Tensor:
    """The method's variance of its regularised read-out (output=top: the top logit's)."""
    return method.moments(x)[1][:, 0]


@dataclass
class SmallProblem:
    """The small model trained to convergence on a subset of the task, with its query inputs."""

    task: Any
    data: TaskData
    x_tr: torch.Tensor
    y_tr: torch.Tensor
    x_va: torch.Tensor
    y_va: torch.Tensor
    x_q: torch.Tensor
    model: nn.Module
    fm: FlatModel
    theta: torch.Tensor
    grad_inf: float
    wd: float
    seconds: float

    @property
    def n(self) -> int:
        return len(self.x_tr)


def _small_problem(task_name: str, smoke: bool, n_queries: int, seed: int, train_size: int, val_size: int,
                   prior_precision: float, log: Callable[[str], None]) -> SmallProblem:
    """The task's subsets (seeded) and the small model, trained by float64 L-BFGS to its MAP."""
    from bench.tasks import TASKS

    seed_everything(seed)
    task = TASKS.get(task_name)(smoke=smoke)
    data = task.load()
    gen = torch.Generator().manual_seed(derive_seed(seed, "fidelity", "subsets"))
    pick_tr = torch.randperm(len(data.train), generator=gen)[:train_size]
    pick_va = torch.randperm(len(data.val), generator=gen)[:val_size]
    pick_te = torch.randperm(len(data.test), generator=gen)[:n_queries]
    x_tr, y_tr = data.train.tensors[0][pick_tr].to(DTYPE), data.train.tensors[1][pick_tr]
    x_va, y_va = data.val.tensors[0][pick_va].to(DTYPE), data.val.tensors[1][pick_va]
    x_q = data.test.tensors[0][pick_te].to(DTYPE)
    n = len(x_tr)
    wd = prior_precision / n
    torch.manual_seed(derive_seed(seed, "fidelity", "init"))
    model = make_small(task, data.num_classes, x_tr[0]).to(DTYPE)
    fm = FlatModel(model, DTYPE, torch.device("cpu"))
    if fm.dim > 10_000:
        raise BenchError(f"the small model has {fm.dim} parameters; exact curvature needs ≤ 10000")
    log(
        f"fidelity: {type(model).__name__} with {fm.dim} params, n={n}, prior precision "
        f"{prior_precision} (wd={wd:.3g}), {len(x_q)} queries"
    )
    (theta, grad_inf), t_train = timed(log, "MAP (L-BFGS, float64)", lambda: train_to_convergence(fm, x_tr, y_tr, wd))
    with torch.no_grad():
        for p, v in zip([p for p in model.parameters()], fm.unflatten(theta).values(), strict=True):
            p.copy_(v)
    fm = FlatModel(model, DTYPE, torch.device("cpu"))
    return SmallProblem(task, data, x_tr, y_tr, x_va, y_va, x_q, model, fm, theta, grad_inf, wd, t_train)


def _small_context(sp: SmallProblem, seed: int, log: Callable[[str], None]) -> FitContext:
    """A fit context on the problem's subsets whose MAP is its converged small model."""
    return context_around(
        sp.model,
        TaskData(
            train=TensorDataset(sp.x_tr, sp.y_tr),
            val=TensorDataset(sp.x_va, sp.y_va),
            test=TensorDataset(sp.x_q, torch.zeros(len(sp.x_q), dtype=torch.long)),
            num_classes=sp.data.num_classes,
        ),
        TrainRecipe(epochs=1, batch_size=sp.n, lr=1.0, weight_decay=sp.wd, optimizer="lbfgs"),
        seed=seed,
        log=log,
        make_model=lambda: make_small(sp.task, sp.data.num_classes, sp.x_tr[0]).to(DTYPE),
    )


def _amortized(sp: SmallProblem, ctx: FitContext, hess: torch.Tensor, jg: torch.Tensor, smoke: bool,
               target: torch.Tensor, log: Callable[[str], None]) -> tuple[dict[str, Any], torch.Tensor, float]:
    """Amortized RegVar against the variance and against its own λ → 0 limit (its entry, its
    variances, its fit seconds)."""
    amort = RegVarAmortized(AmortizedOptions(steps=100) if smoke else AmortizedOptions())
    _, t_am = timed(log, "regvar-amortized fit", lambda: amort.fit(ctx))
    var_am = amort.predict(sp.x_q).scores["variance"].double()
    # Amortized's own λ→0 limit: |J_k P⁻¹ E_x'[Σ_j sign f_j(x') J_j(x')ᵀ]|/C, k = top logit.
    c, n = sp.data.num_classes, sp.n
    jt = output_jacobians(sp.fm, sp.theta, sp.x_tr, sp.fm.logits(sp.theta, sp.x_tr).sign()[:, None, :] / c)[:, 0]
    u = torch.cholesky_solve(jt.mean(0)[:, None], torch.linalg.cholesky(hess / n))[:, 0] / n
    own_target = (jg[:, 0] @ u).abs()
    # The same estimator at one small λ (no λ choice), to check that it does reach that limit.
    small = RegVarAmortized(replace(amort.options, lam_grid=(AMORTIZED_CHECK_LAM,)))
    small.fit(ctx)
    var_small = small.predict(sp.x_q).scores["variance"].double()
    entry = {
        **compare(var_am, target),
        "lam": amort.lam,
        "scale": amort.scale,
        "median_ratio": float((var_am / target).median()),
        "vs_own_limit": compare(var_am, own_target),
        f"at_lam_{AMORTIZED_CHECK_LAM:g}": {
            "vs_own_limit": compare(var_small, own_target),
            "vs_variance": compare(var_small, target),
        },
    }
    return entry, var_am, t_am


def _sweeps(per_input: RegVar, x_q: torch.Tensor, w: torch.Tensor, target: torch.Tensor, lams: tuple[float, ...],
            steps_grid: tuple[int, ...], sweep_queries: int, log: Callable[[str], None]
            ) -> tuple[dict[str, float], dict[str, float], int, float]:
    """Error against the target over λ (at convergence) and over CG iterations (at the default
    λ), on a few queries in one stacked solve; every other setting is the default."""
    o = per_input.options
    assert per_input.problem is not None
    sub = slice(0, min(sweep_queries, len(x_q)))
    sweep_lams = tuple(sorted({*lams, o.lam}))
    response, t_sweep = timed(
        log,
        f"λ × CG-iterations sweep on {sub.stop} queries",
        lambda: regvar_response(per_input.problem, x_q[sub], w[sub], sweep_lams, FitConfig.from_options(o),
                                checkpoints=steps_grid),
    )
    tgt = target[sub]
    at_default = sweep_lams.index(o.lam)

    def read(r: torch.Tensor) -> torch.Tensor:  # (N, K, L, C) → variance of read-out 0, (N, L)
        return (r[:, 0] * w[sub][:, 0, None, :]).sum(-1)

    lam_curve = {f"{lam:g}": compare(read(response.final)[:, j], tgt)["median_rel_err"]
                 for j, lam in enumerate(sweep_lams)}
    step_curve = {str(k): compare(read(response.at[k])[:, at_default], tgt)["median_rel_err"]
                  for k in sorted(steps_grid)}
    return lam_curve, step_curve, sub.stop, t_sweep


_SUMMARY_KEYS = ("weights", "lam", "solver", "dtype", "difference", "cg_iterations_max", "solver_flags")


def _small_targets(sp: SmallProblem, log: Callable[[str], None]) -> tuple[Any, ...]:
    """The exact variances RegVar estimates: the output directions' quadratic forms in the inverse
    of the true Hessian and of the GGN (with the matrices, the weights, the Jacobians and seconds)."""
    fm, theta, x_q, n, wd = sp.fm, sp.theta, sp.x_q, sp.n, sp.wd
    hess, t_hess = timed(log, "true Hessian", lambda: exact_hessian(fm, theta, sp.x_tr, sp.y_tr, wd))
    ggn, t_ggn = timed(log, "GGN (laplace-torch full)", lambda: ggn_precision(sp.model, sp.x_tr, sp.y_tr, n * wd))
    w = output_weights(fm.logits(theta, x_q), RegVarOptions().output)
    jg = output_jacobians(fm, theta, x_q, w)
    return hess, w, jg, quad(jg, hess)[:, 0], quad(jg, ggn)[:, 0], t_hess, t_ggn


def run(
    task_name: str,
    smoke: bool,
    n_queries: int,
    seed: int,
    train_size: int,
    val_size: int,
    prior_precision: float,
    lams: tuple[float, ...],
    steps_grid: tuple[int, ...],
    sweep_queries: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """The small-model check (``--model small``)."""
    sp = _small_problem(task_name, smoke, n_queries, seed, train_size, val_size, prior_precision, log)
    fm, x_q, n, wd = sp.fm, sp.x_q, sp.n, sp.wd
    hess, w, jg, target, target_ggn, t_hess, t_ggn = _small_targets(sp, log)
    eig_h = torch.linalg.eigvalsh(hess)

    ctx = _small_context(sp, seed, log)
    # The network is converged: the variance is read there (reference=map).
    per_input = RegVar(RegVarOptions(max_queries=len(x_q)))
    _, t_fit = timed(log, "regvar fit", lambda: per_input.fit(ctx))
    var_rv, t_rv = timed(log, f"regvar on {len(x_q)} queries", lambda: top_variance(per_input, x_q).double())
    amortized, var_am, t_am = _amortized(sp, ctx, hess, jg, smoke, target, log)
    lam_curve, step_curve, swept, t_sweep = _sweeps(per_input, x_q, w, target, lams, steps_grid, sweep_queries, log)
    summary = per_input.summary()
    return {
        "task": task_name,
        "smoke": smoke,
        "seed": seed,
        "n": len(x_q),
        "model": type(sp.model).__name__,
        "n_params": fm.dim,
        "n_train": n,
        "prior_precision": n * wd,
        "weight_decay": wd,
        "output": RegVarOptions().output.value,
        "map_grad_inf": sp.grad_inf,
        "hessian_min_eig": float(eig_h[0]),
        "hessian_max_eig": float(eig_h[-1]),
        "target_median": float(target.median()),
        "regvar": {**compare(var_rv, target), **{k: summary[k] for k in _SUMMARY_KEYS}},
        "regvar-amortized": amortized,
        "vs_ggn": {
            "regvar": compare(var_rv, target_ggn),
            "regvar-amortized": compare(var_am, target_ggn),
            "true_hessian_target": compare(target, target_ggn),
        },
        "rel_err_vs_lam": lam_curve,
        "rel_err_vs_cg_iterations": step_curve,
        "sweep_queries": swept,
        "seconds": {
            "map": sp.seconds,
            "hessian": t_hess,
            "ggn": t_ggn,
            "regvar_fit": t_fit,
            "regvar_predict": t_rv,
            "regvar_per_query": t_rv / max(1, len(x_q)),
            "amortized_fit": t_am,
            "sweep": t_sweep,
        },
    }


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split("|") if v)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench fidelity", description=__doc__.split("\n")[0])
    p.add_argument("--task", required=True)
    p.add_argument("--model", choices=("small", "full"), default="small",
                   help="small: a ≤10k-parameter model trained to convergence; full: the leaderboard's MAP network")
    p.add_argument("--smoke", action="store_true", help="tiny configuration (tests, CI; --model small)")
    p.add_argument("--n", type=int, default=None, help="test inputs compared (default: small 32, smoke 4, full 100)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-size", type=int, default=None,
                   help="training subset (small: default 256, smoke 48; full: default all rows)")
    p.add_argument("--val-size", type=int, default=None, help="validation subset (default 256, smoke 48)")
    p.add_argument(
        "--prior-precision",
        type=float,
        default=1.0,
        help="small: n·wd on the log-joint scale (wd = this / n); full uses the task recipe's wd",
    )
    p.add_argument("--lams", default="1e-7|1e-6|1e-5|1e-4|1e-3", help="λ/n values of the λ sweep")
    p.add_argument("--steps-grid", default=None, help="CG iteration counts of the iterations sweep")
    p.add_argument("--sweep-queries", type=int, default=None, help="queries in the sweeps")
    return p


def _main_full(args: argparse.Namespace, log: Callable[[str], None]) -> int:
    if args.smoke:
        raise BenchError("--smoke is for --model small; --model full uses the task's real MAP network")
    from .fidelity_full import run_full  # imports this module's helpers

    out = run_full(args.task, args.n or 100, args.seed, args.train_size, log)
    if args.json:
        print(json.dumps(out, indent=1, default=_jsonable))
        return 0
    for key in ("regvar", "regvar-ll"):
        r = out[key]
        print(f"{key:10s} ({r['weights']}, {r['n_params']} params) vs true Hessian: median rel err "
              f"{r['median_rel_err']:.4f}, spearman {r['spearman']:.4f}; vs GGN: "
              f"{r['vs_ggn']['median_rel_err']:.4f}, {r['vs_ggn']['spearman']:.4f}; "
              f"{r['seconds']['per_query']:.2f} s/query; flags {r['solver_flags'] or 'none'}")
    return 0


def _main_small(args: argparse.Namespace, log: Callable[[str], None]) -> int:
    smoke = args.smoke
    steps_default = "2|5|10|20|50" if smoke else "5|10|20|50|100|200"
    out = run(
        args.task,
        smoke,
        n_queries=args.n if args.n is not None else (4 if smoke else 32),
        seed=args.seed,
        train_size=args.train_size or (48 if smoke else 256),
        val_size=args.val_size or (48 if smoke else 256),
        prior_precision=args.prior_precision,
        lams=_floats(args.lams),
        steps_grid=tuple(int(v) for v in _floats(args.steps_grid or steps_default)),
        sweep_queries=args.sweep_queries or (2 if smoke else 4),
        log=log,
    )
    if args.json:
        print(json.dumps(out, indent=None if smoke else 1, default=_jsonable))
        return 0
    for key in ("regvar", "regvar-amortized"):
        r = out[key]
        print(f"{key:18s} median rel err {r['median_rel_err']:.4f}  spearman {r['spearman']:.4f}")
    for key in ("regvar", "regvar-amortized"):
        r = out["vs_ggn"][key]
        print(f"{key:18s} vs GGN: median rel err {r['median_rel_err']:.4f}  spearman {r['spearman']:.4f}")
    print("rel err vs λ:", out["rel_err_vs_lam"])
    print("rel err vs CG iterations:", out["rel_err_vs_cg_iterations"])
    return 0


def main(argv: list[str]) -> int:
    """``python -m bench fidelity --task T [--model small|full] [--smoke] [--n N] [--json] [--seed S]``."""
    args = _parser().parse_args(argv[1:] if argv[:1] == ["--"] else argv)
    if args.prior_precision <= 0:
        raise BenchError("--prior-precision must be > 0 (the Hessian must be positive definite)")
    if args.n is not None and args.n < 1:
        raise BenchError("--n must be at least 1")

    def log(message: str) -> None:
        print(f"[bench] {message}", file=sys.stderr, flush=True)

    return _main_full(args, log) if args.model == "full" else _main_small(args, log)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return str(value)
