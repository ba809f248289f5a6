"""``bench table``: the leaderboard, rebuilt from run files alone.

Metrics are recomputed from each run's ``.npz`` of raw predictions (so a change to a metric
shows up without rerunning anything); timings and memory come from its JSON. This module
collects and checks the runs; ``bench.tables`` renders them with their statistics.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from bench.errors import BenchError
from bench.metrics import evaluate
from bench.paired import Interval, paired_intervals
from bench.results import (
    SCHEMA_VERSION,
    atomic_write_bytes,
    ensure_writable,
    iter_failures,
    iter_runs,
    read_predictions,
    read_record,
    restrict,
    subset_indices,
    unpack_predictions,
)
from bench.tables import PAIRED_REFERENCE, is_paired, paired_label, render

# Memory kinds whose figures do not measure a peak: "cpu_rss_growth" (records before the
# kernel's high-water mark was used) was growth over the block's start inside reused
# processes, 0 whenever an earlier peak was higher. Shown "–", never as that 0.
UNMEASURED_MEMORY = {"cpu_rss_growth"}


# The JSON's metrics must come back from the npz to within this (they are computed from the
# same float64 arrays by the same code, so they normally agree exactly).
RECOMPUTE_TOL = 1e-9


def verify_metrics(path: Path, recorded: dict[str, float], recomputed: dict[str, float]) -> None:
    """A run's JSON metrics equal those recomputed from its npz, else a one-line error."""
    if recorded.keys() != recomputed.keys():
        diff = sorted(recorded.keys() ^ recomputed.keys())
        raise BenchError(f"result file {path}: its metrics and its predictions disagree on which metrics "
                         f"exist ({diff[0]}); rerun that run")
    for key, value in recorded.items():
        if not abs(value - recomputed[key]) <= RECOMPUTE_TOL:
            raise BenchError(f"result file {path}: {key} is {value!r} but its predictions give "
                             f"{recomputed[key]!r}; rerun that run")


class Collected:
    """What the run files under a results root hold, ready to render."""

    def __init__(self) -> None:
        self.table: dict[str, dict[str, list[dict[str, float]]]] = defaultdict(lambda: defaultdict(list))
        self.failed: list[dict[str, Any]] = []
        self.old_format: list[Path] = []  # schema < SCHEMA_VERSION: metrics not checkable
        self.flags: dict[tuple[str, str], list[tuple[int, str]]] = defaultdict(list)  # (task, method) → (seed, flag)
        self.arrays: dict[tuple[str, str], dict[int, dict[str, np.ndarray]]] = defaultdict(dict)  # → seed → npz
        self.indices: dict[tuple[str, str], dict[int, dict[str, np.ndarray]]] = defaultdict(dict)  # capped runs
        self._compared: dict[tuple[str, str, str], dict[str, Interval]] = {}

    def compare(self, task: str, a: str, b: str) -> dict[str, Interval]:
        """Paired bootstrap intervals of a − b on the inputs and seeds both were evaluated on
        (a capped ``a`` against ``b`` cut to its subset); empty if they share no seed."""
        key = (task, a, b)
        if key not in self._compared:
            mine, theirs = self.arrays[(task, a)], self.arrays[(task, b)]
            cuts = self.indices.get((task, a), {})
            pairs = [(mine[s], restrict(theirs[s], cuts[s]) if s in cuts else theirs[s])
                     for s in sorted(mine.keys() & theirs.keys())]
            self._compared[key] = paired_intervals(pairs) if pairs else {}
        return self._compared[key]


def collect(root: Path) -> Collected:
    """task → method → list of per-seed flat dicts; plus the failed runs and older-format files."""
    out = Collected()
    table = out.table
    for path in iter_runs(root):
        record = read_record(path)
        if record["status"] != "ok":
            out.failed.append(record)
            continue
        arrays = read_predictions(path, record)
        metrics = evaluate(**unpack_predictions(arrays))
        if record.get("schema", 1) >= SCHEMA_VERSION:
            verify_metrics(path, record["metrics"], metrics)
        else:
            out.old_format.append(path)
        out.arrays[(record["task"], record["method"])][record["seed"]] = arrays
        if indices := subset_indices(arrays):
            out.indices[(record["task"], record["method"])][record["seed"]] = indices
        flat = dict(metrics)
        flat.update(_known_costs(record["timings"]))
        flat["timings/predict_per_1k_s"] = record["timings"]["predict_per_1k_s"]
        mem = record["memory"]
        if mem["kind"] not in UNMEASURED_MEMORY:
            flat["memory/peak_mib"] = max(mem["fit_peak_bytes"], mem["predict_peak_bytes"]) / 2**20
        flat["seed"] = record["seed"]
        flat["subset"] = record.get("data", {}).get("evaluated_subsets", {}).get("test", 0)
        table[record["task"]][record["method"]].append(flat)
        out.flags[(record["task"], record["method"])] += [(record["seed"], f) for f in record.get("flags", [])]
    for path in iter_failures(root):
        record = read_record(path)
        kept = path.with_name(path.name.replace(".failed.json", ".json")).exists()
        out.failed.append({**record, "error": record["error"] + (" (the earlier result is kept)" if kept else "")})
    for (task, method), by_seed in sorted(out.indices.items()):
        reference = out.arrays.get((task, PAIRED_REFERENCE), {})
        for seed, indices in sorted(by_seed.items()):
            if seed in reference:
                flat = dict(evaluate(**unpack_predictions(restrict(reference[seed], indices))))
                flat["seed"] = seed
                flat["subset"] = len(indices.get("test", ()))
                table[task][paired_label(method)].append(flat)
    return out


def _known_costs(timings: dict[str, Any]) -> dict[str, float]:
    """The training and fit seconds a record can vouch for.

    Migration of records written before checkpoints stored their training cost
    (no ``train_costs_recorded``): a network loaded from the cache was charged 0 s there, so
    the MAP's training time and an ensemble's fit time (which includes its members' training)
    are unknown for them and left out (shown "–"), never shown as the 0 they recorded."""
    recorded = timings.get("train_costs_recorded", False)
    cached = set(timings.get("models_cached", []))
    out = {}
    if recorded or 0 not in cached:
        out["timings/map_train_s"] = timings["map_train_s"]
    if recorded or not cached - {0}:
        out["timings/fit_s"] = timings["fit_s"]
    return out


def cmd_table(args: argparse.Namespace) -> int:
    root: Path = args.results
    if not (root / "runs").is_dir():
        raise BenchError(f"no runs under {root}/runs; run `python -m bench run ...` or `bench sweep` first")
    if not args.check:
        ensure_writable(root)  # before reading every run, not after
    found = collect(root)
    md, csv_text = render(found)
    md_path, csv_path = root / "leaderboard.md", root / "leaderboard.csv"
    old = (f"{len(found.old_format)} run file(s) (e.g. {found.old_format[0]}) were written by an older bench "
           f"(schema < {SCHEMA_VERSION}: float32 probabilities, no checksum), so their JSON metrics cannot be "
           "checked against their predictions; regenerate them (`python -m bench sweep --force`)"
           if found.old_format else "")
    if args.check:
        if old:  # checked first: it also explains tables that differ (metrics recomputed differently)
            print(f"bench: {old}")
            return 1
        stale = [p for p, text in ((md_path, md), (csv_path, csv_text))
                 if not p.exists() or p.read_text() != text]
        if stale:
            print(f"bench: stale tables: {', '.join(map(str, stale))}; run `python -m bench table`")
            return 1
        runs = sum(len(v) for t in found.table.values() for m, v in t.items() if not is_paired(m))
        print(f"tables are up to date with {runs} runs, each run's JSON metrics recomputed from its npz")
        return 0
    if old:
        print(f"bench: note: {old}", file=sys.stderr)
    atomic_write_bytes(md_path, md.encode())
    atomic_write_bytes(csv_path, csv_text.encode())
    print(md)
    return 0
