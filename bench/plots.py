"""``bench plot``: cost against quality, reliability diagrams, OOD score histograms, the
amortized RegVar NLL contour and, for runs on a shift-intensity suite, metrics against intensity.

Everything is drawn from the run files (JSON + npz) alone, like the leaderboard.
"""

from __future__ import annotations

import argparse
import io
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bench.cells import is_paired, is_subset  # noqa: E402
from bench.data.shift_suite import CORRUPTIONS, PARAMETERS, ROTATE, parse_set_name  # noqa: E402
from bench.derived_rows import is_derived  # noqa: E402
from bench.errors import BenchError  # noqa: E402
from bench.leaderboard import collect, warn_damaged  # noqa: E402
from bench.metrics.calibration import N_BINS  # noqa: E402
from bench.metrics.registry import SCORES, auroc_key, confidence_bins, parse_auroc_key, shift_key, shift_sets_in  # noqa: E402
from bench.prediction_arrays import TEST, PredictionArrays, ood_set  # noqa: E402
from bench.ranking import summarize  # noqa: E402
from bench.record import RunRecord  # noqa: E402
from bench.results import (  # noqa: E402
    atomic_write_bytes,
    ensure_writable,
    intact_pair,
    iter_runs,
    read_predictions,
    read_record,
)

REGVAR_GRID_KEY = "validation_nll_grid"  # {"lambdas": [...], "scales": [...], "nll": [[...]]}
# (metric inside a shift set's keys, the clean test set's key, axis label, its range: bands are clipped to it)
INTENSITY_METRICS = (("acc", "cls/acc", "accuracy ↑", (0.0, 1.0)), ("ece", "cal/ece", "ECE ↓", (0.0, 1.0)),
                     ("nll", "cls/nll", "NLL (nats) ↓", (0.0, np.inf)))
MIN_INTENSITIES = 3  # shifted levels a curve needs (so fashion-mnist's default two rotations draw none)


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS):
    """Count, accuracy and mean confidence per bin, binned as ECE bins them."""
    conf, correct = probs.max(1), (probs.argmax(1) == labels)
    idx = confidence_bins(conf, n_bins)
    counts = np.bincount(idx, minlength=n_bins)
    acc = np.bincount(idx, weights=correct, minlength=n_bins) / np.maximum(counts, 1)
    mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / np.maximum(counts, 1)
    return counts, acc, mean_conf


def _first_seed_runs(root: Path) -> dict[str, dict[str, Path]]:
    """task → method → path of the lowest-seed successful run."""
    runs: dict[str, dict[str, tuple[int, Path]]] = defaultdict(dict)
    for path in iter_runs(root):
        record = intact_pair(path, path.with_suffix(".npz"))
        if record is None or not record.ok or not _readable(path, record):  # damaged: listed, not plotted
            continue
        current = runs[record.task].get(record.method)
        if current is None or current[0] > record.seed:
            runs[record.task][record.method] = (record.seed, path)
    return {task: {m: path for m, (_, path) in methods.items()} for task, methods in runs.items()}


def _readable(path: Path, record: RunRecord) -> bool:
    try:
        read_predictions(path, record)
    except BenchError:
        return False
    return True


def _arrays(path: Path) -> PredictionArrays:
    """A run's checked prediction arrays (a damaged file is a one-line error naming it)."""
    return read_predictions(path, read_record(path))


def _save(fig: plt.Figure, path: Path) -> Path:
    """Render to memory, then write atomically: a failed or interrupted plot leaves no half PNG."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 4)
    return (n + cols - 1) // cols, cols


def plot_reliability(task: str, methods: dict[str, Path], out: Path) -> Path:
    rows, cols = _grid(len(methods))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    edges = np.linspace(0, 1, N_BINS + 1)
    for ax, (method, path) in zip(axes.flat, sorted(methods.items()), strict=False):
        data = _arrays(path)
        counts, acc, conf = reliability_bins(data.probs(TEST).astype(np.float64), data.labels(TEST))
        filled = counts > 0
        ax.bar(edges[:-1][filled], acc[filled], width=1 / N_BINS, align="edge", color="#4C72B0",
               edgecolor="white", label="accuracy")
        ax.bar(edges[:-1][filled], conf[filled] - acc[filled], bottom=acc[filled], width=1 / N_BINS,
               align="edge", color="#DD8452", alpha=0.5, label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ece = float(np.sum(counts * np.abs(acc - conf)) / counts.sum())
        ax.set_title(f"{method}\nECE {ece:.3f}, n = {int(counts.sum())}", fontsize=9)  # n: capped methods
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"Reliability on {task} test set ({N_BINS} equal-width bins)")
    fig.tight_layout()
    return _save(fig, out / f"reliability_{task}.png")


def best_ood_score(record: RunRecord, ood: str) -> str:
    """The score with the highest AUROC of the run on ``ood`` (entropy when it has no other)."""
    aurocs = {p[1]: v for k, v in record.metrics.items() if (p := parse_auroc_key(k)) and p[0] == ood}
    return max(sorted(aurocs), key=aurocs.__getitem__) if aurocs else "entropy"


def _score_values(data: PredictionArrays, where: str, score: str) -> np.ndarray:
    """A score of every input of a set: one the harness computes from the probabilities (as
    ``bench.metrics`` does), or one the method stored."""
    if score in SCORES and (from_probs := SCORES.get(score).from_probs) is not None:
        import torch

        return from_probs(torch.from_numpy(data.probs(where))).numpy()
    return np.asarray(data.scores(where)[score], dtype=np.float64)


def plot_ood_histograms(task: str, methods: dict[str, Path], out: Path) -> list[Path]:
    """Per OOD set, each method's in-distribution and OOD histograms of its best-detecting score
    (the one with its highest AUROC, named), on a log axis where the score spans decades."""
    paths = []
    first = _arrays(next(iter(methods.values())))
    ood_sets = first.ood_names()
    for ood in ood_sets:
        rows, cols = _grid(len(methods))
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
        for ax, (method, path) in zip(axes.flat, sorted(methods.items()), strict=False):
            data, record = _arrays(path), read_record(path)
            score = best_ood_score(record, ood)
            if not data.has(ood_set(ood)):
                ax.axis("off")
                continue
            v_in, v_out = _score_values(data, TEST, score), _score_values(data, ood_set(ood), score)
            both = np.concatenate([v_in, v_out])
            logged = bool(both.min() > 0 and both.max() / both.min() > 100)
            edges = (np.geomspace(both.min(), both.max(), 40) if logged
                     else np.linspace(both.min(), max(both.max(), both.min() + 1e-6), 40))
            ax.hist(v_in, bins=edges, alpha=0.6, density=True, label="in-distribution test")
            ax.hist(v_out, bins=edges, alpha=0.6, density=True, label=f"OOD: {ood}")
            if logged:
                ax.set_xscale("log")
            auroc = record.metrics.get(auroc_key(ood, score), float("nan"))
            ax.set_title(f"{method}\nAUROC {auroc:.3f} (n = {len(v_in)} / {len(v_out)})", fontsize=9)
            ax.set_xlabel(score, fontsize=8)
        for ax in list(axes.flat)[len(methods):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        fig.suptitle(f"{task}: each method's best OOD score (highest AUROC), test vs {ood}")
        fig.tight_layout()
        paths.append(_save(fig, out / f"ood_hist_{task}_{ood}.png"))
    return paths


def plot_regvar_contour(task: str, path: Path, out: Path) -> Path | None:
    record = read_record(path)
    grid = record.method_summary.get(REGVAR_GRID_KEY)
    if not grid:
        return None
    try:  # null (a non-finite NLL, see bench.results.dumps_json) reads back as NaN
        lambdas, scales = np.asarray(grid["lambdas"], float), np.asarray(grid["scales"], float)
        nll = np.asarray(grid["nll"], float)
        i, j = np.unravel_index(np.nanargmin(nll), nll.shape)
    except (KeyError, TypeError, ValueError) as exc:
        raise BenchError(f"result file {path}: its {REGVAR_GRID_KEY} is damaged ({exc}); rerun that run") from None
    fig, ax = plt.subplots(figsize=(5, 4))
    cs = ax.contourf(np.log10(scales), np.log10(lambdas), nll, levels=20, cmap="viridis")
    fig.colorbar(cs, ax=ax, label="validation NLL (nats)")
    # Not clipped: the chosen point is often on the grid's edge (e.g. the smallest scale).
    ax.plot(np.log10(scales[j]), np.log10(lambdas[i]), "r*", ms=12, label="chosen", clip_on=False, zorder=5)
    ax.set_xlabel("log10 variance scale s")
    ax.set_ylabel("log10 λ")
    ax.set_title(f"{record.method} on {task}: validation NLL")
    ax.legend()
    fig.tight_layout()
    return _save(fig, out / f"regvar_contour_{task}_{record.method}.png")


def _cost(run: dict[str, float]) -> tuple[float, bool]:
    """Seconds a run cost (training its networks + post-hoc fit + predicting 1,000 inputs) and
    whether the training part is known (runs recorded before the cache stored training costs lack it)."""
    known = "costs/train_s" in run
    total = run.get("costs/train_s", 0.0) + run["costs/fit_posthoc_s"] + run["costs/predict_per_1k_s"]
    return total, known


def plot_cost_quality(task: str, runs: dict[str, list[dict[str, float]]], out: Path) -> Path:
    """NLL and ECE against cost (log seconds), one numbered point per full-set method (mean over
    seeds, bars the 95 % t-interval; hollow: the training cost is unknown, so the point sits too
    far left), the legend beside the axes, and the cost-quality Pareto front drawn. The y range
    covers the bulk of the rows: a row far above it is drawn on the top edge as a triangle."""
    methods = [m for m in sorted(runs) if not is_paired(m) and not is_derived(m) and not is_subset(runs[m])]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    colours = plt.get_cmap("tab20")
    for ax, key, label in zip(axes, ("cls/nll", "cal/ece"), ("test NLL (nats) ↓", "test ECE ↓"), strict=True):
        points = {}
        for method in methods:
            costs = [_cost(r) for r in runs[method]]
            s = summarize([r[key] for r in runs[method]])
            points[method] = (summarize([c for c, _ in costs]).mean, s.mean, s.half_width, all(k for _, k in costs))
        low, top, margin = _y_range(np.array([p[1] for p in points.values()]))
        for i, (method, (x, y, half, known)) in enumerate(points.items()):
            above = y > top
            ax.errorbar(x, min(y, top + margin), yerr=None if above else half, fmt="^" if above else "o", ms=7,
                        capsize=3, color=colours(i % 20), mfc="none" if not known else colours(i % 20),
                        label=f"{i + 1} {method}" + (f" ({y:.3g}, off the axis)" if above else ""), clip_on=False)
            ax.annotate(str(i + 1), (x, min(y, top + margin)), textcoords="offset points", xytext=(4, 3), fontsize=7)
        front = _pareto_front([(x, y) for x, y, _, _ in points.values()])
        if len(front) > 1:
            ax.step(*zip(*front, strict=True), where="post", color="0.6", lw=1, ls="--", zorder=0,
                    label="Pareto front (cheaper and better)" if key == "cls/nll" else None)
        ax.set_ylim(max(0.0, low - margin), top + margin)
        xs = [p[0] for p in points.values() if p[0] > 0]
        if xs and max(xs) / min(xs) > 10:  # a log axis only where costs span a decade: it labels cleanly
            ax.set_xscale("log")
        scale = ", log" if ax.get_xscale() == "log" else ""
        ax.set_xlabel(f"cost: training + post-hoc fit + predict 1,000 inputs (s{scale})")
        ax.set_ylabel(label)
    axes[1].legend(*axes[0].get_legend_handles_labels(), fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(f"{task}: quality against cost (mean over seeds; hollow: training cost not recorded)")
    fig.tight_layout()
    return _save(fig, out / f"cost_quality_{task}.png")


def _y_range(ys: np.ndarray) -> tuple[float, float, float]:
    """(lowest, highest shown, margin): the highest of the rows within 4× the lower three
    quarters' spread above their top; a row far above would squash the rest into a line."""
    if not len(ys):
        return 0.0, 1.0, 0.05
    low, q3 = np.percentile(ys, [0, 75])
    top = float(ys[ys <= q3 + 4 * (q3 - low)].max())
    return float(low), top, 0.05 * max(top - float(low), 1e-9)


def _pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both cost and quality (lower is better), by cost."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points):
        if not front or y < front[-1][1]:
            front.append((x, y))
    return front


def intensity_sets(runs: dict[str, list[dict[str, float]]]) -> dict[str, dict[float, str | None]]:
    """kind → intensity → shift set name (None: the clean test set), for every kind with at least
    ``MIN_INTENSITIES`` shifted levels. Intensity 0 is ``rotate-0`` when the runs hold it (the same
    images as every other suite set, unshifted), else the clean test set."""
    names = shift_sets_in((k for rows in runs.values() for r in rows for k in r), "acc")
    found: dict[str, dict[float, str | None]] = defaultdict(dict)
    for name in names:
        if parsed := parse_set_name(name):
            found[parsed[0]][parsed[1]] = name
    reference = "rotate-0" if "rotate-0" in names else None
    order = [ROTATE, *CORRUPTIONS]
    return {kind: {0.0: reference, **found[kind]} for kind in sorted(found, key=order.index)
            if sum(1 for i in found[kind] if i > 0) >= MIN_INTENSITIES}


def intensity_curve(rows: list[dict[str, float]], sets: dict[float, str | None], metric: str,
                    clean_key: str) -> tuple[list[float], list[float], list[float]]:
    """Intensities, means over seeds and 95 % t half-widths; a level no seed has is left out."""
    xs, means, halves = [], [], []
    for intensity, name in sorted(sets.items()):
        key = clean_key if name is None else shift_key(name, metric)
        values = [r[key] for r in rows if key in r]
        if values:
            s = summarize(values)
            xs.append(intensity)
            means.append(s.mean)
            halves.append(s.half_width)
    return xs, means, halves


def plot_shift_intensity(task: str, runs: dict[str, list[dict[str, float]]], out: Path) -> list[Path]:
    """Accuracy, ECE and NLL against shift intensity (Ovadia et al. 2019), a row per kind of shift,
    one line per method (mean over seeds, band: 95 % t-interval). No figure (``[]``) for a task
    whose runs hold no suite. Derived and paired rows are left out: they would double the lines."""
    kinds = intensity_sets(runs)
    methods = sorted(m for m in runs if not is_paired(m) and not is_derived(m))
    if not kinds or not methods:
        return []
    colours = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    fig, axes = plt.subplots(len(kinds), 3, figsize=(12, 2.9 * len(kinds) + 1.2), squeeze=False)
    for row, (kind, sets) in zip(axes, kinds.items(), strict=True):
        for ax, (metric, clean_key, label, (low, high)) in zip(row, INTENSITY_METRICS, strict=True):
            for i, method in enumerate(methods):
                xs, mean, half = map(np.asarray, intensity_curve(runs[method], sets, metric, clean_key))
                ax.plot(xs, mean, "o-", ms=3, lw=1.3, color=colours(i), label=method)
                band = np.clip(mean - half, low, high), np.clip(mean + half, low, high)  # few seeds: wide
                ax.fill_between(xs, *band, color=colours(i), alpha=0.15, lw=0)
            ax.set_ylabel(label)
            ax.set_title(f"{kind}: {label.split()[0]}", fontsize=9)
            if kind == ROTATE:
                ax.set_xlabel("rotation angle (degrees)")
                ax.set_xticks(np.arange(0, 181, 30))
            else:
                values = CORRUPTIONS[kind]
                ax.set_xlabel(f"{kind} severity ({PARAMETERS[kind]} {values[0]:g} … {values[-1]:g})")
                ax.set_xticks(sorted(sets))
    handles, labels = axes[0, 0].get_legend_handles_labels()
    ncol = min(len(methods), 5)
    legend_h = 0.25 * ((len(methods) + ncol - 1) // ncol) / fig.get_figheight()
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    reference = "rotate-0, the suite's images unshifted" if next(iter(kinds.values()))[0.0] else "the clean test set"
    fig.suptitle(f"{task}: metrics against shift intensity (mean over seeds, band: 95 % t-interval; "
                 f"intensity 0: {reference})", fontsize=10)
    fig.tight_layout(rect=(0, legend_h + 0.01, 1, 1 - 0.4 / fig.get_figheight()))
    return [_save(fig, out / f"shift_intensity_{task}.png")]


def cmd_plot(args: argparse.Namespace) -> int:
    root: Path = args.results
    runs = _first_seed_runs(root)
    if not runs:
        raise BenchError(f"no successful runs under {root}/runs; run `python -m bench sweep` first")
    out = root / "plots"
    ensure_writable(out)
    written: list[Path] = []
    found = collect(root)
    warn_damaged(found)
    table = found.table
    for task, methods in sorted(runs.items()):
        written.append(plot_cost_quality(task, table[task], out))
        written.append(plot_reliability(task, methods, out))
        written += plot_ood_histograms(task, methods, out)
        written += plot_shift_intensity(task, table[task], out)
        for method, path in methods.items():
            if method.startswith("regvar") and (p := plot_regvar_contour(task, path, out)):
                written.append(p)
    for p in written:
        print(p)
    return 0
