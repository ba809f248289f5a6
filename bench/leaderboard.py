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

import numpy as np

from bench.cells import LOWER_BOUND_KEY, MEMORY_KEY, PAIRED_REFERENCE, is_paired, paired_label
from bench.derived_rows import UNTUNED, derive, derived_label, is_derived
from bench.errors import BenchError
from bench.method_api import OWN_PREDICTIVE_KEY, PROBIT_AT_1
from bench.metrics import evaluate
from bench.paired import Interval, Replicates, intervals, replicates
from bench.prediction_arrays import TEST, PredictionArrays
from bench.record import CALIBRATION_BINNING_SCHEMA, OLD_CALIBRATION_TOL, SCHEMA_VERSION, RunRecord
from bench.results import (
    atomic_write_bytes,
    ensure_writable,
    iter_failures,
    iter_runs,
    read_predictions,
    read_record,
)
from bench.tables import render, same_csv

# The JSON's metrics must come back from the npz to within this (they are computed from the
# same float64 arrays by the same code, so they normally agree exactly).
RECOMPUTE_TOL = 1e-9


def verify_metrics(path: Path, recorded: dict[str, float], recomputed: dict[str, float],
                   schema: int = SCHEMA_VERSION) -> None:
    """A run's JSON metrics equal those recomputed from its npz, else a one-line error. A metric
    registered after the run (a plugin's) is recomputed, not checked; one the npz cannot give is an error."""
    if missing := sorted(recorded.keys() - recomputed.keys()):
        raise BenchError(f"result file {path}: its metric {missing[0]} is not one this bench computes; load the "
                         "plugin that registers it (--plugin FILE) or rerun that run")
    for key, value in recorded.items():
        old_binning = schema < CALIBRATION_BINNING_SCHEMA and key.endswith(("/ece", "/mce"))
        if not abs(value - recomputed[key]) <= (OLD_CALIBRATION_TOL if old_binning else RECOMPUTE_TOL):
            raise BenchError(f"result file {path}: {key} is {value!r} but its predictions give "
                             f"{recomputed[key]!r}; rerun that run")

# A declared probit at s = 1 may differ from the stored Gaussian's by its float16 storage, not more.
DECLARED_ATOL = 1e-2


class Collected:
    """What the run files under a results root hold, ready to render."""

    def __init__(self) -> None:
        self.table: dict[str, dict[str, list[dict[str, float]]]] = defaultdict(lambda: defaultdict(list))
        self.failed: list[RunRecord] = []
        self.damaged: list[str] = []  # one line per run whose files could not be used (the rest go on)
        self.old_format: list[Path] = []  # schema 1: metrics not checkable
        self.devices: dict[tuple[str, str], set[str]] = defaultdict(set)  # where costs were measured
        self.same_as_own: dict[tuple[str, str], set[str]] = defaultdict(set)  # derived rows not repeated
        self.flags: dict[tuple[str, str], list[tuple[int, str]]] = defaultdict(list)  # (task, method) → (seed, flag)
        self.arrays: dict[tuple[str, str], dict[int, PredictionArrays]] = defaultdict(dict)  # → seed → npz
        self.indices: dict[tuple[str, str], dict[int, dict[str, np.ndarray]]] = defaultdict(dict)  # capped runs
        self._compared: dict[tuple[str, str, str], dict[str, Interval]] = {}
        self._boot: dict[tuple[str, str, int, str | None], Replicates] = {}

    def compare(self, task: str, a: str, b: str) -> dict[str, Interval]:
        """Paired bootstrap intervals of a − b on the inputs and seeds both were evaluated on
        (a capped ``a`` against ``b`` cut to its subset); empty if they share no seed."""
        key = (task, a, b)
        if key not in self._compared:
            seeds = sorted(self.arrays[(task, a)].keys() & self.arrays[(task, b)].keys())
            cut = a if (task, a) in self.indices else None
            pairs = [(self._replicates(task, a, s, None), self._replicates(task, b, s, cut)) for s in seeds]
            self._compared[key] = intervals(pairs) if pairs else {}
        return self._compared[key]

    def _replicates(self, task: str, label: str, seed: int, cut_by: str | None) -> Replicates:
        """A row's bootstrap replicates for one seed, on its own inputs or cut to ``cut_by``'s subset."""
        key = (task, label, seed, cut_by)
        if key not in self._boot:
            arrays = self.arrays[(task, label)][seed]
            cuts = self.indices[(task, cut_by)] if cut_by is not None else {}
            self._boot[key] = replicates(arrays.restrict(cuts[seed]) if seed in cuts else arrays, seed)
        return self._boot[key]


def collect(root: Path) -> Collected:
    """task → method → list of per-seed flat dicts; plus the failed runs and older-format files."""
    out = Collected()
    table = out.table
    for path in iter_runs(root):
        try:
            record = read_record(path)
            if not record.ok:
                out.failed.append(record)
                continue
            arrays = read_predictions(path, record)
            metrics = evaluate(**arrays.metric_inputs())
            if record.checkable:
                verify_metrics(path, record.metrics, metrics, record.schema)
        except BenchError as damaged:  # this run only: the others still make the table
            out.damaged.append(str(damaged))
            continue
        if not record.checkable:
            out.old_format.append(path)
        key = (record.task, record.method)
        out.arrays[key][record.seed] = arrays
        if indices := arrays.subset_indices():
            out.indices[key][record.seed] = indices
        table[record.task][record.method].append(
            {**metrics, **cost_cells(record), "seed": record.seed,
             "subset": record.data.evaluated_subsets.get("test", 0)})
        out.flags[key] += [(record.seed, f) for f in record.flags]
        if arrays.has_gaussian:
            _add_derived(out, record, arrays, indices)
        out.devices[key].add(str(record.provenance.machine.get("device", "?")) if record.provenance else "?")
    for path in iter_failures(root):
        record = read_record(path)
        if path.with_name(path.name.replace(".failed.json", ".json")).exists():
            record.error = f"{record.error} (the earlier result is kept)"
        out.failed.append(record)
    for (task, method), by_seed in sorted(out.indices.items()):
        if is_derived(method):  # same inputs as its method's own row, whose map ⊂ row serves both
            continue
        reference = out.arrays.get((task, PAIRED_REFERENCE), {})
        for seed, indices in sorted(by_seed.items()):
            if seed in reference:
                flat = dict(evaluate(**reference[seed].restrict(indices).metric_inputs()))
                flat["seed"] = seed
                flat["subset"] = len(indices.get("test", ()))
                table[task][paired_label(method)].append(flat)
    return out


def _add_derived(out: Collected, record: RunRecord, arrays: PredictionArrays,
                 indices: dict[str, np.ndarray]) -> None:
    """The run's ``[s=1]`` and ``[s tuned]`` rows (``bench.derived_rows``). A row that is the
    method's own predictive by definition (the run declares its probabilities the probit at s = 1,
    ``OWN_PREDICTIVE_KEY``) is not repeated, only named; so is one a run recorded before methods
    declared it gives to 1e-6. A declared identity that the stored Gaussian contradicts is flagged."""
    declared = record.method_summary.get(OWN_PREDICTIVE_KEY) == PROBIT_AT_1
    for kind, (derived, scale, flag) in derive(arrays).items():
        label = derived_label(record.method, kind)
        gap = float(np.abs(derived.probs(TEST) - arrays.probs(TEST)).max(initial=0.0))
        if kind == UNTUNED and declared and gap > DECLARED_ATOL:
            out.flags[(record.task, record.method)].append(
                (record.seed, f"its probabilities are declared the probit at s=1 of its stored logit Gaussian, "
                              f"but differ from it by up to {gap:.3g}"))
        if (kind == UNTUNED and declared) or (OWN_PREDICTIVE_KEY not in record.method_summary and gap <= 1e-6):
            out.same_as_own[(record.task, record.method)].add(kind)
            continue
        metrics = evaluate(**derived.metric_inputs())
        out.table[record.task][label].append({**metrics, "seed": record.seed, "subset": len(indices.get("test", ())),
                                              "scale": scale})
        out.arrays[(record.task, label)][record.seed] = derived
        if indices:
            out.indices[(record.task, label)][record.seed] = indices
        if flag:
            out.flags[(record.task, label)].append((record.seed, flag))


def cost_cells(record: RunRecord) -> dict[str, float]:
    """The cost columns a record can vouch for; an unknown one (a migrated old record) is left
    out and shown "–", never as the 0 it once recorded."""
    costs, memory = record.costs, record.memory
    cells = {"costs/fit_posthoc_s": costs.fit_posthoc_s, "costs/predict_per_1k_s": costs.predict_per_1k_s}
    if costs.train_s is not None:
        cells["costs/train_s"] = costs.train_s
    if memory.peak_bytes is not None:
        cells[MEMORY_KEY] = memory.peak_bytes / 2**20
        if memory.lower_bound:
            cells[LOWER_BOUND_KEY] = 1.0
    return cells


def warn_damaged(found: Collected) -> None:
    """One stderr line per run left out because its files are damaged (the rest go on)."""
    for line in found.damaged:
        print(f"bench: warning: damaged run left out: {line}", file=sys.stderr)


def cmd_table(args: argparse.Namespace) -> int:
    root: Path = args.results
    if not (root / "runs").is_dir():
        raise BenchError(f"no runs under {root}/runs; run `python -m bench run ...` or `bench sweep` first")
    if not args.check:
        ensure_writable(root)  # before reading every run, not after
    found = collect(root)
    warn_damaged(found)
    md, csv_text = render(found)
    md_path, csv_path = root / "leaderboard.md", root / "leaderboard.csv"
    old = (f"{len(found.old_format)} run file(s) (e.g. {found.old_format[0]}) were written by an older bench "
           f"(schema 1: float32 probabilities, no checksum), so their JSON metrics cannot be "
           "checked against their predictions; regenerate them (`python -m bench sweep --force`)"
           if found.old_format else "")
    if args.check:
        if found.damaged:
            print(f"bench: {len(found.damaged)} damaged run(s) (listed above); rerun them")
            return 1
        if old:  # checked first: it also explains tables that differ (metrics recomputed differently)
            print(f"bench: {old}")
            return 1
        stale = [p for p, text, same in ((md_path, md, str.__eq__), (csv_path, csv_text, same_csv))
                 if not p.exists() or not same(p.read_text(), text)]
        if stale:
            print(f"bench: stale tables: {', '.join(map(str, stale))}; run `python -m bench table`")
            return 1
        runs = sum(len(v) for t in found.table.values() for m, v in t.items() if not is_paired(m) and not is_derived(m))
        print(f"tables are up to date with {runs} runs, each run's JSON metrics recomputed from its npz")
        return 0
    if old:
        print(f"bench: note: {old}", file=sys.stderr)
    atomic_write_bytes(md_path, md.encode())
    atomic_write_bytes(csv_path, csv_text.encode())
    print(md)
    return 0
