"""``bench cost``: a results folder's wall time and core-hours, networks counted once."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from conftest import make_record

from bench.cli import main
from bench.record import NetworkCost, Provenance
from bench.results import dumps_json
from bench.sweep_cost import NETWORKS, sweep_cost


def _map_run(threads: int = 2):
    """The same task and seed's MAP run: it loads member 0, which the ensemble run also used."""
    record = make_record([NetworkCost(0, False, 10.0, "cpu", threads)])
    return dataclasses.replace(record, method="map",
                               provenance=Provenance("abc", {}, {"device": "cpu", "torch_threads": threads}))


def test_each_network_counts_once_and_core_seconds_weigh_threads() -> None:
    ensemble, single = make_record(), _map_run()  # ensemble: own 6.5 s, networks 10 + 11 + 12 s on 1 thread
    groups = sweep_cost([ensemble, single], by="task")
    assert groups["all"].runs == 2 and groups["all"].networks == {("t", 1, 0, ""), ("t", 1, 1, ""), ("t", 1, 2, "")}
    assert groups["all"].wall_s == pytest.approx(6.5 + 33.0 + 6.5)  # member 0 once, at the first record's 10 s
    assert groups["all"].core_s == pytest.approx(6.5 + 33.0 + 6.5 * 2)  # the MAP run's own parts on 2 threads
    by_method = sweep_cost([ensemble, single], by="method")
    assert by_method[NETWORKS].wall_s == pytest.approx(33.0) and by_method["map"].wall_s == pytest.approx(6.5)


def test_cost_command_prints_hours_and_refuses_an_empty_folder(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "runs" / "t" / "ensemble"
    run_dir.mkdir(parents=True)
    (run_dir / "seed1.json").write_text(dumps_json(make_record().to_json()))
    assert main(["cost", "--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| all"))
    assert [cell.strip() for cell in row.strip("|").split("|")][1:] == ["1", "3", "0.01", "0.01"]  # 39.5 s
    assert main(["cost", "--results", str(tmp_path / "nothing")]) == 2
    assert "no finished runs" in capsys.readouterr().err
