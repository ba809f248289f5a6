"""The leaderboard's statistics: intervals over seeds, which mean is best, and mean ranks.

Each cell is a mean over seeds with its 95 % t-interval. A column's best mean is bold only when
a paired bootstrap over the shared inputs (``bench.paired``) says it beats the runner-up;
otherwise it is in italics, a tie. The aggregate table ranks the full-set rows of every task per
metric and averages the ranks over tasks (ties share their mean rank).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from scipy.stats import rankdata, t

from bench.paired import Interval

LEVEL = 0.95


@dataclass(frozen=True)
class Summary:
    """Mean over n seeds and the half-width of its t-interval (0 for one seed)."""

    mean: float
    half_width: float
    n: int
    std: float


def summarize(values: list[float]) -> Summary:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    half = float(t.ppf(0.5 + LEVEL / 2, n - 1)) * std / math.sqrt(n) if n > 1 else 0.0
    return Summary(mean, half, n, std)


@dataclass(frozen=True)
class Best:
    """The rows sharing the best mean of a column, and whether that mean is significantly ahead
    of the runner-up (never, when several rows share it)."""

    methods: tuple[str, ...]
    significant: bool


def best_of_column(
    means: dict[str, float], direction: int, key: str, compare: Callable[[str, str], dict[str, Interval]]
) -> Best | None:
    """The row(s) with the best mean; ``compare(a, b)`` gives paired intervals of a − b."""
    if not direction or not means:
        return None
    order = sorted(means, key=lambda m: (-direction * means[m], m))
    top = tuple(m for m in order if means[m] == means[order[0]])
    if len(top) > 1 or len(order) == 1:
        return Best(top, False)
    return Best(top, ahead(compare(order[0], order[1]).get(key), direction))


def ahead(interval: Interval | None, direction: int) -> bool:
    """A paired interval of a − b puts a significantly ahead of b (``direction`` +1: higher is
    better, -1: lower is better); an unknown interval puts nobody ahead."""
    if interval is None:
        return False
    return interval.low > 0 if direction > 0 else interval.high < 0


def mean_ranks(
    per_task: dict[str, dict[str, float]], direction: int
) -> dict[str, tuple[float, int]]:
    """method → (mean rank over the tasks, number of tasks); rank 1 is best. Only methods present
    on every task are ranked, each task ranking just those: a mean of ranks over different sets
    of tasks, or among different rivals, compares nothing."""
    ranks: dict[str, list[float]] = {}
    common = set.intersection(*(set(means) for means in per_task.values())) if per_task else set()
    for means in per_task.values():
        methods = sorted(common)
        if not methods:
            continue
        order = rankdata([-direction * means[m] for m in methods])
        for m, r in zip(methods, order, strict=True):
            ranks.setdefault(m, []).append(float(r))
    return {m: (sum(r) / len(r), len(r)) for m, r in ranks.items()}


def difference_cell(diff: float, low: float, high: float) -> str:
    """``diff [low, high]`` in four decimals, or in two significant digits when four decimals
    would print a nonzero interval as ``+0.0000`` (a bold zero reads as a contradiction)."""
    fmt = "+.4f" if max(abs(low), abs(high)) >= 5e-5 or (low == high == 0.0) else "+.1e"
    return f"{diff:{fmt}} [{low:{fmt}}, {high:{fmt}}]"
