"""A task's headline table: one screen that answers "which method, at what cost".

At most eight figures per row: accuracy, NLL, ECE, one OOD AUROC per OOD set (the row's best
score on that set, named in the cell), the NLL on the task's hardest shift set, the total cost
and the peak memory. The cells and their marks are the full table's (``bench.cells``); only
full-set rows are shown, and ``[s=1]`` rows are left out (their method's own predictive again).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bench.answers import COST_KEYS
from bench.cells import MEMORY_KEY, MISSING, Mark, ranked_rows, spread_text
from bench.derived_rows import UNTUNED
from bench.metrics.registry import auroc_key, metric, ood_sets_in, shift_sets_in, shown_scores

HEADLINE_METRICS = ("acc", "nll", "ece")  # registered metrics on the test set
SHIFT_METRIC = "nll"  # the registered metric read on the hardest shift set
TOTAL_COST = "cost/total_s"  # a headline-only key: train + post-hoc fit + predict 1,000 inputs, per run


@dataclass(frozen=True)
class HeadlineColumn:
    title: str
    keys: tuple[str, ...]  # a row shows the one of these with its best mean (an OOD set's scores)
    direction: int


def headline_columns(runs: dict[str, list[dict[str, float]]]) -> list[HeadlineColumn]:
    keys = {k for rows in runs.values() for r in rows for k in r}
    out = [HeadlineColumn(f"{m.title} {m.arrow}", (m.test_key,), m.direction)
           for m in map(metric, HEADLINE_METRICS)]
    for ood in ood_sets_in(keys):
        scores = tuple(auroc_key(ood, s.name) for s in shown_scores() if auroc_key(ood, s.name) in keys)
        out.append(HeadlineColumn(f"AUROC {ood} (best score) ↑", scores, 1))
    on_shift = metric(SHIFT_METRIC)
    shifts = shift_sets_in(keys, on_shift.name)
    if shifts:
        hardest = max(shifts, key=lambda s: on_shift.direction * -_mean_over_rows(runs, on_shift.shift_key(s)))
        out.append(HeadlineColumn(f"{hardest} {on_shift.title} {on_shift.arrow} (hardest shift)",
                                  (on_shift.shift_key(hardest),), on_shift.direction))
    out.append(HeadlineColumn("cost s ↓", (TOTAL_COST,), -1))
    out.append(HeadlineColumn("peak MiB", (MEMORY_KEY,), 0))
    return out


def _mean_over_rows(runs: dict[str, list[dict[str, float]]], key: str) -> float:
    values = [r[key] for rows in runs.values() for r in rows if key in r]
    return float(np.mean(values)) if values else -np.inf


def headline_labels(runs: dict[str, list[dict[str, float]]]) -> list[str]:
    return [m for m in ranked_rows(runs) if not m.endswith(UNTUNED)]


def headline_cell(rows: list[dict[str, float]], marks: dict[str, Mark], column: HeadlineColumn) -> Mark:
    """A row's cell: the full table's cell of the column's key (for an OOD set, of the row's
    best score there, named), or the total cost over seeds."""
    if column.keys == (TOTAL_COST,):
        totals = [sum(r[k] for k in COST_KEYS) for r in rows if all(k in r for k in COST_KEYS)]
        return Mark(spread_text(totals), float(np.median(totals))) if totals else MISSING
    present = [k for k in column.keys if marks.get(k, MISSING).mean is not None]
    if not present:
        return MISSING
    key = max(present, key=lambda k: column.direction * marks[k].mean)
    mark = marks[key]
    if len(column.keys) == 1:
        return mark
    return Mark(mark.text, mark.mean, mark.seeds, mark.differs, mark.best, key.rsplit("/", 1)[1])
