"""``bench site``: a static leaderboard site (HTML), rebuilt from the run files alone.

Like OpenOOD's generated leaderboard: an index of tasks and methods, per task a sortable and
filterable table with its figures, a page per method and one per run (its configuration, costs,
provenance and the command that reproduces it). The numbers are the markdown leaderboard's
(``bench.leaderboard.collect`` and the cells of ``bench.tables``), not a second implementation.

The pages work offline from file:// (the one small hand-written script and the stylesheet are
shipped beside them, links are relative) and the build is deterministic (no timestamps, sorted
everywhere), so ``bench site --check`` can tell a stale site from a current one. ``MANIFEST.txt``
(sha256sum format) marks a folder as a site: only such a folder has stale files removed.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any
from urllib.parse import quote

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from bench.cells import MISSING, PAIRED_REFERENCE, Column, Mark, is_paired, is_subset, paired_label, task_marks
from bench.derived_rows import TUNED, UNTUNED, derived_label, is_derived
from bench.errors import BenchError
from bench.headline import headline_cell, headline_columns, headline_labels
from bench.leaderboard import Collected, collect, warn_damaged
from bench.metrics.registry import metric
from bench.record import RunRecord
from bench.reproduce import changed_options, registered_class, reproduce
from bench.results import ensure_writable, intact_record, iter_runs
from bench.site_files import MANIFEST, check_site, ensure_site_folder, manifest, write_site
from bench.tables import columns_for, csv_number, render, task_answers, task_notes

TEMPLATES = Path(__file__).with_name("site_templates")
STATIC = ("site.css", "site.js")  # copied verbatim into static/
CSV_FILE = "leaderboard.csv"
# The figures of ``bench plot`` (and any shift-intensity plots) that belong to a task, in page order.
PLOT_PATTERNS = ("reliability_{}.png", "ood_hist_{}_*.png", "cost_quality_{}.png", "regvar_contour_{}_*.png",
                 "shift_intensity_{}*.png")
LONG = 300  # characters of a nested value shown on a run page; the run's JSON has the rest
URL_SAFE = "/@=,"
NLL = metric("nll").test_key  # the index matrix's headline metric


# ---------------------------------------------------------------- table rows (numbers of bench.tables)


@dataclass(frozen=True)
class Cell:
    key: str
    text: str  # as the markdown leaderboard writes it, without emphasis; "–" when no run has the metric
    sort: str  # the mean, for sorting; "" when missing
    best: str  # "bold", "italic" or "" (``bench.cells.Mark``)


@dataclass(frozen=True)
class Row:
    label: str
    kind: str  # method (a run label), derived ([s=1] / [s tuned]) or subset (map ⊂ capped method)
    parent: str  # the row it sorts under: a derived row stays below its method's
    link: str | None  # the page of the method whose runs the row comes from
    n: int
    cells: list[Cell]
    flags: list[tuple[int, str]]
    devices: str


@dataclass(frozen=True)
class TaskTables:
    """A task page's tables: the headline, the full-set rows and the subset rows."""

    headline_titles: list[str]
    headline: list[Row]
    columns: list[Column]
    full: list[Row]
    subset: list[Row]


def cell(key: str, mark: Mark) -> Cell:
    """A table cell of the site: the markdown's cell (``bench.cells.Mark``) as text, emphasis and
    the mean it shows, for sorting (at CSV precision: no last-bit noise in the page)."""
    return Cell(key, mark.plain(), "" if mark.mean is None else csv_number(mark.mean), mark.best)


def row_kind(label: str) -> str:
    return "subset" if is_paired(label) else "derived" if is_derived(label) else "method"


def source_label(label: str) -> str:
    """The run label a table row's numbers come from (a derived row: its method; a paired
    subset row: the reference whose predictions it cuts)."""
    if is_paired(label):
        return PAIRED_REFERENCE
    for kind in (UNTUNED, TUNED):
        base = label.removesuffix(f" {kind}")
        if derived_label(base, kind) == label:
            return base
    return label


def _row(task: str, found: Collected, label: str, cells: list[Cell], methods: set[str]) -> Row:
    source = source_label(label)
    devices = "" if row_kind(label) != "method" else ", ".join(sorted(found.devices.get((task, label), ())))
    parent = source if row_kind(label) == "derived" else label
    return Row(label, row_kind(label), parent, method_page(source) if source in methods else None,
               len(found.table[task][label]), cells, sorted(found.flags.get((task, label), [])), devices)


def task_tables(task: str, found: Collected, methods: set[str], marks: dict[str, dict[str, Mark]]) -> TaskTables:
    """The task tables of the markdown leaderboard as data: headline, full-set and subset rows."""
    runs = found.table[task]
    columns = columns_for(runs)
    full, subset = [], []
    for label in sorted(runs):
        row = _row(task, found, label, [cell(key, marks[label][key]) for _, key, _ in columns], methods)
        (subset if is_paired(label) or is_subset(runs[label]) else full).append(row)
    heads = headline_columns(runs)
    headline = [_row(task, found, label, [cell(c.keys[0], headline_cell(runs[label], marks[label], c)) for c in heads],
                     methods) for label in headline_labels(runs)]
    return TaskTables([c.title for c in heads], headline, columns, full, subset)


# ---------------------------------------------------------------- the reproducing command


# ---------------------------------------------------------------- pages


def task_page(task: str) -> str:
    return f"task-{task}.html"


def task_json(task: str) -> str:
    """The task page's tables as data (``TaskTables``), for download."""
    return f"task-{task}.json"


def method_page(label: str) -> str:
    return f"method-{label}.html"


def run_page(task: str, label: str, seed: int) -> str:
    return f"runs/{task}/{label}/seed{seed}.html"


def show(value: Any) -> str:
    """A recorded value as a short line (a long nested one is cut; the run's JSON has it all)."""
    if isinstance(value, float):
        return format(value, ".6g")
    if isinstance(value, (dict, list)):
        text = json.dumps(value, sort_keys=True, ensure_ascii=False)
        return text if len(text) <= LONG else f"{text[:LONG]} … ({len(text)} characters; see the run's JSON)"
    return "–" if value is None else str(value)


def code_spans(text: str) -> Any:
    """A note of ``bench.tables.task_notes`` (markdown with `code`) as escaped HTML."""
    from markupsafe import Markup, escape

    parts = str(escape(text)).split("`")
    return Markup("".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts)))


def _environment() -> Environment:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["show"] = show
    env.filters["code_spans"] = code_spans
    env.filters["mib"] = _mib
    env.filters["caption"] = caption
    return env


class Renderer:
    """Renders templates into pages whose links are relative to where each page lies."""

    def __init__(self, tasks: list[str]) -> None:
        self.env = _environment()
        self.tasks = tasks
        self.files: dict[str, bytes] = {}

    def page(self, path: str, template: str, **context: Any) -> None:
        root = "../" * path.count("/")
        html = self.env.get_template(template).render(
            url=lambda target: root + quote(target, safe=URL_SAFE), task_page=task_page, method_page=method_page,
            task_json=task_json, csv_file=CSV_FILE,
            run_page=run_page, nav_tasks=self.tasks, **context)
        self.files[path] = html.encode()


# What each figure of ``bench plot`` shows, by the start of its file name (in PLOT_PATTERNS' order).
CAPTIONS = {
    "reliability_": "Reliability on the test set (seed 0): accuracy against confidence in 15 equal-width bins, "
                    "one panel per row; the gap to the diagonal is what ECE sums.",
    "ood_hist_": "In-distribution test inputs against the OOD set (seed 0): each method's best-detecting score "
                 "(its highest AUROC, named under the panel); well-separated histograms mean easy detection.",
    "cost_quality_": "Test NLL and ECE against cost (train + post-hoc fit + predict 1,000 inputs), mean over "
                     "seeds with 95 % t-intervals; the dashed line is the Pareto front (no row is both cheaper "
                     "and better); a triangle on the top edge is a row off the axis (its value in the legend).",
    "regvar_contour_": "Amortized RegVar's validation NLL over λ and the variance scale s; the star is the "
                       "chosen point.",
    "shift_intensity_": "Accuracy, ECE and NLL against shift intensity (mean over seeds, band: 95 % t-interval).",
}


def caption(name: str) -> str:
    return next((text for prefix, text in CAPTIONS.items() if name.startswith(prefix)), name)


def task_plots(results: Path, tasks: list[str]) -> dict[str, list[str]]:
    """task → the file names of its figures in ``results/plots``; a file that fits several
    tasks (``imdb`` and ``imdb-lora``) goes to the longest name."""
    plots = sorted(p.name for p in (results / "plots").glob("*.png"))
    out: dict[str, list[str]] = {t: [] for t in tasks}
    taken: set[str] = set()
    for task in sorted(tasks, key=lambda t: (-len(t), t)):
        for pattern in PLOT_PATTERNS:
            names = [n for n in plots if n not in taken and fnmatchcase(n, pattern.format(glob.escape(task)))]
            out[task] += names
            taken.update(names)
    return out


def nll_matrix(found: Collected, tasks: list[str], marks: dict[str, dict[str, dict[str, Mark]]]
               ) -> list[tuple[str, list[Cell]]]:
    """The index's method × task matrix on test NLL: every headline row, its task cells with the
    task tables' marks ("–" where it did not run)."""
    shown = {t: set(headline_labels(found.table[t])) for t in tasks}
    labels = sorted(set().union(*shown.values()))
    return [(label, [cell(NLL, marks[t][label][NLL] if label in shown[t] else MISSING) for t in tasks])
            for label in labels]


@dataclass(frozen=True)
class MethodAbout:
    """What the method page says about the method behind a label: the first paragraph of its
    class docstring, its citation and its options (default, this label's value, help)."""

    description: str
    citation: str
    options: list[tuple[str, str, str, str]]  # name, default, this label's value ("" if default), help


def method_about(label: str) -> MethodAbout | None:
    """None for a method not registered here."""
    import inspect

    cls = registered_class(label.partition("@")[0], "method")
    if cls is None:
        return None
    chosen = dict(item.split("=", 1) for item in label.partition("@")[2].split(",") if "=" in item)
    rows = []
    for f in dataclasses.fields(cls.Options):
        default = getattr(f.default, "value", f.default)
        rows.append((f.name, str(default), chosen.get(f.name, ""), f.metadata.get("help", "")))
    description = (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")
    return MethodAbout(description, cls.citation, rows)


def _method_tasks(found: Collected, label: str, marks: dict[str, dict[str, dict[str, Mark]]],
                  methods: set[str]) -> list[tuple[str, list[Column], list[Row]]]:
    """task → columns and the rows of the task table that come from ``label``'s runs (its own,
    derived, and the reference cut to its subset, its ``map ⊂`` partner)."""
    out = []
    for task in sorted(found.table):
        runs = found.table[task]
        columns = columns_for(runs)
        rows = [_row(task, found, lab, [cell(key, marks[task][lab][key]) for _, key, _ in columns], methods)
                for lab in sorted(runs)
                if (not is_paired(lab) and source_label(lab) == label) or lab == paired_label(label)]
        if rows:
            out.append((task, columns, rows))
    return out


def build_site(results: Path) -> dict[str, bytes]:
    """Every file of the site: relative path → content. Pure and deterministic: it reads the run
    files (and ``results/plots``) and writes nothing."""
    if not (results / "runs").is_dir():
        raise BenchError(f"no runs under {results}/runs; run `python -m bench run ...` or `bench sweep` first")
    found = collect(results)
    warn_damaged(found)
    records = [r for r in (intact_record(p) for p in iter_runs(results)) if r is not None and r.ok]
    if not records and not found.failed:
        raise BenchError(f"no run files under {results}/runs; run `python -m bench run ...` or `bench sweep` first")
    tasks = sorted(found.table)
    labels = sorted({r.method for r in records} | {r.method for r in found.failed})
    seeds: dict[tuple[str, str], list[int]] = {}
    for r in sorted(records, key=lambda r: (r.task, r.method, r.seed)):
        seeds.setdefault((r.task, r.method), []).append(r.seed)
    plots = task_plots(results, tasks)
    site = Renderer(tasks)
    marks = {task: task_marks(task, found, columns_for(found.table[task])) for task in tasks}
    site.page("index.html", "index.html", task_summary=[_task_summary(task, found, seeds) for task in tasks],
              matrix=nll_matrix(found, tasks, marks),
              method_summary=[(label, [(t, len(s)) for (t, m), s in sorted(seeds.items()) if m == label])
                              for label in labels],
              failed=found.failed, damaged=found.damaged,
              old_format=[p.relative_to(results).as_posix() for p in found.old_format])
    for task in tasks:
        tables = task_tables(task, found, set(labels), marks[task])
        site.files[task_json(task)] = (json.dumps(dataclasses.asdict(tables), indent=1, ensure_ascii=False,
                                                  sort_keys=True) + "\n").encode()
        notes = [line.removeprefix("- ") for line in task_notes(task, found) if line]
        answers = [line.removeprefix("- ").replace("**", "") for line in task_answers(task, found)]
        site.page(task_page(task), "task.html", task=task, tables=tables, notes=notes, answers=answers,
                  plots=plots[task], seeds=seeds, run_labels=[m for t, m in sorted(seeds) if t == task])
    for label in labels:
        failed = [r for r in found.failed if r.method == label]
        site.page(method_page(label), "method.html", label=label, about=method_about(label),
                  tasks=_method_tasks(found, label, marks, set(labels)), seeds=seeds, failed=failed)
    for record in records:
        site.page(run_page(record.task, record.method, record.seed), "run.html", r=record,
                  reproduction=reproduce(record), options=_option_rows(record), memory=_memory_rows(record),
                  costs=_cost_rows(record), provenance=_provenance_rows(record))
    files = dict(site.files)
    files[CSV_FILE] = render(found)[1].encode()  # the leaderboard's CSV, as `bench table` writes it
    files.update({f"static/{name}": (TEMPLATES / name).read_bytes() for name in STATIC})
    files.update({f"plots/{name}": (results / "plots" / name).read_bytes()
                  for names in plots.values() for name in names})
    files[MANIFEST] = manifest(files)
    return files


def _task_summary(task: str, found: Collected, seeds: dict[tuple[str, str], list[int]]) -> dict[str, Any]:
    return {"task": task, "rows": len(found.table[task]), "methods": sum(t == task for t, _ in seeds),
            "runs": sum(len(s) for (t, _), s in seeds.items() if t == task)}


def _option_rows(record: RunRecord) -> dict[str, list[tuple[str, Any, bool]]]:
    """method / task → (option, value, differs from today's default) for the run page."""
    cfg = record.config
    out = {}
    for kind, name, options in (("method", cfg.method, cfg.method_options), ("task", cfg.task, cfg.task_options)):
        cls = registered_class(name, kind)
        changed = changed_options(options, cls) if cls is not None else {}
        out[f"{kind} {name}"] = [(k, v, k in changed) for k, v in sorted(options.items())]
    return out


def _cost_rows(record: RunRecord) -> list[tuple[str, Any]]:
    c = record.costs
    return [("train s (all networks)", c.train_s), ("post-hoc fit s", c.fit_posthoc_s),
            ("predict s per 1,000 inputs", c.predict_per_1k_s), ("predict test set s", c.predict_test_s),
            ("predict other sets s", c.predict_other_s), ("data loading s", c.data_s),
            ("total s (as recorded)", c.total_s)]


def _provenance_rows(record: RunRecord) -> list[tuple[str, Any]]:
    """Git commit (and whether the tree was dirty) and the machine; [] for a record without them."""
    p = record.provenance
    if p is None:
        return []
    git = sorted((f"git {k}", v) for k, v in p.git.items()) if isinstance(p.git, dict) else [("git", p.git)]
    return git + sorted((f"machine {k}", v) for k, v in p.machine.items())


def _mib(n_bytes: int | None) -> float | None:
    return None if n_bytes is None else n_bytes / 2**20


def _memory_rows(record: RunRecord) -> list[tuple[str, Any]]:
    m = record.memory
    return [("kind", m.kind), ("peak MiB", _mib(m.peak_bytes)), ("fit peak MiB", _mib(m.fit_peak_bytes)),
            ("predict peak MiB", _mib(m.predict_peak_bytes)), ("baseline MiB", _mib(m.baseline_bytes)),
            ("runs in the process", m.runs_in_process),
            ("baseline settled", "yes" if m.settled else "no: the figures are lower bounds" if m.lower_bound else "–")]


def cmd_site(args: argparse.Namespace) -> int:
    root: Path = args.results
    out: Path = args.out if args.out is not None else root / "site"
    if not args.check:
        ensure_site_folder(out)
        ensure_writable(out)  # before reading every run, not after
    files = build_site(root)
    if args.check:
        problems = check_site(files, out)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            fix = "python -m bench site" + (f" --results {root}" if root != Path("results") else "") \
                + (f" --out {out}" if args.out is not None else "")
            print(f"bench: stale site: {problems[0]}{more}; run `{fix}`")
            return 1
        print(f"site up to date ({len(files)} files)")
        return 0
    write_site(files, out)
    print(f"wrote the site to {out} ({len(files)} files); open {out / 'index.html'}")
    return 0

