"""``python -m bench perf regvar``: what per-input RegVar costs per query, all weights and last layer.

For each task (``--tasks``, default imdb and fashion-mnist) it takes the leaderboard's MAP
network (the harness's cached checkpoint; else the task model's initial weights, recorded in
``weights``) and runs the registered methods ``regvar`` (every weight) and ``regvar-ll`` (last
layer) exactly as a run does — default options, the method's own ``fit`` (budget probe) and
``moments`` — on ``--queries`` test inputs stacked into one solve, and prints the seconds per
query, the CG iterations and the solver flags. ``--loop`` also times the same queries one at a
time (``query_batch=1``): the speed-up of stacking. ``--amortized`` adds amortized RegVar's
prediction cost against the MAP's (two forward passes + probit vs one forward pass + softmax).

``--rows TASK=N`` fits on the first N training rows of a task (default on CPU: fashion-mnist=2000,
because one all-weight Hessian-vector product of the CNN over 55k images costs seconds per query
on a CPU core); the JSON then states the rows used and ``per_query_s_full_rows``, the measured
time scaled by the row ratio (a product's cost is linear in the rows; the iteration count on
all rows may differ, which the scaled figure does not know).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from bench.device import select_device
from bench.errors import BenchError
from bench.method_api import FitContext, batched_logits
from bench.perf import register_perf
from bench.profiling import measure
from bench.registry import parse_spec
from bench.results import atomic_write_bytes
from bench.studies import context_around, task_with_map
from bench.tasks.base import TaskData

from .amortized import AmortizedOptions, RegVarAmortized
from .newton import ProductEngine
from .per_input import RegVar, RegVarLastLayer
from .response import Preconditioner

CPU_ROWS = {"fashion-mnist": 2000}


# The solver before closed-form products, block CG and preconditioning: autograd's products and
# per-query CG reading its variance over 10 iterations (what --compare times against).
LEGACY = {"products": ProductEngine.AUTOGRAD, "preconditioner": Preconditioner.NONE, "cg_block": False,
          "cg_window": 10}


def per_query(
    method_cls: type[RegVar], ctx: FitContext, x: torch.Tensor, device: torch.device, loop: bool,
    **settings: Any,
) -> dict[str, Any]:
    """Fit the method as a run does, then time its variances for ``x`` in one stack."""
    options = replace(method_cls.Options(), max_queries=len(x), query_batch=len(x), **settings)
    method = method_cls(options)
    with measure(device) as fit:
        method.fit(ctx)
    before = method.stats.as_dict()
    with measure(device) as stacked:
        _, variances = method.moments(x)
    after = method.stats.as_dict()
    summary = method.summary()
    out: dict[str, Any] = {
        "variances": variances[:, 0].tolist(),
        "products": summary["products"],
        "preconditioner": summary["preconditioner"],
        "cg_block": options.cg_block,
        "weights": summary["weights"],
        "n_params": summary["n_params"],
        "n_train": summary["n_train"],
        "queries": len(x),
        "per_query_s": stacked.seconds / len(x),
        "fit_s": fit.seconds,
        "probe_s_per_product": summary["probe_s_per_product"],
        "cg_iterations_mean": (after["cg_iterations_sum"] - before["cg_iterations_sum"]) / max(1, len(x)),
        "cg_iterations_max": after["cg_iterations_max"],
        "solver": summary["solver"],
        "dtype": summary["dtype"],
        "solver_flags": summary["solver_flags"],
    }
    out["method"] = method
    if loop:
        method.options.query_batch = 1
        with measure(device) as single:
            method.moments(x)
        out["loop_per_query_s"] = single.seconds / len(x)
        out["stacking_speedup"] = single.seconds / stacked.seconds
    return out


def compare_legacy(method_cls: type[RegVar], ctx: FitContext, x: torch.Tensor, device: torch.device,
                   new: dict[str, Any]) -> dict[str, Any]:
    """The same queries through the legacy solver at the same θ₀ (the shared MAP): seconds per
    query, the ratio, and how far the variances differ."""
    fitted: RegVar = new["method"]
    legacy_ctx = replace(ctx, map_model=fitted.reference_network()) if not fitted.last_layer else ctx
    old = per_query(method_cls, legacy_ctx, x, device, False, **LEGACY)
    a, b = torch.tensor(new["variances"]), torch.tensor(old["variances"])
    rel = ((a - b).abs() / b.abs().clamp_min(1e-300))
    return {"legacy": {k: v for k, v in old.items() if k != "method"},
            "speedup": old["per_query_s"] / new["per_query_s"],
            "variance_rel_diff_max": float(rel.max()), "variance_rel_diff_median": float(rel.median())}


def amortized_vs_map(
    task: Any, data: TaskData, model: torch.nn.Module, device: torch.device, n_inputs: int, repeats: int
) -> dict[str, float]:
    """Amortized RegVar's ``predict`` against the MAP's forward pass + softmax, best of
    ``repeats`` interleaved timings (the fine-tune is shortened: it does not change the cost)."""
    method = RegVarAmortized(AmortizedOptions(steps=5, lam_grid=(10.0,)))
    method.fit(context_around(model, data, task.recipe(), device=device))
    x = data.test.tensors[0][:n_inputs]
    method.predict(x[:2])
    t_map, t_am = [], []
    for _ in range(repeats):
        with measure(device) as m:
            torch.softmax(batched_logits(model, x, device).double(), 1)
        t_map.append(m.seconds)
        with measure(device) as a:
            method.predict(x)
        t_am.append(a.seconds)
    return {"inputs": len(x), "map_s": min(t_map), "amortized_s": min(t_am), "ratio": min(t_am) / min(t_map)}


def _rows(text: str) -> dict[str, int]:
    out = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if not value.isdigit() or int(value) < 1:
            raise BenchError(f"--rows expects TASK=N pairs separated by commas, got {item!r}")
        out[name] = int(value)
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench perf regvar", description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default="imdb,fashion-mnist", help="comma-separated task names")
    p.add_argument("--smoke", action="store_true", help="the tasks' smoke data")
    p.add_argument("--device", default="cpu")
    p.add_argument("--queries", type=int, default=8, help="test inputs per method, solved as one stack")
    p.add_argument("--rows", default=None, help="TASK=N: fit on the first N training rows (default on CPU: "
                   + ",".join(f"{k}={v}" for k, v in CPU_ROWS.items()) + "; 'none': all rows)")
    p.add_argument("--methods", default="regvar,regvar-ll", help="regvar and/or regvar-ll")
    p.add_argument("--loop", action="store_true", help="also time the queries one at a time")
    p.add_argument("--amortized", action="store_true", help="also time amortized RegVar's prediction vs MAP")
    p.add_argument("--compare", action="store_true",
                   help="also time the legacy solver (autograd products, per-query CG) at the same θ₀")
    p.add_argument("--out-dir", type=Path, default=None, help="write regvar-<task>.json per task into this folder")
    p.add_argument("--json", action="store_true")
    return p


METHOD_CLASSES = {"regvar": RegVar, "regvar-ll": RegVarLastLayer}


def _task_entry(name: str, args: argparse.Namespace, wanted: list[str], rows: dict[str, int],
                device: torch.device) -> dict[str, Any]:
    """One task's timings: each wanted method on a stack of queries (and what the flags add)."""
    loaded = task_with_map(name, 0, args.smoke, device)
    task, data, model, weights = loaded.task, loaded.data, loaded.model, loaded.describe()
    n_all = len(data.train)
    base = parse_spec(name)[0]
    if base in rows and rows[base] < n_all:
        x, y = data.train.tensors
        data = replace(data, train=TensorDataset(x[: rows[base]], y[: rows[base]]))
    ctx = context_around(model, data, task.recipe(), device=device)
    x = data.test.tensors[0][: args.queries]
    entry: dict[str, Any] = {"weights": weights, "rows": len(data.train), "rows_all": n_all}
    for m in wanted:
        r = per_query(METHOD_CLASSES[m], ctx, x, device, args.loop)
        if args.compare:
            r["versus_legacy"] = compare_legacy(METHOD_CLASSES[m], ctx, x, device, r)
        r.pop("method")
        if len(data.train) < n_all:
            r["per_query_s_full_rows"] = r["per_query_s"] * n_all / len(data.train)
        entry[m] = r
    if args.amortized:
        entry["amortized_vs_map"] = amortized_vs_map(task, data, model, device, 2000, 3)
    return entry


def _print_method(name: str, m: str, entry: dict[str, Any]) -> None:
    r = entry[m]
    rows_note = f"{entry['rows']:,} of {entry['rows_all']:,} rows" if entry["rows"] < entry["rows_all"] \
        else f"{entry['rows']:,} rows"
    full = f" (≈{r['per_query_s_full_rows']:.1f} s/query scaled to all rows)" if "per_query_s_full_rows" in r \
        else ""
    loop = f", one at a time {r['loop_per_query_s']:.2f} s ({r['stacking_speedup']:.1f}× slower)" \
        if "loop_per_query_s" in r else ""
    print(f"{name:14s} {m:9s} ({r['weights']}, {r['n_params']:,} params, {rows_note}): "
          f"{r['per_query_s']:.3f} s/query{full}, CG iterations mean {r['cg_iterations_mean']:.0f}"
          f"{loop}; fit {r['fit_s']:.0f} s; flags {r['solver_flags'] or 'none'}")
    if "versus_legacy" in r:
        v = r["versus_legacy"]
        print(f"{'':14s} legacy solver {v['legacy']['per_query_s']:.3f} s/query "
              f"(CG iterations mean {v['legacy']['cg_iterations_mean']:.0f}, flags "
              f"{v['legacy']['solver_flags'] or 'none'}): {v['speedup']:.1f}× faster now; variances differ "
              f"by ≤ {v['variance_rel_diff_max']:.2g} (median {v['variance_rel_diff_median']:.2g}) relative")


@register_perf("regvar")
def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.queries < 1:
        raise BenchError("--queries must be at least 1")
    device = select_device(args.device)
    rows = {} if args.rows == "none" else _rows(args.rows) if args.rows else (CPU_ROWS if device.type == "cpu" else {})
    wanted = [m for m in args.methods.split(",") if m]
    if not wanted or any(m not in METHOD_CLASSES for m in wanted):
        raise BenchError(f"--methods takes regvar and/or regvar-ll, got {args.methods!r}")
    out: dict[str, Any] = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "tasks": {},
    }
    for name in filter(None, args.tasks.split(",")):
        entry = out["tasks"][name] = _task_entry(name, args, wanted, rows, device)
        if args.out_dir is not None:
            args.out_dir.mkdir(parents=True, exist_ok=True)
            one = {k: v for k, v in out.items() if k != "tasks"} | {"task": name, **entry}
            atomic_write_bytes(args.out_dir / f"regvar-{parse_spec(name)[0]}.json",
                               json.dumps(one, indent=1, default=str).encode())
    if args.json:
        print(json.dumps(out, indent=1, default=lambda v: str(v) if isinstance(v, float) and not math.isfinite(v)
                         else str(v)))
        return 0
    print(f"per-input RegVar on {out['device']}, {out['threads']} thread(s), one stack of {args.queries} queries")
    for name, entry in out["tasks"].items():
        for m in wanted:
            _print_method(name, m, entry)
        if "amortized_vs_map" in entry:
            a = entry["amortized_vs_map"]
            print(f"{name:14s} amortized predict {a['amortized_s']:.3f} s vs MAP {a['map_s']:.3f} s on "
                  f"{a['inputs']} inputs: ratio {a['ratio']:.2f}")
    return 0
