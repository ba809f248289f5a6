"""``bench.schedule``: run-length estimates from earlier results, longest-first order, time left."""

from __future__ import annotations

import heapq
import json
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import make_record

from bench.record import NetworkCost
from bench.results import run_paths
from bench.schedule import TimeLeft, estimate_seconds, fill_unknown, longest_first, recorded_seconds


def _write_run(root: Path, task: str, method: str, seed: int, seconds: dict, smoke: bool = False) -> Path:
    """A record whose only time is ``fit_posthoc_s`` (and ``seconds``' other cost fields)."""
    record = make_record(networks=[])
    record.config.smoke = smoke
    zero = {"data_s": 0.0, "fit_posthoc_s": 0.0, "predict_test_s": 0.0, "predict_other_s": 0.0}
    record.costs = replace(record.costs, **{**zero, **seconds})
    path, _ = run_paths(root, task, method, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record.to_json()))
    return path


def test_recorded_seconds_sums_the_wall_time_parts_only(tmp_path: Path) -> None:
    path = _write_run(tmp_path, "t", "m", 0, {"data_s": 1.0, "fit_posthoc_s": 10.0, "predict_test_s": 3.0,
                                              "predict_other_s": 4.0, "predict_per_1k_s": 300.0})
    assert recorded_seconds(path, smoke=False) == pytest.approx(18.0)
    assert recorded_seconds(path, smoke=True) is None  # a smoke run says nothing about a full one


def test_recorded_seconds_count_every_network_the_run_needs_trained_or_loaded(tmp_path: Path) -> None:
    path = _write_run(tmp_path, "t", "m", 0, {"networks": [NetworkCost(0, False, 2.0), NetworkCost(1, True, 5.0)]})
    assert recorded_seconds(path, smoke=False) == pytest.approx(7.0)  # as long as a first sweep's run


@pytest.mark.parametrize("content", ["", "{not json", '{"status": "failed", "error": "x"}', "[]"])
def test_unusable_records_give_no_estimate(tmp_path: Path, content: str) -> None:
    path, _ = run_paths(tmp_path, "t", "m", 0)
    path.parent.mkdir(parents=True)
    path.write_text(content)
    assert recorded_seconds(path, smoke=False) is None
    assert recorded_seconds(tmp_path / "missing.json", smoke=False) is None


def test_estimate_is_the_seed_mean_of_the_first_root_with_history(tmp_path: Path) -> None:
    out, history = tmp_path / "out", tmp_path / "history"
    _write_run(history, "t", "m", 0, {"fit_posthoc_s": 10.0})
    _write_run(history, "t", "m", 2, {"fit_posthoc_s": 30.0})
    assert estimate_seconds("t", "m", False, [out, history]) == pytest.approx(20.0)
    _write_run(out, "t", "m", 1, {"fit_posthoc_s": 5.0})
    assert estimate_seconds("t", "m", False, [out, history]) == pytest.approx(5.0)
    assert estimate_seconds("t", "other", False, [out, history]) is None


def test_unknown_runs_count_as_the_longest_known() -> None:
    assert fill_unknown([3.0, None, 7.0]) == [3.0, 7.0, 7.0]
    assert fill_unknown([None, None]) == [1.0, 1.0]


def test_longest_first_keeps_grid_order_among_ties() -> None:
    assert longest_first([1.0, 5.0, 1.0, 5.0, 2.0]) == [1, 3, 4, 0, 2]


def _makespan(weights: list[float], workers: int) -> float:
    """Finish time of greedy list scheduling: each run goes to the first free worker."""
    free = [0.0] * workers
    for w in weights:
        heapq.heappush(free, heapq.heappop(free) + w)
    return max(free)


def test_longest_first_shortens_the_sweep_measured_in_grid_order() -> None:
    # Roughly the full sweep's shape: 3 long runs (RegVar on Fashion-MNIST) late in the grid.
    grid = [20.0] * 30 + [170.0] * 9 + [1600.0] * 3 + [20.0] * 30
    ordered = [grid[i] for i in longest_first(grid)]
    assert _makespan(grid, 2) > 1.1 * _makespan(ordered, 2)
    assert _makespan(ordered, 2) <= sum(grid) / 2 + 20.0  # balanced to within one short run


def test_time_left_uses_this_sweeps_measurements_over_stale_estimates() -> None:
    keys = ["a", "a", "b", "b", "c"]
    left = TimeLeft(keys, estimates=[100.0, 100.0, 10.0, 10.0, 40.0], workers=2)
    assert left.seconds() == pytest.approx(260.0 / 2)  # nothing measured: the estimates
    left.finished(0, 5.0)  # "a" now takes 5 s, 1/20 of its estimate
    assert left.expected(1) == pytest.approx(5.0)  # same key: measured
    assert left.expected(2) == pytest.approx(0.5)  # other keys: estimate × median ratio
    left.finished(2, 10.0)  # "b" as estimated: median ratio of 0.05 and 1.0
    assert left.expected(4) == pytest.approx(40.0 * 0.525)
    assert left.seconds() == pytest.approx((5.0 + 10.0 + 21.0) / 2)
    for i in (1, 3, 4):
        left.finished(i, 1.0)
    assert left.seconds() == 0.0
