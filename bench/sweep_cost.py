"""``bench cost``: what a results folder cost to compute, summed from its run records.

Each run's own parts (data loading, the method's fit, prediction) count once per run; each
trained network (the MAP, ensemble members) counts once per (task, seed, member), however many
runs loaded it from the cache, at the seconds the run that trained it recorded. Core-hours weigh
each part by the threads the process had (``torch_threads`` in the record's provenance). Feature
embedding that happened outside a run's timed loading (a warm cache) is not in any record.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from dataclasses import dataclass, field

from bench.errors import BenchError
from bench.record import RunRecord
from bench.results import intact_record, iter_runs

NETWORKS = "(networks: MAP, members)"


@dataclass
class Cost:
    """Wall seconds and core-seconds of one group of runs."""

    runs: int = 0
    wall_s: float = 0.0
    core_s: float = 0.0
    networks: set[tuple[str, int, int]] = field(default_factory=set)

    def add(self, seconds: float, threads: int) -> None:
        self.wall_s += seconds
        self.core_s += seconds * threads


def _threads(record: RunRecord) -> int:
    machine = record.provenance.machine if record.provenance is not None else {}
    return int(machine.get("torch_threads") or 1)


def sweep_cost(records: list[RunRecord], by: str = "task") -> dict[str, Cost]:
    """Cost per group (``by``: task or method), plus ``"all"``; networks counted once each (grouped
    by task, or as their own ``NETWORKS`` row when grouped by method: runs share them)."""
    groups: dict[str, Cost] = defaultdict(Cost)
    trained: dict[tuple[str, int, int, str], tuple[float, int]] = {}
    for record in records:
        assert record.costs is not None
        key = record.task if by == "task" else record.method
        threads = _threads(record)
        for cost in (groups[key], groups["all"]):
            cost.runs += 1
            cost.add(record.costs.run_s, threads)
        for net in record.costs.networks:
            ident = (record.task, record.seed, net.member, net.variant)
            if net.seconds is not None and ident not in trained:
                trained[ident] = (net.seconds, net.threads or threads)
                for cost in (groups[key if by == "task" else NETWORKS], groups["all"]):
                    cost.add(*trained[ident])
                    cost.networks.add(ident)
    return dict(groups)


def cmd_cost(args: argparse.Namespace) -> int:
    """Print the folder's cost per task (or method) and in all: wall hours and core-hours."""
    from tabulate import tabulate

    paths = iter_runs(args.results)
    records = [r for r in (intact_record(p) for p in paths) if r is not None and r.ok and r.costs is not None]
    if not records:
        raise BenchError(f"no finished runs under {args.results / 'runs'}; give the results folder (--results)")
    groups = sweep_cost(records, by=args.by)
    rows = [[name, c.runs, len(c.networks), c.wall_s / 3600, c.core_s / 3600]
            for name, c in sorted(groups.items(), key=lambda item: (item[0] == "all", item[0]))]
    print(tabulate(rows, headers=[args.by, "runs", "networks trained", "wall h (one process)", "core-hours"],
                   tablefmt="github", floatfmt=".2f"))
    skipped = len(paths) - len(records)
    print(f"{len(records)} finished run(s) summed" + (f"; {skipped} unreadable or failed left out" if skipped else "")
          + ". Wall h is the sum over runs in one process; a sweep with --jobs J takes about that / J.")
    return 0
