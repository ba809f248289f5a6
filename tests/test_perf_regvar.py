"""``bench perf regvar`` on the tiny task: both arms run, report what was timed, and agree."""

from __future__ import annotations

import json
import math

import pytest

from bench.perf import regvar as perf_regvar


@pytest.mark.parametrize("weights", ["all", "last-layer"])
def test_perf_regvar_reports_both_ratios_and_batched_equals_loop(
    tiny_task: str, weights: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--task", tiny_task, "--inputs", "64", "--repeats", "1", "--fit-steps", "2", "--queries", "3",
            "--steps", "4", "--weights", weights, "--optimizer", "lbfgs", "--json"]
    assert perf_regvar.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["per_input_weights"] == weights
    amortized, per_input = out["amortized_vs_map"], out["per_input_batched_vs_loop"]
    assert amortized["inputs"] == 64
    assert math.isfinite(amortized["ratio"]) and amortized["ratio"] > 0
    assert per_input["queries"] == 3 and per_input["steps"] == 4
    assert per_input["speedup"] == pytest.approx(per_input["loop_s_per_query"] / per_input["batched_s_per_query"])
    # Same fits in both arms: the stacked solve must reproduce the one-at-a-time estimates.
    assert per_input["max_rel_diff_batched_vs_loop"] < 1e-3
