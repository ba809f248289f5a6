"""Order and time-left estimates for a sweep, from the times of earlier runs.

A parallel sweep ends when its last worker does. In grid order a long run (Laplace on
Fashion-MNIST: minutes, against seconds for most runs; per-input RegVar there once took 25 min)
can start last and leave the other cores idle for its whole length, so the grid is scheduled
longest-first (LPT, within 4/3 of the best makespan). Run lengths come from earlier results of
the same method, task and smoke flag: in the sweep's own results root, then in the committed
leaderboard's. The time left uses this sweep's measured lengths once it has them (``TimeLeft``):
a plain runs-per-second rate gets it badly wrong when runs differ 1000×.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Hashable, Sequence
from pathlib import Path

from bench.record import RunRecord
from bench.results import run_paths

DEFAULT_HISTORY = Path("results")


def recorded_seconds(path: Path, smoke: bool) -> float | None:
    """Wall seconds of one finished run with this smoke flag, from its result file, as if it had
    trained every network it needs (a run that loads them from the cache is shorter; one that
    counted only what that run happened to train estimated a first sweep's ensemble at seconds,
    and the ratios of the time left blew up 100-fold). None when there is no such run (missing,
    failed, corrupt or of the other flag)."""
    try:
        record = RunRecord.from_json(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None  # no usable history for this run: it is scheduled as an unknown
    if not record.ok or record.config.smoke != smoke:
        return None
    return record.costs.run_s + (record.costs.train_s or 0.0)


def estimate_seconds(
    task: str, method: str, smoke: bool, roots: Sequence[Path], seeds: Sequence[int] = range(10)
) -> float | None:
    """Mean recorded time of ``method`` on ``task`` (seeds 0-9, same smoke flag) in the first
    root that has any; None when no root does."""
    for root in roots:
        recorded = (recorded_seconds(run_paths(root, task, method, seed)[0], smoke) for seed in seeds)
        times = [t for t in recorded if t is not None]
        if times:
            return statistics.fmean(times)
    return None


def fill_unknown(estimates: Sequence[float | None]) -> list[float]:
    """Unknown lengths are taken as the longest known one (so they start early: an unknown
    long run started last is the costly mistake), or 1 when nothing is known."""
    known = [e for e in estimates if e is not None]
    default = max(known) if known else 1.0
    return [default if e is None else max(e, 1e-3) for e in estimates]


def longest_first(weights: Sequence[float]) -> list[int]:
    """Indices of ``weights`` in decreasing order; ties keep their grid order."""
    return sorted(range(len(weights)), key=lambda i: -weights[i])


class TimeLeft:
    """Time left in a sweep: the unfinished runs' expected lengths over the workers.

    A run's expected length is the mean measured length of the finished runs with the same key
    (method and task) in this sweep; for a key not yet seen, its estimate from earlier results
    times the median measured/estimated ratio so far (the code or the machine may have changed
    since those results: the median keeps one rewritten method from skewing the rest).
    """

    def __init__(self, keys: Sequence[Hashable], estimates: Sequence[float], workers: int) -> None:
        self.keys, self.estimates, self.workers = list(keys), list(estimates), max(1, workers)
        self.left = set(range(len(self.keys)))
        self.measured: dict[Hashable, list[float]] = {}
        self.ratios: list[float] = []

    def finished(self, i: int, seconds: float) -> None:
        self.left.discard(i)
        self.measured.setdefault(self.keys[i], []).append(seconds)
        self.ratios.append(seconds / self.estimates[i])

    def expected(self, i: int) -> float:
        if seen := self.measured.get(self.keys[i]):
            return statistics.fmean(seen)
        return self.estimates[i] * (statistics.median(self.ratios) if self.ratios else 1.0)

    def seconds(self) -> float:
        return sum(self.expected(i) for i in self.left) / self.workers
