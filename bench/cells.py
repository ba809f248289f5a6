"""A leaderboard cell: a row's figure over seeds and the marks the paired tests give it.

One implementation for the markdown leaderboard (``bench.tables``) and the site (``bench.site``),
so both show the same numbers and the same bold, italics and †.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from bench.ranking import best_of_column, summarize

if TYPE_CHECKING:
    from bench.leaderboard import Collected

MEMORY_KEY = "memory/peak_mib"
LOWER_BOUND_KEY = "memory/peak_is_lower_bound"  # present (1.0) in a run whose figure may undercount
LOWER_BOUND_MARK = "≥"
DIFFERS_MARK = "†"
# A method evaluated on a subset (its cost cap) is shown beside this method's predictions cut to
# the same inputs and seed, so that the comparison is paired: a 100-input subset can differ from
# the full test set by more than the methods differ from each other.
PAIRED_REFERENCE = "map"
PAIRED_MARK = "⊂"

Column = tuple[str, str, int]  # (title, key, direction): +1 higher is better, -1 lower, 0 not ranked


def paired_label(method: str) -> str:
    return f"{PAIRED_REFERENCE} {PAIRED_MARK} {method}"


def is_paired(label: str) -> bool:
    """A derived row (the reference cut to a capped method's subset), not a run file."""
    return PAIRED_MARK in label


def is_subset(runs: list[dict[str, float]]) -> bool:
    """Rows evaluated on a subset of the inputs (a capped method, or its ``map ⊂`` partner)."""
    return any(r.get("subset") for r in runs)


def ranked_rows(runs: dict[str, list[dict[str, float]]]) -> list[str]:
    """Rows evaluated on the full sets, sorted: the only ones ranked (bold, ranks)."""
    return sorted(m for m, rs in runs.items() if not is_paired(m) and not is_subset(rs))


def spread_text(values: list[float]) -> str:
    """A cost or memory cell: the median over seeds [lowest, highest] (identical runs' times and
    peaks vary too much for a t-interval)."""
    spread = f" [{_figure(min(values))}, {_figure(max(values))}]" if len(values) > 1 else ""
    return _figure(float(np.median(values))) + spread


def cell_text(runs: list[dict[str, float]], key: str) -> str:
    """A row's cell for ``key``: mean ± 95 % half-width over the runs that have it; "≥" before a
    memory figure that is a lower bound (``bench.record.Memory.settled``)."""
    values = [r[key] for r in runs if key in r]
    bound = f"{LOWER_BOUND_MARK} " if key == MEMORY_KEY and any(LOWER_BOUND_KEY in r for r in runs) else ""
    if key.startswith(("memory", "costs")):
        return bound + spread_text(values)
    s = summarize(values)
    return bound + f"{s.mean:.4f}" + (f" ± {s.half_width:.4f}" if s.n > 1 else "")


def _figure(x: float) -> str:
    """A cost or memory figure to about three significant digits, without an exponent."""
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.3g}"


@dataclass(frozen=True)
class Mark:
    """One cell as shown: its figure, how many seeds it covers when fewer than its row's, and
    its marks (``best``: "bold" when the paired test puts it ahead of the runner-up, "italic"
    for the best mean in a tie)."""

    text: str
    mean: float | None = None  # for sorting; None: no run of the row has the metric
    seeds: int | None = None  # set only when fewer than the row's seeds have the metric
    differs: bool = False  # † : differs from the reference on the same inputs
    best: str = ""
    note: str = ""  # e.g. the OOD score a headline cell shows

    def plain(self) -> str:
        """The cell's text without emphasis: figure, n, †, note."""
        n = f" (n={self.seeds})" if self.seeds is not None else ""
        mark = f" {DIFFERS_MARK}" if self.differs else ""
        note = f" ({self.note})" if self.note else ""
        return f"{self.text}{n}{mark}{note}"

    def markdown(self) -> str:
        cell = self.plain()
        return f"**{cell}**" if self.best == "bold" else f"*{cell}*" if self.best == "italic" else cell


MISSING = Mark("–")


def task_marks(task: str, found: Collected, columns: list[Column]) -> dict[str, dict[str, Mark]]:
    """label → key → the cell of every row of ``task``: † against the reference for every
    full-set row (a capped row against the reference cut to its subset), the column's best
    full-set mean bold or italic."""
    runs = found.table[task]
    ranked = ranked_rows(runs)
    best = {}
    for _, key, direction in columns:
        means = {m: summarize([r[key] for r in runs[m] if key in r]).mean
                 for m in ranked if any(key in r for r in runs[m])}
        if len(means) > 1:
            best[key] = best_of_column(means, direction, key, lambda a, b: found.compare(task, a, b))
    out: dict[str, dict[str, Mark]] = {}
    for label, row in runs.items():
        compared = not is_paired(label) and label != PAIRED_REFERENCE and (task, PAIRED_REFERENCE) in found.arrays
        vs_ref = found.compare(task, label, PAIRED_REFERENCE) if compared else {}
        out[label] = {}
        for _, key, _ in columns:
            values = [r[key] for r in row if key in r]
            if not values:
                out[label][key] = MISSING
                continue
            win = best.get(key)
            emphasis = "" if win is None or label not in win.methods else "bold" if win.significant else "italic"
            out[label][key] = Mark(cell_text(row, key), summarize(values).mean,
                                   len(values) if len(values) < len(row) else None,
                                   key in vs_ref and vs_ref[key].excludes_zero(), emphasis)
    return out
