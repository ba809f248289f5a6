"""``bench table``: metrics recomputed from the run files, paired rows for capped methods,
ranking and the staleness check."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_TASK

from bench.cli import main
from bench.record import CHECKSUM_KEY

CAPPED = '''
from bench.method_api import register_method
from bench_methods.map import MAP

@register_method("subset-map")
class SubsetMap(MAP):
    """The MAP evaluated on at most 40 inputs per set, like per-input RegVar."""
    eval_limit = 40
'''


def run_with_plugin(root: Path, source: str, methods: tuple[str, ...], seeds: tuple[str, ...] = ("0",)) -> Path:
    """Write plugin ``source`` under ``root``, run each method × seed on tiny-digits into ``root``."""
    plugin = root / "plugin.py"
    plugin.write_text(textwrap.dedent(source))
    for method in methods:
        for seed in seeds:
            assert main(["--plugin", str(TINY_TASK), "--plugin", str(plugin), "run", "--method", method,
                         "--task", "tiny-digits", "--out", str(root), "--quiet", "--seed", seed]) == 0
    return plugin


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("results")
    plugin = run_with_plugin(root, CAPPED, ("map", "subset-map"), ("0", "1"))
    assert main(["table", "--results", str(root)]) == 0
    return root, plugin


def rows(root: Path) -> dict[tuple[str, str], float]:
    with (root / "leaderboard.csv").open() as f:
        return {(r["method"], r["metric"]): float(r["mean"]) for r in csv.DictReader(f)}


@pytest.mark.slow
def test_capped_method_gets_a_paired_reference_on_its_own_subset(results: tuple[Path, Path]) -> None:
    table = rows(results[0])
    # subset-map is the MAP on a subset: the MAP cut to the same inputs must give the same numbers,
    # and (on 40 inputs) not those of the full test set.
    for metric in ("cls/acc", "cls/nll", "cal/ece", "ood/shuffled/auroc/entropy", "shift/noisy/nll"):
        assert table[("map ⊂ subset-map", metric)] == pytest.approx(table[("subset-map", metric)], abs=1e-12)
    assert table[("map ⊂ subset-map", "cls/nll")] != table[("map", "cls/nll")]
    md = (results[0] / "leaderboard.md").read_text()
    assert "compare it with `map ⊂ subset-map`" in md


def test_capped_rows_get_paired_bootstrap_intervals_against_the_map(results: tuple[Path, Path]) -> None:
    with (results[0] / "leaderboard.csv").open() as f:
        paired = {r["metric"]: float(r["mean"]) for r in csv.DictReader(f)
                  if r["method"] == "subset-map" and r["metric"].startswith("vs_map/")}
    # subset-map is the map on the same inputs: every difference and interval bound is exactly 0
    assert {"vs_map/cls/nll/diff", "vs_map/cal/ece/ci_low", "vs_map/ood/shuffled/auroc/entropy/ci_high"} <= set(paired)
    assert all(v == 0.0 for v in paired.values())
    md = (results[0] / "leaderboard.md").read_text()
    assert "95 % paired bootstrap interval" in md and "| subset-map | +0.0000 [+0.0000, +0.0000]" in md


def test_subset_rows_are_never_bold(results: tuple[Path, Path]) -> None:
    md = (results[0] / "leaderboard.md").read_text()
    subset_lines = [line for line in md.splitlines()  # the main table's rows, not the paired table's
                    if line.startswith(("| subset-map", "| map ⊂")) and "±" in line]  # paired rows have no ±
    assert len(subset_lines) == 2
    assert not any("**" in line for line in subset_lines)


def test_subset_rows_have_their_own_table_beside_their_map_rows(results: tuple[Path, Path]) -> None:
    md = (results[0] / "leaderboard.md").read_text()
    headline, rest = md.split("<summary>Full table", 1)
    full, after = rest.split("</details>", 1)
    subset = after.split("Subset rows", 1)[1].split("\n\n")[1]  # the table after its heading line
    assert "| map " in full and "subset-map" not in full and "subset-map" not in headline.split("**At a glance")[-1]
    assert [line.split("|")[1].strip() for line in subset.splitlines()[2:]] == ["map ⊂ subset-map", "subset-map ⚑"]


FLAGGED = '''
from bench.method_api import FLAGS_KEY, register_method
from bench_methods.map import MAP

@register_method("flagged-map")
class FlaggedMap(MAP):
    """The MAP, reporting a tuned value on its grid's floor."""
    def summary(self):
        return {**super().summary(), FLAGS_KEY: ["tuned s=0.0001 is on the floor of its grid"]}
'''


def test_a_flagged_run_marks_its_method_cell_once_and_is_listed(tmp_path: Path) -> None:
    run_with_plugin(tmp_path, FLAGGED, ("map", "flagged-map"))
    record = json.loads((tmp_path / "runs" / "tiny-digits" / "flagged-map" / "seed0.json").read_text())
    own = [f for f in record["flags"] if not f.startswith("MAP is NOT a certified")]  # tiny-digits has no finish
    assert own == ["tuned s=0.0001 is on the floor of its grid"]
    assert main(["table", "--results", str(tmp_path)]) == 0
    lines = (tmp_path / "leaderboard.md").read_text().splitlines()
    row = next(line for line in lines if line.startswith("| flagged-map"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "flagged-map ⚑" and not any("⚑" in c for c in cells[1:])  # once, on the method cell
    map_row = next(line for line in lines if line.startswith("| map "))  # flagged only for its uncertified MAP
    assert "- ⚑ map, seed 0: MAP is NOT a certified minimum of P" in "\n".join(lines) and "⚑" in map_row
    assert "- ⚑ flagged-map, seed 0: tuned s=0.0001 is on the floor of its grid" in lines


BLURRED = '''
from bench.method_api import register_method
from bench.types import Prediction
from bench_methods.map import MAP

@register_method("blurred-map")
class Blurred(MAP):
    """The MAP's probabilities mixed half-and-half with the uniform: worse NLL, same accuracy."""
    def predict(self, x):
        p = super().predict(x).probs
        return Prediction(0.5 * p + 0.5 / p.shape[1], {})
'''


@pytest.mark.slow
def test_statistics_intervals_significance_bold_and_mean_ranks(tmp_path: Path) -> None:
    run_with_plugin(tmp_path, BLURRED, ("map", "blurred-map"), ("0", "1"))
    assert main(["table", "--results", str(tmp_path)]) == 0
    lines = (tmp_path / "leaderboard.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| method ") and "NLL" in line)
    nll = [c.strip() for c in header.strip("|").split("|")].index("NLL ↓")
    acc = [c.strip() for c in header.strip("|").split("|")].index("Acc ↑")

    def cells(method: str) -> list[str]:
        row = next(line for line in lines if line.startswith(f"| {method} ") and "±" in line)
        return [c.strip() for c in row.strip("|").split("|")]

    assert cells("blurred-map")[nll].removesuffix(" ⚑").endswith("†") and "±" in cells("blurred-map")[nll]
    assert cells("map")[nll].startswith("**") and "†" not in cells("map")[nll]  # significantly best
    for method in ("map", "blurred-map"):  # the same argmax: an exact tie, both italic
        assert cells(method)[acc].startswith("*") and not cells(method)[acc].startswith("**")
    assert "†" not in cells("blurred-map")[acc]
    rank = lines.index("## Mean rank across tasks")
    ranks = {c[0]: c for c in ([x.strip() for x in line.strip("|").split("|")] for line in lines[rank:])
             if c[0] in ("map", "blurred-map")}
    assert ranks["map"][3] == "1.00" and ranks["blurred-map"][3] == "2.00"  # the NLL column
    nll_answer = next(line for line in lines if line.startswith("- **NLL**"))
    assert nll_answer.startswith("- **NLL**: `map` (") and "ahead of `blurred-map` by -" in nll_answer
    assert "a tie" not in nll_answer  # blurring costs NLL on every input: a significant lead
    with (tmp_path / "leaderboard.csv").open() as f:
        row = next(r for r in csv.DictReader(f) if r["method"] == "map" and r["metric"] == "cls/nll")
    assert float(row["ci95_half_width"]) > 0 and int(row["n_seeds"]) == 2


def test_check_passes_when_current_and_fails_when_stale(results: tuple[Path, Path]) -> None:
    root = results[0]
    assert main(["table", "--results", str(root), "--check"]) == 0
    md = root / "leaderboard.md"
    md.write_text(md.read_text().replace("subset-map", "edited-by-hand"))
    assert main(["table", "--results", str(root), "--check"]) == 1
    assert main(["table", "--results", str(root)]) == 0  # restore for the other tests


def _edit_first_number(text: str, change: Callable[[float], float]) -> str:
    rows = list(csv.reader(io.StringIO(text)))
    rows[1][4] = repr(change(float(rows[1][4])))
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue()


def test_check_ignores_last_digit_noise_in_the_csv_but_not_a_changed_number(results: tuple[Path, Path]) -> None:
    """CI failed once because a bootstrap bound differed in its 17th digit between two CPUs."""
    root = results[0]
    path = root / "leaderboard.csv"
    current = path.read_text()
    number = list(csv.reader(io.StringIO(current)))[1][4]
    assert len(number.replace(".", "").replace("-", "").lstrip("0").split("e")[0]) <= 10  # 10 digits written
    path.write_text(_edit_first_number(current, lambda v: v * (1 + 1e-15)))
    assert main(["table", "--results", str(root), "--check"]) == 0
    path.write_text(_edit_first_number(current, lambda v: v * (1 + 1e-4) + 1e-6))
    assert main(["table", "--results", str(root), "--check"]) == 1
    path.write_text(current)


# --- Every result file is checked; damage is one line naming the file ------------------

def _copy(results: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path, Path]:
    """A copy of the module's results; returns (root, a map run's JSON, its npz)."""
    root = tmp_path / "results"
    shutil.copytree(results[0], root)
    json_path = root / "runs" / "tiny-digits" / "map" / "seed0.json"
    return root, json_path, json_path.with_suffix(".npz")


def _rewrite_npz(json_path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Replace a run's npz and keep its JSON checksum right, so the arrays themselves are judged."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    json_path.with_suffix(".npz").write_bytes(buffer.getvalue())
    record = json.loads(json_path.read_text())
    record[CHECKSUM_KEY] = hashlib.sha256(buffer.getvalue()).hexdigest()
    json_path.write_text(json.dumps(record))


def _edit_json(json_path: Path, edit) -> None:
    record = json.loads(json_path.read_text())
    edit(record)
    json_path.write_text(json.dumps(record))


def _peak_cells(root: Path) -> dict[str, str]:
    """The peak-MiB cell of every row of the leaderboard's tables that have that column."""
    lines = (root / "leaderboard.md").read_text().splitlines()
    cells = {}
    for i, header in enumerate(lines):
        if not header.startswith("| method") or "peak MiB" not in header:
            continue
        column = [c.strip() for c in header.strip("|").split("|")].index("peak MiB")
        table = lines[i + 2:]
        rows = [[c.strip() for c in line.strip("|").split("|")] for line in table[:table.index("")]]
        cells.update({r[0].removesuffix(" ⚑"): r[column] for r in rows})  # ⚑: tiny-digits' MAP
    return cells


def test_memory_measured_before_settled_baselines_shows_as_a_lower_bound(
    results: tuple[Path, Path], tmp_path: Path
) -> None:
    root, json_path, _ = _copy(results, tmp_path)
    assert not any(c.startswith("≥") for c in _peak_cells(root).values())  # runs of this bench: settled
    _edit_json(json_path, lambda r: r["memory"].pop("settled"))  # as a record written before it
    assert main(["table", "--results", str(root)]) == 0
    cells = _peak_cells(root)
    assert cells["map"].startswith("≥ ") and not cells["subset-map"].startswith("≥")
    assert "≥ = a lower bound" in (root / "leaderboard.md").read_text()


def _arrays(npz: Path) -> dict[str, np.ndarray]:
    with np.load(npz) as data:
        return dict(data)


DAMAGE = {
    "truncated npz": (lambda j, n: n.write_bytes(n.read_bytes()[:1000]), "does not belong to its JSON"),
    "truncated npz, no checksum": (lambda j, n: (n.write_bytes(n.read_bytes()[:1000]),
                                                 _edit_json(j, lambda r: r.pop(CHECKSUM_KEY))), "is unreadable"),
    "npz of another run": (lambda j, n: n.write_bytes(n.with_name("seed1.npz").read_bytes()),
                           "does not belong to its JSON"),
    "missing key": (lambda j, n: _rewrite_npz(j, {k: v for k, v in _arrays(n).items() if k != "test/labels"}),
                    "is damaged: it lacks test/probs or test/labels"),
    "mismatched lengths": (lambda j, n: _rewrite_npz(j, {**_arrays(n), "ood/shuffled/probs":
                                                         _arrays(n)["ood/shuffled/probs"][:, :5]}),
                           "ood/shuffled: probabilities have 5 classes"),
    "NaN probabilities": (lambda j, n: _rewrite_npz(j, {**_arrays(n), "test/probs":
                                                        np.full_like(_arrays(n)["test/probs"], np.nan)}),
                          "test: probabilities are NaN or inf"),
    "JSON missing a field": (lambda j, n: _edit_json(j, lambda r: r.pop("costs")),
                             "is damaged: its field 'costs' is missing"),
    "JSON not JSON": (lambda j, n: j.write_text("{"), "is unreadable"),
    "JSON metric edited": (lambda j, n: _edit_json(j, lambda r: r["metrics"].update({"cls/acc": 0.123})),
                           "cls/acc is 0.123 but its predictions give"),
}


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("command", ["table", "plot"])
def test_a_damaged_run_is_listed_and_left_out_while_the_rest_goes_on(
    damage: str, command: str, results: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, json_path, npz = _copy(results, tmp_path)
    edit, message = DAMAGE[damage]
    edit(json_path, npz)
    code = main([command, "--results", str(root)])  # plot too: its cost figure reads the checked runs
    err = capsys.readouterr().err.strip()
    assert code == 0, err
    [warning] = [line for line in err.splitlines() if "damaged run left out" in line]
    assert "Traceback" not in err and (str(json_path) in warning or str(npz) in warning) and message in warning
    if command == "table":
        md = (root / "leaderboard.md").read_text()
        damaged = md[md.index("## Damaged runs"):]
        assert message in damaged and (json_path.name in damaged or npz.name in damaged)
        assert "| map " in md  # the other runs still make the table
        assert main(["table", "--results", str(root), "--check"]) == 1
    else:
        assert list((root / "plots").glob("*.png"))


def test_results_of_an_older_format_are_named_by_check(
    results: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, json_path, _ = _copy(results, tmp_path)
    _edit_json(json_path, lambda r: (r.update(schema=1), r.pop(CHECKSUM_KEY)))
    assert main(["table", "--results", str(root)]) == 0  # still tabulated, with a note
    assert "1 run file(s) (e.g. " in capsys.readouterr().err
    assert main(["table", "--results", str(root), "--check"]) == 1
    out = capsys.readouterr().out
    assert "written by an older bench (schema 1: float32 probabilities" in out and "regenerate" in out


def test_read_only_results_are_one_line_for_table_and_plot(
    results: tuple[Path, Path], tmp_path: Path, read_only, capsys: pytest.CaptureFixture[str]
) -> None:
    root, _, _ = _copy(results, tmp_path)
    read_only(root)
    for command in ("table", "plot"):
        code = main([command, "--results", str(root)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and f"cannot write {root}" in err, err
    assert main(["table", "--results", str(root), "--check"]) == 0  # reading needs no write access


def test_table_recomputes_every_json_metric_exactly(results: tuple[Path, Path]) -> None:
    from bench.leaderboard import collect

    found = collect(results[0])  # raises if any JSON metric differs from its npz by more than 1e-9
    assert found.old_format == [] and sum(len(v) for v in found.table["tiny-digits"].values()) == 6
