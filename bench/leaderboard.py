"""``bench table``: the leaderboard, rebuilt from run files alone.

Metrics are recomputed from each run's ``.npz`` of raw predictions (so a change to a metric
shows up without rerunning anything); timings and memory come from its JSON. Cells are
mean ± std over seeds; the best mean per column is in bold.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from tabulate import tabulate

from bench.errors import BenchError
from bench.metrics import evaluate
from bench.paired import N_BOOT, Interval, paired_intervals
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

# (column title, key, direction): +1 higher is better, -1 lower is better, 0 not ranked.
BASE_COLUMNS = [
    ("Acc ↑", "cls/acc", 1),
    ("NLL ↓", "cls/nll", -1),
    ("ECE ↓", "cal/ece", -1),
    ("Brier ↓", "cls/brier", -1),
]
COST_COLUMNS = [
    ("MAP train s", "timings/map_train_s", 0),
    ("fit s", "timings/fit_s", 0),
    ("predict s/1k", "timings/predict_per_1k_s", 0),
    ("peak MiB", "memory/peak_mib", 0),
]
OWN_SCORES = ("variance", "mutual_info")
# A method evaluated on a subset (its cost cap) is shown beside this method's predictions cut to
# the same inputs and seed, so that the comparison is paired: a 100-input subset can differ from
# the full test set by more than the methods differ from each other.
PAIRED_REFERENCE = "map"
PAIRED_MARK = "⊂"
FLAG_MARK = "⚑"
# Memory kinds whose figures do not measure a peak: "cpu_rss_growth" (records before the
# kernel's high-water mark was used) was growth over the block's start inside reused
# processes, 0 whenever an earlier peak was higher. Shown "–", never as that 0.
UNMEASURED_MEMORY = {"cpu_rss_growth"}


def paired_label(method: str) -> str:
    return f"{PAIRED_REFERENCE} {PAIRED_MARK} {method}"


def is_paired(label: str) -> bool:
    """A derived row (the reference cut to a capped method's subset), not a run file."""
    return PAIRED_MARK in label


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
        self.paired: dict[tuple[str, str], dict[str, Interval]] = {}  # capped (task, method) → Δ vs map


def collect(root: Path) -> Collected:
    """task → method → list of per-seed flat dicts; plus the failed runs and older-format files."""
    out = Collected()
    table = out.table
    references: dict[tuple[str, int], dict[str, Any]] = {}
    capped: list[tuple[str, str, int, dict[str, Any], dict[str, np.ndarray]]] = []
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
        if record["method"] == PAIRED_REFERENCE:
            references[(record["task"], record["seed"])] = arrays
        if indices := subset_indices(arrays):
            capped.append((record["task"], record["method"], record["seed"], indices, arrays))
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
    pairs: dict[tuple[str, str], list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]] = defaultdict(list)
    for task, method, seed, indices, arrays in capped:
        reference = references.get((task, seed))
        if reference is None:
            continue
        cut = restrict(reference, indices)
        flat = dict(evaluate(**unpack_predictions(cut)))
        flat["seed"] = seed
        flat["subset"] = len(indices.get("test", ()))
        table[task][paired_label(method)].append(flat)
        pairs[(task, method)].append((arrays, cut))
    out.paired = {key: paired_intervals(p) for key, p in sorted(pairs.items())}
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


def columns_for(runs: dict[str, list[dict[str, float]]]) -> list[tuple[str, str, int]]:
    keys = set().union(*(r.keys() for rs in runs.values() for r in rs))
    cols = list(BASE_COLUMNS)
    for ood in sorted({k.split("/")[1] for k in keys if k.startswith("ood/")}):
        cols.append((f"AUROC {ood} (entropy) ↑", f"ood/{ood}/auroc/entropy", 1))
        for own in OWN_SCORES:
            if f"ood/{ood}/auroc/{own}" in keys:
                cols.append((f"AUROC {ood} ({own}) ↑", f"ood/{ood}/auroc/{own}", 1))
    for shift in sorted({k.split("/")[1] for k in keys if k.startswith("shift/")}):
        cols.append((f"{shift} Acc ↑", f"shift/{shift}/acc", 1))
        cols.append((f"{shift} NLL ↓", f"shift/{shift}/nll", -1))
        cols.append((f"{shift} ECE ↓", f"shift/{shift}/ece", -1))
    return cols + COST_COLUMNS


def _stats(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


def _fmt(mean: float, std: float, n: int, key: str) -> str:
    digits = 1 if key.startswith(("memory", "timings")) else 4
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if n > 1 else "")


def render(
    table: dict[str, dict[str, list[dict[str, float]]]],
    failed: list[dict[str, Any]],
    flags: dict[tuple[str, str], list[tuple[int, str]]] | None = None,
    paired: dict[tuple[str, str], dict[str, Interval]] | None = None,
) -> tuple[str, str]:
    """The markdown and CSV texts; a flagged run (grid edge, solver) marks its row with FLAG_MARK;
    capped rows get a table of paired bootstrap intervals of their difference from the MAP."""
    flags, paired = flags or {}, paired or {}
    md = ["# Leaderboard", "",
          "Generated by `python -m bench table` from `results/runs/` alone; do not edit by hand.",
          "Mean ± std over seeds (n = seeds); **bold** = best mean in the column. ECE: top-label,",
          "15 equal-width bins, L1. NLL in nats. OOD AUROC: OOD is the positive class; the score",
          "is named in the column. Times are seconds on the machine in each run's JSON. MAP train s: the",
          "shared MAP network's training; fit s: the method's fit plus the training of any further networks",
          "(ensemble members), both charged whether the networks were trained or loaded from the cache",
          "(– : a run recorded before the cache stored training costs; rerun it to fill the cell). peak MiB:",
          "on CPU the peak resident memory of fit or predict above the RSS after data loading (– : recorded",
          "by an older bench that could not measure it), on a GPU the CUDA peak allocated.",
          f"{FLAG_MARK} = a run of that row carries a warning flag (listed under its table).", ""]
    csv_buffer = io.StringIO()
    writer = csv.writer(csv_buffer, lineterminator="\n")
    writer.writerow(["task", "method", "n_seeds", "metric", "mean", "std"])
    for task in sorted(table):
        runs = table[task]
        cols = columns_for(runs)
        stats = {
            m: {key: _stats([r[key] for r in rs if key in r]) for _, key, _ in cols if any(key in r for r in rs)}
            for m, rs in runs.items()
        }
        best: dict[str, float] = {}
        full_set = {m for m, rs in runs.items() if not any(r.get("subset") for r in rs)}
        for _, key, direction in cols:
            means = [s[key][0] for m, s in stats.items() if key in s and m in full_set]
            if direction and means:
                best[key] = max(means) if direction > 0 else min(means)
        rows = []
        for method in sorted(runs):
            n = len(runs[method])
            row = [f"{method} {FLAG_MARK}" if flags.get((task, method)) else method, n]
            for _, key, _ in cols:
                if key not in stats[method]:
                    row.append("–")
                    continue
                mean, std = stats[method][key]
                cell = _fmt(mean, std, n, key)
                cell = f"{cell} {FLAG_MARK}" if flags.get((task, method)) else cell
                row.append(f"**{cell}**" if key in best and mean == best[key] and len(runs) > 1 else cell)
                writer.writerow([task, method, n, key, repr(mean), repr(std)])
            rows.append(row)
        md += [f"## {task}", "", tabulate(rows, headers=["method", "n", *[c[0] for c in cols]],
                                          tablefmt="github", disable_numparse=True), ""]
        capped = sorted({(m, int(r["subset"])) for m, rs in runs.items() for r in rs if r.get("subset")
                         and not is_paired(m)})
        notes = [f"- {FLAG_MARK} {m}, seed {seed}: {flag}" for m in sorted(runs)
                 for seed, flag in sorted(flags.get((task, m), []))]
        notes += [f"- {m}: evaluated on a subset of {k} inputs per evaluation set (its cost cap), drawn per "
                  "seed and stratified by label where the set has labels; "
                  f"compare it with `{paired_label(m)}`, the {PAIRED_REFERENCE} predictions on the same "
                  "inputs and seeds. Subset rows are not ranked (no bold)."
                  for m, k in capped]
        md += notes + ([""] if notes else [])
        md += _paired_table(task, {m: iv for (t, m), iv in paired.items() if t == task}, writer)
    if failed:
        md += ["## Failed runs", ""]
        md += [f"- {r['task']} / {r['method']} / seed {r['seed']}: {r.get('error', '?')}" for r in failed]
        md.append("")
    return "\n".join(md), csv_buffer.getvalue()


def _paired_table(task: str, paired: dict[str, dict[str, Interval]], writer: Any) -> list[str]:
    """Markdown lines of Δ = method − map on the same inputs with 95 % paired bootstrap CIs."""
    if not paired:
        return []
    keys = sorted({k for iv in paired.values() for k in iv}, key=lambda k: (not k.startswith("cls"), k))
    rows = []
    for method, intervals in sorted(paired.items()):
        row = [method]
        for key in keys:
            iv = intervals.get(key)
            if iv is None:
                row.append("–")
                continue
            cell = f"{iv.diff:+.4f} [{iv.low:+.4f}, {iv.high:+.4f}]"
            row.append(f"**{cell}**" if iv.excludes_zero() else cell)
            for name, value in (("diff", iv.diff), ("ci_low", iv.low), ("ci_high", iv.high)):
                writer.writerow([task, method, "", f"vs_{PAIRED_REFERENCE}/{key}/{name}", repr(value), ""])
        rows.append(row)
    return [f"Difference from `{PAIRED_REFERENCE}` on the same inputs (method − {PAIRED_REFERENCE}, mean over "
            f"seeds) with its 95 % paired bootstrap interval ({N_BOOT} resamples of every set, the same draw "
            "for both); **bold** = the interval excludes 0.", "",
            tabulate(rows, headers=["method", *[f"Δ {k}" for k in keys]], tablefmt="github",
                     disable_numparse=True), ""]


def cmd_table(args: argparse.Namespace) -> int:
    root: Path = args.results
    if not (root / "runs").is_dir():
        raise BenchError(f"no runs under {root}/runs; run `python -m bench run ...` or `bench sweep` first")
    if not args.check:
        ensure_writable(root)  # before reading every run, not after
    found = collect(root)
    md, csv_text = render(found.table, found.failed, found.flags, found.paired)
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
