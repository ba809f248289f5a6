"""The Laplace prior-precision comparison: one markdown table from run files.

Reads every ``laplace`` and ``laplace-ll`` run (any options) under the given results roots and
prints, per task and configuration, mean ± std over seeds of test NLL, ECE, the entropy OOD
AUROC averaged over the task's OOD sets, and the chosen prior precision.

    python scripts/laplace_prior_study.py results results/studies/laplace-prior > results/studies/laplace-prior.md

``results/`` holds the leaderboard's rows (``laplace`` = marglik with the layerwise prior,
``laplace-ll`` = scalar marglik, and both with ``prior_method=gridsearch``);
``results/studies/laplace-prior/`` the configuration the leaderboard does not show
(``laplace@prior_structure=scalar``), from ``bench sweep --methods "laplace(prior_structure=scalar)"
--tasks all --seeds 0,1,2 --out results/studies/laplace-prior``.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from tabulate import tabulate

from bench.record import RunRecord
from bench.results import iter_runs, read_record

METHODS = ("laplace", "laplace-ll")


def config_name(record: RunRecord) -> str:
    """The prior configuration a run used, as it resolved it: ``gridsearch (val NLL)``,
    ``marglik (scalar)`` or ``marglik (layerwise)``. Runs made before ``prior_structure=auto``
    recorded no resolved structure; their option is the structure they used. ``objective``: the
    MAP objective's own precision n·wd, the one RegVar reads."""
    method = record.method_summary.get("prior_method", record.config.method_options.get("prior_method"))
    if method == "gridsearch":
        return "gridsearch (val NLL)"
    if method == "objective":
        return "n·wd (the MAP objective's)"
    structure = record.method_summary.get("prior_structure", record.config.method_options.get("prior_structure"))
    return f"{method} ({structure})"


def ood_entropy_auroc(metrics: dict[str, float]) -> float:
    values = [v for k, v in metrics.items() if k.startswith("ood/") and k.endswith("/auroc/entropy")]
    return float(np.mean(values)) if values else float("nan")


def summarise(roots: list[Path]) -> list[list[str]]:
    cells: dict[tuple[str, str, str], list[tuple[float, ...]]] = defaultdict(list)
    for root in roots:
        for path in iter_runs(root):
            record = read_record(path)
            if not record.ok or record.config.method not in METHODS or record.config.smoke:
                continue
            m = record.metrics
            prior = record.method_summary.get("prior_precision")
            prior = float(np.mean(prior)) if prior is not None else float("nan")
            cells[(record.task, record.config.method, config_name(record))].append(
                (m["cls/nll"], m["cal/ece"], ood_entropy_auroc(m), prior)
            )
    rows = []
    for (task, method, config), values in sorted(cells.items()):
        a = np.array(values)
        fmt = [f"{a[:, i].mean():.4f} ± {a[:, i].std(ddof=1) if len(a) > 1 else 0:.4f}" for i in range(3)]
        rows.append([task, method, config, len(a), *fmt, f"{np.exp(np.log(a[:, 3]).mean()):.3g}"])
    return rows


def main(argv: list[str]) -> int:
    roots = [Path(a) for a in argv] or [Path("results")]
    headers = ["task", "method", "prior", "n", "NLL", "ECE", "OOD AUROC (entropy)", "prior precision (geo. mean)"]
    print(tabulate(summarise(roots), headers=headers, tablefmt="github"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
