"""Which coupled weight decay the text heads' MAP uses: validation NLL of the finished MAP.

The MAP every method reads is a certified minimum of P = mean CE + (wd/2)‖θ‖² (``bench.map_finish``),
so wd is the prior the whole leaderboard rests on. For each wd on the grid this trains the head
with the task's recipe (AdamW at that wd), finishes it by Newton to ‖∇P‖∞ ≤ 1e-6 and reports the
validation NLL, accuracy and ECE (test figures alongside, not used for the choice). The chosen wd
is the largest whose validation NLL is not worse than the best's beyond the paired bootstrap's
noise (``bench.scale_tuning.worse_than_best``): the strongest prior the data do not reject, which
also keeps ∇²P best conditioned. It must be interior to the grid. Rows already in the task's JSON
(with their per-input NLLs) are kept: a wider grid only adds the new points.

    python scripts/weight_decay_study.py rotten-tomatoes   # writes results/studies/weight-decay/<task>.json
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from pathlib import Path

import torch

from bench.formulas import nll_per_input
from bench.map_finish import Objective, newton_finish
from bench.metrics import evaluate
from bench.results import atomic_write_bytes
from bench.scale_tuning import worse_than_best
from bench.tasks import TASKS
from bench.training import train

GRID = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)


def scores(model: torch.nn.Module, data: torch.utils.data.TensorDataset) -> dict[str, float]:
    with torch.no_grad():
        probs = model(data.tensors[0]).double().softmax(1)
    m = evaluate(probs, data.tensors[1])
    return {k: m[k] for k in ("cls/acc", "cls/nll", "cal/ece")}


def finished_row(task, data, wd: float) -> dict:
    """Train at ``wd`` with the task's recipe, finish by Newton, and score it."""
    recipe = dataclasses.replace(task.recipe(), weight_decay=wd)
    torch.manual_seed(0)
    model = task.make_model(data.num_classes)
    train(model, data.train, recipe, torch.device("cpu"), torch.Generator().manual_seed(1), lambda it, **k: it)
    obj = Objective(copy.deepcopy(model), *data.train.tensors, wd)
    theta, steps = newton_finish(obj, obj.flat(), progress=lambda line: print(f"wd={wd:g}: {line}", flush=True))
    obj.load(theta, model)
    model.float().eval()
    with torch.no_grad():
        per_input = nll_per_input(model(data.val.tensors[0]).double().softmax(1), data.val.tensors[1])
    return {"weight_decay": wd, "newton_steps": steps, "grad_inf": float(obj.gradient(theta).abs().max()),
            "val": scores(model, data.val), "test": scores(model, data.test), "val_nll_per_input": per_input.tolist()}


def main(task_name: str) -> None:
    torch.set_num_threads(1)
    task = TASKS.get(task_name)()
    data = task.load()
    path = Path("results/studies/weight-decay") / f"{task_name}.json"
    kept = {r["weight_decay"]: r for r in json.loads(path.read_text())["rows"]} if path.exists() else {}
    rows = []
    for wd in GRID:  # a row measured by an earlier call (same seeds, same result) is kept
        rows.append(kept[wd] if "val_nll_per_input" in kept.get(wd, {}) else finished_row(task, data, wd))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "val_nll_per_input"}), flush=True)
    worse = worse_than_best(torch.tensor([r["val_nll_per_input"] for r in rows], dtype=torch.float64))
    chosen = max(r["weight_decay"] for r, w in zip(rows, worse, strict=True) if not w)
    interior = chosen not in (GRID[0], GRID[-1])
    out = {"task": task_name, "grid": GRID, "rows": rows, "worse_than_best": worse, "chosen": chosen,
           "lowest_val_nll_at": min(rows, key=lambda r: r["val"]["cls/nll"])["weight_decay"], "interior": interior}
    atomic_write_bytes(path, json.dumps(out, indent=1).encode())
    print(f"{task_name}: wd={chosen:g} is the largest whose validation NLL is not worse than the best beyond noise"
          f"{'' if interior else ' (ON THE GRID EDGE: widen the grid)'}; wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1])
