"""The full-model fidelity check (``bench fidelity --model full``): the leaderboard's own MAP
network on the task's training set, RegVar against the exact linearised-Laplace variance by
float64 CG on exact Hessian-vector products (``methods/regvar/fidelity.py`` says what and why)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from bench.method_api import FitContext
from bench.seeding import derive_seed, seed_everything
from bench.studies import context_around, task_with_map
from bench.tasks.base import TaskData

from .common import FlatModel
from .fidelity import DTYPE, compare, output_jacobians, timed, top_variance
from .newton import CurvatureKind, CurvatureProducts, batched_cg
from .per_input import RegVar, RegVarLastLayer, RegVarLLOptions, RegVarOptions
from .response import output_weights

# A target is converged only when float64 CG ends with the true residual ‖Au − b‖ ≤ this·‖b‖
# (recomputed after the solve) and met no direction of non-positive curvature; anything else is
# counted as not converged, whatever else the solve reports.
TARGET_RTOL = 1e-8
TARGET_MAX_ITER = 5000
MAP_PROBE = 8  # test inputs along which ∇²P at the raw checkpoint is probed


def exact_variance(
    products: CurvatureProducts, theta: torch.Tensor, jg: torch.Tensor, n: int
) -> tuple[torch.Tensor, dict[str, Any]]:
    """g'ᵀ(n·A)⁻¹g' for each row of ``jg`` (N, D) with A the products' curvature at ``theta``
    (mean scale), by float64 CG; and what the solve reached: iterations, the true relative
    residual ‖Au − g'‖/‖g'‖ recomputed at the end, solves stopped at non-positive curvature."""
    res = batched_cg(lambda p, _r: products.at(theta, p), jg, TARGET_RTOL, TARGET_MAX_ITER)
    true_res = torch.cat([
        (products.at(theta, res.x[i : i + 16]) - jg[i : i + 16]).norm(dim=1) / jg[i : i + 16].norm(dim=1)
        for i in range(0, len(jg), 16)
    ])
    info = {
        "curvature": products.kind.value,
        "dtype": str(jg.dtype).removeprefix("torch."),
        "stop_rule": f"converged: true residual ‖r‖ ≤ {TARGET_RTOL:g}‖b‖ and no non-positive curvature",
        "cg_iterations_max": int(res.iterations.max()),
        "cg_iterations_median": float(res.iterations.double().median()),
        "rel_residual_max": float(true_res.max()),
        "rel_residual_median": float(true_res.median()),
        "variance_gain_last10_max": float(res.energy_gain.max()),
        "not_converged": int(((true_res > TARGET_RTOL) | res.negative_curvature).sum()),
        "negative_curvature": int(res.negative_curvature.sum()),
    }
    return (jg * res.x).sum(1) / n, info


def _probe_map_curvature(model: nn.Module, data: TaskData, wd: float, x_q: torch.Tensor) -> dict[str, Any]:
    """Float64 CG along the first test inputs' top-logit gradients at the raw checkpoint:
    does ∇²P have non-positive curvature there (then the variance is not defined at the MAP)?"""
    fm = FlatModel(model, DTYPE, torch.device("cpu"))
    x, y = data.train.tensors[0].to(DTYPE), data.train.tensors[1]
    products = CurvatureProducts(fm, x, y, wd)
    xq = x_q[:MAP_PROBE].to(DTYPE)
    jg = output_jacobians(fm, fm.theta0, xq, output_weights(fm.logits(fm.theta0, xq), RegVarOptions().output))[:, 0]
    res = batched_cg(lambda p, _r: products.at(fm.theta0, p), jg, TARGET_RTOL, 200)
    grad_map = products.gradient(fm.theta0[None])[0]
    return {
        "grad_norm": float(grad_map.norm()),
        "grad_inf": float(grad_map.abs().max()),
        "probed_inputs": len(xq),
        "negative_curvature": int(res.negative_curvature.sum()),
        "cg_iterations_max": int(res.iterations.max()),
    }


def _method_entry(label: str, method: RegVar, ctx: FitContext, x_q: torch.Tensor, wd: float,
                  log: Callable[[str], None]) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """One method fitted and read on ``x_q``, against the exact variances of its own weights under
    the true Hessian and the GGN at its θ₀: (the entry, its variances, the true-Hessian target)."""
    _, t_fit = timed(log, f"{label} fit", lambda: method.fit(ctx))
    var, t_pred = timed(log, f"{label} on {len(x_q)} inputs", lambda: top_variance(method, x_q))
    problem = method.problem
    assert problem is not None
    inputs = method.network_inputs(x_q).to(DTYPE)
    theta = problem.fm64.theta0
    w = output_weights(problem.fm64.logits(theta, inputs), method.options.output)[:, 0]
    jg = problem.readout_grads(theta.expand(len(inputs), -1), inputs, w)
    targets: dict[str, torch.Tensor] = {}
    infos: dict[str, Any] = {}
    n = len(ctx.data.train)
    for kind in CurvatureKind:
        products = CurvatureProducts(problem.fm64, problem.x.to(DTYPE), problem.y, wd, kind)
        (targets[kind.value], infos[kind.value]), secs = timed(
            log, f"{label}: exact {kind.value} variances", lambda p=products: exact_variance(p, theta, jg, n))
        infos[kind.value]["seconds"] = secs
    summary = method.summary()
    entry = {
        "weights": summary["weights"],
        "n_params": summary["n_params"],
        "theta0": {k: v for k, v in summary.items() if k.startswith("theta0")},
        **compare(var, targets["hessian"]),
        "vs_ggn": compare(var, targets["ggn"]),
        "target_true_hessian": infos["hessian"],
        "target_ggn": infos["ggn"],
        "true_hessian_vs_ggn": compare(targets["hessian"], targets["ggn"]),
        "target_median": float(targets["hessian"].median()),
        "solver": {k: summary[k] for k in ("solver", "dtype", "lam", "difference", "cg_iterations_max",
                                           "cg_iterations_mean", "cg_rel_residual_max", "cg_variance_gain_max",
                                           "nonlinearity_max")},
        "solver_flags": summary["solver_flags"],
        "seconds": {"fit": t_fit, "predict": t_pred, "per_query": t_pred / len(x_q)},
    }
    return entry, var, targets["hessian"]


def run_full(task_name: str, n_queries: int, seed: int, train_size: int | None,
             log: Callable[[str], None]) -> dict[str, Any]:
    """The full-model check (``--model full``) on the leaderboard's own MAP network."""
    seed_everything(seed)
    loaded = task_with_map(task_name, seed)
    task, data, model, path = loaded.task, loaded.data, loaded.model, loaded.require_checkpoint(seed)
    recipe = task.recipe()
    gen = torch.Generator().manual_seed(derive_seed(seed, "fidelity", "full"))
    if train_size is not None and train_size < len(data.train):
        pick = torch.randperm(len(data.train), generator=gen)[:train_size].sort().values
        data = replace(data, train=TensorDataset(*(t[pick] for t in data.train.tensors)))
    pick_te = torch.randperm(len(data.test), generator=gen)[:n_queries]
    x_q = data.test.tensors[0][pick_te]
    n, wd = len(data.train), recipe.weight_decay
    ctx = context_around(model, data, recipe, seed=seed, log=log, make_model=lambda: task.make_model(data.num_classes))
    log(f"fidelity: {task_name} MAP checkpoint {path}, {len(x_q)} test inputs, n={n}, prior precision {n * wd:g}")
    probe, t_probe = timed(log, "∇²P probe at the raw checkpoint", lambda: _probe_map_curvature(model, data, wd, x_q))
    out: dict[str, Any] = {
        "task": task_name,
        "model": "full",
        "checkpoint": str(path),
        "seed": seed,
        "n": len(x_q),
        "n_train": n,
        "train_subset": None if train_size is None or train_size >= n else f"{n} seeded training rows",
        "weight_decay": wd,
        "prior_precision": n * wd,
        "output": RegVarOptions().output.value,
        "P": (
            "n·[mean CE + (wd/2)‖θ‖²] on the training rows, the task recipe's wd (prior precision n·wd); "
            "its Hessian (true, and GGN) at the θ₀ each method reads its variance at (field theta0)"
        ),
        "raw_checkpoint_curvature": probe,
        "seconds": {"map_probe": t_probe},
    }
    all_target = None
    for label, method in (("regvar", RegVar(RegVarOptions(max_queries=len(x_q)))),
                          ("regvar-ll", RegVarLastLayer(RegVarLLOptions(max_queries=len(x_q))))):
        entry, var, target = _method_entry(label, method, ctx, x_q, wd, log)
        if label == "regvar-ll":
            entry["vs_all_weights_true_hessian"] = compare(var, all_target)
            entry["note"] = "targets: the exact last-layer variance; vs_all_weights_true_hessian: regvar's target"
        else:
            all_target = target
        out[label] = entry
    out["notes"] = _notes(out)
    return out


def _notes(out: dict[str, Any]) -> list[str]:
    """What the figures rest on, stated from the figures themselves."""
    notes = []
    probe = out["raw_checkpoint_curvature"]
    if probe["negative_curvature"]:
        notes.append(
            f"∇²P at the raw AdamW checkpoint (‖∇P‖ = {probe['grad_norm']:.3g}, not stationary) has non-positive "
            f"curvature along {probe['negative_curvature']} of {probe['probed_inputs']} probed inputs: the Laplace "
            "variance is not defined there"
        )
    for key in ("regvar", "regvar-ll"):
        for kind in ("true_hessian", "ggn"):
            t = out[key][f"target_{kind}"]
            if t["not_converged"]:
                notes.append(
                    f"{key}: {t['not_converged']} of {out['n']} {kind} targets NOT converged "
                    f"({t['negative_curvature']} met non-positive curvature; true residual median "
                    f"{t['rel_residual_median']:.2g}, max {t['rel_residual_max']:.2g}, tolerance {TARGET_RTOL:g}): "
                    "comparisons against this target are not against the Laplace variance"
                )
    return notes
