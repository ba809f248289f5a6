"""``python -m bench perf laplace``: laplace-torch's all-weights GLM predictive vs ours.

Fits laplace-torch's all-weights KFAC posterior (curvlinops GGN, prior precision by marginal
likelihood, as the ``laplace`` method does) of the ``fashion-mnist`` CNN, using the harness's
cached MAP checkpoint when there is one (else the same CNN on its random initial weights; the
timings and the agreement do not depend on the weights), then, in one process and on the same
posterior and inputs, times the probit GLM predictive of

* laplace-torch: ``la(x, pred_type="glm", link_approx="probit")`` in batches of ``--ref-batch``
  (its full batch Jacobian needs N·C·P floats and more inside jacrev), and
* ours: ``methods.kfac_predictive.FastGLMPredictive`` + the same probit link, in batches of
  ``--batch``,

and prints seconds per 1,000 inputs, their ratio and the largest absolute difference in
probabilities (target: ratio ≥ 5, difference ≤ 1e-5).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from bench.device import select_device
from bench.perf import register_perf
from bench.profiling import Measurement, measure
from bench.studies import task_with_map


def _timed(device: torch.device, fn: Any, x: torch.Tensor, batch: int) -> tuple[torch.Tensor, Any]:
    fn(x[: min(2, len(x))])  # warm-up (lazy allocations, first-call dispatch)
    with measure(device) as m:
        out = torch.cat([fn(x[s : s + batch]).cpu() for s in range(0, len(x), batch)])
    return out, m


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench perf laplace", description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="test inputs to predict (default 1000)")
    parser.add_argument("--fit-n", type=int, default=2000,
                        help="training images for the curvature fit (default 2000)")
    parser.add_argument("--batch", type=int, default=256, help="inputs per batch, ours")
    parser.add_argument("--ref-batch", type=int, default=32, help="inputs per batch, laplace-torch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task", default="fashion-mnist", help="the task whose model and data to use")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--smoke", action="store_true", help="tiny quick version (n=40, fit-n=200)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    return parser


def _fitted_kfac(model: torch.nn.Module, fit_data: TensorDataset, device: torch.device) -> tuple[Any, Measurement]:
    """laplace-torch's all-weights KFAC Laplace on ``fit_data``, its prior by marginal likelihood."""
    from laplace import Laplace
    from laplace.curvature import CurvlinopsGGN

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron",
                     backend=CurvlinopsGGN)
        with measure(device) as fit:
            la.fit(DataLoader(fit_data, batch_size=256))
            la.optimize_prior_precision(method="marglik", pred_type="glm")
    return la, fit


def _print(result: dict[str, Any]) -> None:
    print(f"GLM probit predictive, all-weights KFAC, {result['model_params']}-param CNN, {result['n']} inputs, "
          f"{result['device']} ({result['threads']} threads)")
    print(f"  laplace-torch : {result['laplace_torch_s_per_1k']:9.2f} s per 1,000 inputs "
          f"(peak +{result['laplace_torch_peak_bytes'] / 2**20:.0f} MiB)")
    print(f"  ours          : {result['ours_s_per_1k']:9.2f} s per 1,000 inputs "
          f"(peak +{result['ours_peak_bytes'] / 2**20:.0f} MiB)")
    print(f"  ratio         : {result['ratio']:9.1f}x")
    print(f"  max |Δ prob|  : {result['max_abs_diff_probs']:.2e}")


@register_perf("laplace")
def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.smoke:
        args.n, args.fit_n = min(args.n, 40), min(args.fit_n, 200)

    from bench.formulas import probit_probs

    from .kfac_predictive import FastGLMPredictive

    device = select_device(args.device)
    loaded = task_with_map(args.task, args.seed, args.smoke, device)
    model, train, x_test, weights = loaded.model, loaded.data.train, loaded.data.test.tensors[0], loaded.describe()
    x = x_test[: args.n]
    fit_data = TensorDataset(*(t[: args.fit_n] for t in train.tensors))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.task} model, {n_params} params, {weights}", file=sys.stderr)
    print(f"fitting all-weights KFAC on {len(fit_data)} images ...", file=sys.stderr)
    la, fit = _fitted_kfac(model, fit_data, device)
    fast = FastGLMPredictive(la)

    def ours(xb: torch.Tensor) -> torch.Tensor:
        return probit_probs(*fast.functional(xb.to(device)))

    def theirs(xb: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return la(xb.to(device), pred_type="glm", link_approx="probit").detach()

    print(f"ours on {len(x)} inputs ...", file=sys.stderr)
    p_ours, t_ours = _timed(device, ours, x, args.batch)
    print(f"laplace-torch on {len(x)} inputs ...", file=sys.stderr)
    p_ref, t_ref = _timed(device, theirs, x, args.ref_batch)

    per_1k = 1000.0 / max(len(x), 1)
    result = {
        "model_params": n_params,
        "weights": weights.split(" (")[0],
        "fit_images": len(fit_data),
        "fit_s": fit.seconds,
        "prior_precision": float(la.prior_precision.reshape(-1)[0]),
        "n": len(x),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "laplace_torch_s_per_1k": t_ref.seconds * per_1k,
        "ours_s_per_1k": t_ours.seconds * per_1k,
        "ratio": t_ref.seconds / max(t_ours.seconds, 1e-12),
        "max_abs_diff_probs": float((p_ours - p_ref).abs().max()) if len(x) else 0.0,
        "laplace_torch_peak_bytes": t_ref.peak_bytes,
        "ours_peak_bytes": t_ours.peak_bytes,
        "memory_kind": t_ours.kind,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print(result)
    return 0
