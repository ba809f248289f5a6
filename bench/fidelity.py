"""Fidelity of RegVar against exact linearized Laplace: ``python -m bench fidelity --task T``.

On a version of the task's model small enough for exact curvature (``Task.make_small_model``,
≤ 10k parameters) trained to convergence (full batch, float64, L-BFGS, on a seeded training
subset), the linearized predictive variance g'(x)ᵀ Σ g'(x) of the output g that RegVar
regularises (default: the MAP-predicted logit) is computed exactly with
  - the true Hessian: Σ⁻¹ = ∇²[n·P] (chunked Hessian-vector products, ``torch.func``), which is
    the limit of RegVar's finite difference (the paper's Theorem 4.1), and
  - the GGN: laplace-torch ``Laplace(..., "all", "full")`` with prior precision n·wd.
The objective is ``P = mean CE + (wd/2)‖θ‖²`` with wd = prior_precision / n (see
``methods.regvar_common``); the default prior precision 1 (not the task recipe's weight decay,
which on a 256-point subset is a nearly flat prior under which L-BFGS does not reach a
stationary point in thousands of iterations) keeps the exact problem well posed. Both RegVar
methods then run with their default settings on the same problem; we report the median
relative error and Spearman's ρ of their variances against
both targets, and the per-input estimator's error as a function of λ and of optimizer steps.
The per-input method's variance-scale tuning is off here (val_queries=0): it does not change
the variance. Amortized RegVar tunes λ and its scale on validation NLL as usual; we report its
raw variance and the tuned scale, and compare it with its own linear-response limit
|J_k(x) Σ E_x'[Σ_j sign f_j(x') J_j(x')ᵀ]|/C too, both at the λ it chose and at λ/n = 1e-5.
λ values are per example (λ/n), as in the methods' options.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from torch.func import grad, jvp, vmap
from torch.utils.data import DataLoader, TensorDataset

from bench.errors import BenchError
from bench.method_api import FitContext
from bench.seeding import derive_seed, seed_everything
from bench.tasks.base import TaskData, TrainRecipe
from bench_methods.regvar import RegVar, RegVarOptions, output_weights, regvar_variance
from bench_methods.regvar_amortized import AmortizedOptions, RegVarAmortized
from bench_methods.regvar_common import FlatModel, resolve

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


def _timed(log: Callable[[str], None], what: str, fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    log(f"fidelity: {what} in {seconds:.1f} s")
    return out, seconds


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
    (theta, grad_inf), t_train = _timed(log, "MAP (L-BFGS, float64)", lambda: train_to_convergence(fm, x_tr, y_tr, wd))
    with torch.no_grad():
        for p, v in zip([p for p in model.parameters()], fm.unflatten(theta).values(), strict=True):
            p.copy_(v)
    fm = FlatModel(model, DTYPE, torch.device("cpu"))
    hess, t_hess = _timed(log, "true Hessian", lambda: exact_hessian(fm, theta, x_tr, y_tr, wd))
    ggn, t_ggn = _timed(log, "GGN (laplace-torch full)", lambda: ggn_precision(model, x_tr, y_tr, n * wd))
    eig_h = torch.linalg.eigvalsh(hess)
    logits = fm.logits(theta, x_q)
    w = output_weights(logits, RegVarOptions().output)
    jg = output_jacobians(fm, theta, x_q, w)
    target = quad(jg, hess)[:, 0]
    target_ggn = quad(jg, ggn)[:, 0]

    ctx = FitContext(
        data=TaskData(
            train=TensorDataset(x_tr, y_tr),
            val=TensorDataset(x_va, y_va),
            test=TensorDataset(x_q, torch.zeros(len(x_q), dtype=torch.long)),
            num_classes=data.num_classes,
        ),
        make_model=lambda: make_small(task, data.num_classes, x_tr[0]).to(DTYPE),
        recipe=TrainRecipe(epochs=1, batch_size=n, lr=1.0, weight_decay=wd, optimizer="lbfgs"),
        device=torch.device("cpu"),
        seed=seed,
        map_model=model,
        train_model=lambda member: model,
        progress=lambda it, **_: it,
        log=log,
    )
    per_input = RegVar(RegVarOptions(val_queries=0))
    _, t_fit = _timed(log, "regvar fit", lambda: per_input.fit(ctx))
    pred, t_rv = _timed(log, f"regvar on {len(x_q)} queries", lambda: per_input.predict(x_q))
    var_rv = pred.scores["variance"].double()
    amort = RegVarAmortized(AmortizedOptions(steps=100) if smoke else AmortizedOptions())
    _, t_am = _timed(log, "regvar-amortized fit", lambda: amort.fit(ctx))
    var_am = amort.predict(x_q).scores["variance"].double()
    # Amortized's own λ→0 limit: |J_k P⁻¹ E_x'[Σ_j sign f_j(x') J_j(x')ᵀ]|/C, k = top logit.
    c = data.num_classes
    jt = output_jacobians(fm, theta, x_tr, fm.logits(theta, x_tr).sign()[:, None, :] / c)[:, 0]
    u = torch.cholesky_solve(jt.mean(0)[:, None], torch.linalg.cholesky(hess / n))[:, 0] / n
    own_target = (jg[:, 0] @ u).abs()
    # The same estimator at one small λ (no λ choice), to check that it does reach that limit.
    small = RegVarAmortized(replace(amort.options, lam_grid=(AMORTIZED_CHECK_LAM,)))
    small.fit(ctx)
    var_small = small.predict(x_q).scores["variance"].double()

    # Sweeps on a few queries, in one stacked solve: error vs λ (at the default steps) and vs
    # optimizer steps (at the default λ); every other setting is the default.
    o = per_input.options
    opt, dtype = resolve(o.optimizer, o.precision, n, fm.dim, o.full_batch_budget)
    sub = slice(0, min(sweep_queries, len(x_q)))
    sweep_lams = tuple(sorted({*lams, o.lam}))
    settings = o.settings(opt, seed=derive_seed(seed, "regvar", "data-order"), steps=max(*steps_grid, o.steps))
    fm_fit = FlatModel(model, dtype, torch.device("cpu"))
    sweep, t_sweep = _timed(
        log,
        f"λ × steps sweep on {sub.stop} queries",
        lambda: regvar_variance(
            fm_fit,
            x_tr.to(dtype),
            y_tr,
            wd,
            x_q[sub],
            w[sub],
            tuple(lam * n for lam in sweep_lams),  # regvar_variance takes the log-joint λ
            settings,
            o.difference,
            o.query_batch,
            (*steps_grid, o.steps),
            curvature=per_input.curvature,  # the solver the method used above
        ),
    )
    tgt = target[sub]
    at_default = sweep_lams.index(o.lam)
    lam_curve = {
        f"{lam:g}": compare(sweep[o.steps][:, 0, j], tgt)["median_rel_err"] for j, lam in enumerate(sweep_lams)
    }
    step_curve = {str(k): compare(sweep[k][:, 0, at_default], tgt)["median_rel_err"] for k in sorted(steps_grid)}

    return {
        "task": task_name,
        "smoke": smoke,
        "seed": seed,
        "n": len(x_q),
        "model": type(model).__name__,
        "n_params": fm.dim,
        "n_train": n,
        "prior_precision": n * wd,
        "weight_decay": wd,
        "output": RegVarOptions().output.value,
        "map_grad_inf": grad_inf,
        "hessian_min_eig": float(eig_h[0]),
        "hessian_max_eig": float(eig_h[-1]),
        "target_median": float(target.median()),
        "regvar": {
            **compare(var_rv, target),
            **{k: per_input.summary()[k] for k in ("lam", "optimizer", "dtype", "steps", "difference")},
            **{k: v for k, v in per_input.summary().items() if k.startswith("polish")},
        },
        "regvar-amortized": {
            **compare(var_am, target),
            "lam": amort.lam,
            "scale": amort.scale,
            "median_ratio": float((var_am / target).median()),
            "vs_own_limit": compare(var_am, own_target),
            f"at_lam_{AMORTIZED_CHECK_LAM:g}": {
                "vs_own_limit": compare(var_small, own_target),
                "vs_variance": compare(var_small, target),
            },
        },
        "vs_ggn": {
            "regvar": compare(var_rv, target_ggn),
            "regvar-amortized": compare(var_am, target_ggn),
            "true_hessian_target": compare(target, target_ggn),
        },
        "rel_err_vs_lam": lam_curve,
        "rel_err_vs_steps": step_curve,
        "sweep_queries": sub.stop,
        "seconds": {
            "map": t_train,
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


def main(argv: list[str]) -> int:
    """``python -m bench fidelity --task T [--smoke] [--n N] [--json] [--seed S]``."""
    p = argparse.ArgumentParser(prog="bench fidelity", description=__doc__.split("\n")[0])
    p.add_argument("--task", required=True)
    p.add_argument("--smoke", action="store_true", help="tiny configuration (tests, CI)")
    p.add_argument("--n", type=int, default=None, help="test inputs compared (default 32, smoke 4)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-size", type=int, default=None, help="training subset (default 256, smoke 48)")
    p.add_argument("--val-size", type=int, default=None, help="validation subset (default 256, smoke 48)")
    p.add_argument(
        "--prior-precision",
        type=float,
        default=1.0,
        help="n·wd on the log-joint scale (wd = this / n)",
    )
    p.add_argument("--lams", default="1e-7|1e-6|1e-5|1e-4|1e-3", help="λ/n values of the λ sweep")
    p.add_argument("--steps-grid", default=None, help="step counts of the steps sweep")
    p.add_argument("--sweep-queries", type=int, default=None, help="queries in the sweeps")
    args = p.parse_args(argv[1:] if argv[:1] == ["--"] else argv)
    if args.prior_precision <= 0:
        raise BenchError("--prior-precision must be > 0 (the Hessian must be positive definite)")
    smoke = args.smoke
    steps_default = "2|5|10|20|50" if smoke else "5|10|20|50|100|200|300"
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
        log=lambda m: print(f"[bench] {m}", file=sys.stderr, flush=True),
    )
    if args.json:
        print(json.dumps(out, indent=None if smoke else 1, default=_jsonable))
    else:
        for key in ("regvar", "regvar-amortized"):
            r = out[key]
            print(f"{key:18s} median rel err {r['median_rel_err']:.4f}  spearman {r['spearman']:.4f}")
        for key in ("regvar", "regvar-amortized"):
            r = out["vs_ggn"][key]
            print(f"{key:18s} vs GGN: median rel err {r['median_rel_err']:.4f}  spearman {r['spearman']:.4f}")
        print("rel err vs λ:", out["rel_err_vs_lam"])
        print("rel err vs steps:", out["rel_err_vs_steps"])
    return 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return str(value)
