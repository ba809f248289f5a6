"""``bench perf regvar`` on the tiny task: both methods timed as a run fits them, stacked vs loop."""

from __future__ import annotations

import json
import math

import pytest

from bench.errors import BenchError
from bench_methods.regvar import perf as perf_regvar


@pytest.mark.slow
def test_perf_regvar_reports_per_query_seconds_for_both_methods(tiny_task: str, capsys: pytest.CaptureFixture[str]):
    argv = ["--tasks", tiny_task, "--queries", "3", "--rows", f"{tiny_task}=400", "--loop", "--amortized", "--json"]
    assert perf_regvar.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    entry = out["tasks"][tiny_task]
    assert entry["rows"] == 400 and entry["rows_all"] == 1000
    assert entry["regvar"]["weights"] == "all" and entry["regvar-ll"]["weights"] == "last-layer"
    for m in ("regvar", "regvar-ll"):
        r = entry[m]
        assert r["queries"] == 3 and r["n_train"] == 400
        assert r["per_query_s"] > 0 and r["cg_iterations_mean"] >= 1
        assert r["per_query_s_full_rows"] == pytest.approx(r["per_query_s"] * 1000 / 400)
        assert r["stacking_speedup"] == pytest.approx(r["loop_per_query_s"] / r["per_query_s"])
    assert math.isfinite(entry["amortized_vs_map"]["ratio"])


def test_perf_regvar_prints_one_line_per_task_and_method(tiny_task: str, capsys: pytest.CaptureFixture[str]):
    assert perf_regvar.main(["--tasks", tiny_task, "--queries", "2", "--methods", "regvar-ll"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "s/query" in line]
    assert len(lines) == 1 and "regvar-ll" in lines[0] and "last-layer" in lines[0]
    with pytest.raises(BenchError, match="--methods"):
        perf_regvar.main(["--tasks", tiny_task, "--methods", "laplace"])
