"""``python -m bench perf regvar``: what RegVar costs at prediction time, in one run.

1. Amortized RegVar vs MAP prediction on the same inputs: the MAP's time is one batched forward
   pass + softmax (as the ``map`` method does); amortized RegVar's is its ``predict`` (two
   forward passes + probit). Its fine-tune runs first, shortened to ``--fit-steps`` (prediction
   cost does not depend on how long it was fine-tuned). Target ratio ≤ 2.5.
2. Per-input RegVar, seconds per query: ``--queries`` queries solved as one vmapped stack vs one
   query at a time (a loop calling the same estimator with one query), same optimizer, steps,
   λ and data order. Target: batched ≥ 10× faster per query.

The network is the task's model with the harness's cached MAP checkpoint (else its initial
weights), or its small fidelity model (``--model small``) fitted by float64 L-BFGS on the first
``--train-size`` training points. Optimizer and precision
follow the method's defaults resolved for that model and training-set size (``--optimizer``
overrides); the number of fit steps is ``--steps`` (default 20, the same in both arms: the time
per step is what batching changes). ``max_rel_diff_batched_vs_loop`` checks that both arms
compute the same estimates (identical in float64; in float32 the vmapped and single kernels
round differently, which a fit far from its optimum can amplify).
"""

from __future__ import annotations

import argparse
import json
import platform
from dataclasses import replace
from typing import Any

import torch
from torch.utils.data import TensorDataset

from bench.device import select_device
from bench.method_api import FitContext, batched_logits
from bench.perf import register_perf
from bench.profiling import measure
from bench.tasks.base import TaskData
from bench_methods.regvar import (
    RegVarOptions,
    Weights,
    output_weights,
    regvar_variance,
    resolve_weights,
    split_last_linear,
)
from bench_methods.regvar_amortized import AmortizedOptions, RegVarAmortized
from bench_methods.regvar_common import FlatModel, Optimizer, SolverSettings, resolve, train_tensors


def _setup(
    task_name: str, smoke: bool, model_kind: str, seed: int, device: torch.device, train_size: int | None
) -> tuple[Any, TaskData, torch.nn.Module, str]:
    """Task, data (training set cut to ``train_size``) and a MAP network with its provenance:
    the harness's cached checkpoint for the task's model (else its initial weights), or the
    small model fitted by float64 L-BFGS on the training subset (as ``bench fidelity`` does)."""
    from bench.fidelity import train_to_convergence
    from bench.tasks import TASKS
    from bench.training import checkpoint_path, load_state

    task = TASKS.get(task_name)(smoke=smoke)
    data = task.load()
    if train_size:
        x, y = data.train.tensors
        data = replace(data, train=TensorDataset(x[:train_size], y[:train_size]))
    torch.manual_seed(seed)
    if model_kind == "small":
        model = task.make_small_model(data.num_classes)
        fm = FlatModel(model, torch.float64, torch.device("cpu"))
        x, y = data.train.tensors
        theta, _ = train_to_convergence(fm, x.double(), y, task.recipe().weight_decay, max_iter=300)
        torch.nn.utils.vector_to_parameters(theta.float(), [p for p in model.parameters() if p.requires_grad])
        weights = f"L-BFGS MAP (300 iterations) on {len(x)} training points"
    else:
        model = task.make_model(data.num_classes)
        path = checkpoint_path(task.cache_key(), task.recipe(), seed)
        weights = f"cached MAP checkpoint {path}" if load_state(model, path) else "initial weights (no cached MAP)"
    return task, data, model.to(device).eval(), weights


def amortized_vs_map(
    task: Any,
    data: TaskData,
    model: torch.nn.Module,
    device: torch.device,
    n_inputs: int,
    fit_steps: int,
    repeats: int,
) -> dict[str, float]:
    ctx = FitContext(
        data=data,
        make_model=lambda: model,
        recipe=task.recipe(),
        device=device,
        seed=0,
        map_model=model,
        train_model=lambda m: model,
        progress=lambda it, **_: it,
        log=lambda m: None,
    )
    method = RegVarAmortized(AmortizedOptions(steps=fit_steps, lam_grid=(10.0,)))
    method.fit(ctx)
    x = data.test.tensors[0][:n_inputs]
    method.predict(x[:2])
    torch.softmax(batched_logits(model, x[:2], device).double(), 1)
    t_map, t_am = [], []
    for _ in range(repeats):  # interleaved, best of `repeats`: the CPU is shared
        with measure(device) as m:
            torch.softmax(batched_logits(model, x, device).double(), 1)
        t_map.append(m.seconds)
        with measure(device) as a:
            method.predict(x)
        t_am.append(a.seconds)
    return {
        "inputs": len(x),
        "map_s": min(t_map),
        "amortized_s": min(t_am),
        "ratio": min(t_am) / min(t_map),
        "fit_steps": fit_steps,
        "optimizer": method.info["optimizer"],
    }


def batched_vs_loop(
    data: TaskData,
    model: torch.nn.Module,
    device: torch.device,
    wd: float,
    n_queries: int,
    steps: int | None,
    optimizer: str | None,
    query_batch: int = 0,
) -> dict[str, Any]:
    o = RegVarOptions()
    n_train = len(data.train)
    dim = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = Optimizer(optimizer) if optimizer else o.optimizer
    opt, dtype = resolve(opt, o.precision, n_train, dim, o.full_batch_budget)
    fm = FlatModel(model, dtype, device)
    x_train, y_train = train_tensors(data.train, fm)
    settings = SolverSettings(opt, steps or o.steps, o.lr, o.batch_size, o.history, o.rtol, seed=0)
    queries = data.test.tensors[0][:n_queries]
    w = output_weights(fm.logits(fm.theta0, queries).cpu(), o.output)

    def estimate(q: slice, batch: int) -> torch.Tensor:
        return regvar_variance(
            fm, x_train, y_train, wd, queries[q], w[q], (o.lam * n_train,), settings, o.difference, batch
        )[settings.steps]

    estimate(slice(0, 1), 1)  # warm-up
    with measure(device) as b:
        batched = estimate(slice(0, n_queries), query_batch or 2 * n_queries)
    with measure(device) as s:
        single = torch.cat([estimate(slice(i, i + 1), 1) for i in range(n_queries)])
    agree = float(((batched - single).abs() / batched.abs().clamp_min(1e-12)).max())
    return {
        "queries": n_queries,
        "query_batch": query_batch or 2 * n_queries,
        "optimizer": opt.value,
        "dtype": str(dtype).removeprefix("torch."),
        "steps": settings.steps,
        "batch_size": settings.batch_size,
        "n_train": n_train,
        "n_params": dim,
        "batched_s_per_query": b.seconds / n_queries,
        "loop_s_per_query": s.seconds / n_queries,
        "speedup": s.seconds / b.seconds,
        "max_rel_diff_batched_vs_loop": agree,
    }


@register_perf("regvar")
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench perf regvar", description=__doc__.split("\n")[0])
    p.add_argument("--task", default="fashion-mnist")
    p.add_argument("--smoke", action="store_true", help="the task's smoke data (2k training images)")
    p.add_argument("--model", choices=("task", "small"), default="task")
    p.add_argument("--device", default="cpu")
    p.add_argument("--inputs", type=int, default=2000, help="inputs for the prediction timing")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--fit-steps", type=int, default=5, help="amortized fine-tune steps (timing only)")
    p.add_argument("--queries", type=int, default=8, help="queries for the batched-vs-loop timing")
    p.add_argument("--steps", type=int, default=20, help="fit steps per query (0: the method's)")
    p.add_argument(
        "--query-batch",
        type=int,
        default=0,
        help="fits per vmapped stack in the batched arm (0: all queries in one stack)",
    )
    p.add_argument("--train-size", type=int, default=None, help="use the first N training points")
    p.add_argument("--optimizer", choices=[o.value for o in Optimizer], default=None)
    p.add_argument(
        "--weights",
        choices=[w.value for w in Weights],
        default="auto",
        help="parameters the per-input fits refit (default: the method's auto choice)",
    )
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    device = select_device(args.device)
    task, data, model, weights = _setup(args.task, args.smoke, args.model, 0, device, args.train_size)
    out: dict[str, Any] = {
        "task": args.task,
        "smoke": args.smoke,
        "model": args.model,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "weights": weights,
    }
    out["amortized_vs_map"] = amortized_vs_map(task, data, model, device, args.inputs, args.fit_steps, args.repeats)
    # The per-input arm refits what the method refits by default (``weights=auto``).
    weights_used = resolve_weights(Weights(args.weights), len(data.train), model, RegVarOptions().full_batch_budget)
    fit_data, fit_model = data, model
    if weights_used is Weights.LAST_LAYER:
        fit_model, featurize = split_last_linear(model, device)
        fit_data = replace(
            data,
            train=TensorDataset(featurize(data.train.tensors[0]), data.train.tensors[1]),
            test=TensorDataset(featurize(data.test.tensors[0][: args.queries]), data.test.tensors[1][: args.queries]),
        )
    out["per_input_weights"] = weights_used.value
    out["per_input_batched_vs_loop"] = batched_vs_loop(
        fit_data,
        fit_model,
        device,
        task.recipe().weight_decay,
        args.queries,
        args.steps,
        args.optimizer,
        args.query_batch,
    )
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        a, b = out["amortized_vs_map"], out["per_input_batched_vs_loop"]
        print(
            f"amortized predict {a['amortized_s']:.3f} s vs MAP {a['map_s']:.3f} s on "
            f"{a['inputs']} inputs: ratio {a['ratio']:.2f} (target ≤ 2.5)"
        )
        print(
            f"per-input RegVar ({out['per_input_weights']}, {b['optimizer']}, {b['dtype']}, "
            f"{b['steps']} steps): batched "
            f"{b['batched_s_per_query']:.3f} s/query, loop {b['loop_s_per_query']:.3f} s/query, "
            f"speedup {b['speedup']:.2f}× (target ≥ 10)"
        )
    return 0
