"""bench.ranking: t-intervals, best-of-column with a paired test, mean ranks."""

from __future__ import annotations

import pytest
from scipy import stats

from bench.paired import Interval
from bench.ranking import best_of_column, mean_ranks, summarize


def test_summary_is_the_scipy_t_interval() -> None:
    values = [0.21, 0.25, 0.22]
    s = summarize(values)
    low, high = stats.t.interval(0.95, 2, loc=sum(values) / 3, scale=stats.sem(values))
    assert s.mean == pytest.approx((low + high) / 2) and s.half_width == pytest.approx((high - low) / 2)
    assert summarize([0.3]).half_width == 0.0 and summarize([0.3]).n == 1


@pytest.mark.parametrize(("low", "high", "significant"), [(-0.02, -0.01, True), (-0.02, 0.01, False)])
def test_best_is_significant_only_when_the_paired_interval_says_so(low: float, high: float, significant: bool) -> None:
    seen = []

    def compare(a: str, b: str) -> dict[str, Interval]:
        seen.append((a, b))
        return {"cls/nll": Interval((low + high) / 2, low, high)}

    best = best_of_column({"a": 0.30, "b": 0.25, "c": 0.26}, -1, "cls/nll", compare)
    assert best is not None and best.methods == ("b",) and best.significant is significant
    assert seen == [("b", "c")]  # against the runner-up
    assert best_of_column({"a": 0.3}, 1, "cls/acc", compare).significant is False
    tie = best_of_column({"z": 0.9, "a": 0.9, "c": 0.5}, 1, "cls/acc", compare)
    assert tie == type(tie)(("a", "z"), False)  # exact ties: every tied row, never significant
    assert best_of_column({"a": 0.3, "b": 0.2}, 0, "timings/fit_s", compare) is None


def test_mean_ranks_average_over_tasks_and_share_ties() -> None:
    ranks = mean_ranks({"t1": {"a": 0.9, "b": 0.8, "c": 0.8}, "t2": {"a": 0.7, "b": 0.7, "c": 0.9}}, direction=1)
    assert ranks == {"a": (1.75, 2), "b": (2.5, 2), "c": (1.75, 2)}  # b, c tie at 2.5 in t1; a, b in t2


def test_mean_ranks_cover_only_methods_run_on_every_task() -> None:
    """c ran on t1 only: it is left out, and t1 ranks a and b among themselves (not behind c)."""
    ranks = mean_ranks({"t1": {"a": 0.9, "b": 0.8, "c": 0.95}, "t2": {"a": 0.7, "b": 0.9}}, direction=1)
    assert ranks == {"a": (1.5, 2), "b": (1.5, 2)}
