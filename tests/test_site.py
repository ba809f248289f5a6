"""``bench site``: the static leaderboard site, built from real runs of the tiny task; no browser."""

from __future__ import annotations

import dataclasses
import html
import json
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest
from conftest import TINY_TASK

from bench.cli import build_parser, main
from bench.leaderboard import collect
from bench.plugins import load_plugin
from bench.record import RunRecord
from bench.reproduce import reproduce
from bench.results import dumps_json, read_record
from bench.runner import RunConfig, resolve, run
from bench.site import build_site
from bench.site_files import MANIFEST, SCREENSHOTS, check_site, write_site
from bench.tables import columns_for, render

TASK = "tiny-digits"
DROPOUT = "mc-dropout@samples=4"
PNG = b"\x89PNG\r\n\x1a\nnot really an image"


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real runs: the MAP on two seeds and MC dropout with a non-default option; two figures of
    the task and one of another task in ``plots/``."""
    root = tmp_path_factory.mktemp("results")
    load_plugin(TINY_TASK)
    with pytest.MonkeyPatch.context() as mp:  # the autouse cache fixture is per test; this is per module
        mp.setenv("BENCH_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "bench-cache"))
        for method, seed, settings in (("map", 0, {}), ("map", 1, {}), ("mc-dropout", 0, {"samples": "4"})):
            run(RunConfig(method=method, task=TASK, seed=seed, out=root, settings=settings, quiet=True))
    plots = root / "plots"
    plots.mkdir()
    for name in (f"reliability_{TASK}.png", f"ood_hist_{TASK}_shuffled.png", "reliability_other-task.png"):
        (plots / name).write_bytes(PNG)
    return root


@pytest.fixture(scope="module")
def site(results: Path) -> dict[str, bytes]:
    return build_site(results)


def page(files: dict[str, bytes], path: str) -> str:
    return files[path].decode()


def test_pages_exist_for_the_task_each_method_and_each_run(site: dict[str, bytes]) -> None:
    expected = {"index.html", f"task-{TASK}.html", "method-map.html", f"method-{DROPOUT}.html",
                f"runs/{TASK}/map/seed0.html", f"runs/{TASK}/map/seed1.html", f"runs/{TASK}/{DROPOUT}/seed0.html",
                "static/site.js", "static/site.css", MANIFEST, "leaderboard.csv", f"task-{TASK}.json",
                f"plots/reliability_{TASK}.png", f"plots/ood_hist_{TASK}_shuffled.png"}
    assert set(site) == expected  # not the other task's figure
    index = page(site, "index.html")
    assert f'href="task-{TASK}.html"' in index and f'href="method-{DROPOUT}.html"' in index
    task = page(site, f"task-{TASK}.html")
    assert f'src="plots/ood_hist_{TASK}_shuffled.png"' in task
    assert f'href="runs/{TASK}/{DROPOUT}/seed0.html"' in task
    assert '<section class="answers">' in task and "<li>NLL: <code>" in task  # the answer box, as in the markdown


def _markdown_row(md: str, label: str) -> dict[str, str]:
    """A row of the markdown leaderboard's full task table: column title → cell, marks included."""
    lines = md.split(f"## {TASK}", 1)[1].split("<summary>Full table", 1)[1].splitlines()
    header = next(line for line in lines if line.startswith("| method"))
    titles = [c.strip() for c in header.strip("|").split("|")]
    row = next(line for line in lines if line.startswith(f"| {label} "))
    return dict(zip(titles, [c.strip() for c in row.strip("|").split("|")], strict=True))


def _markdown_cell(md: str, label: str, title: str) -> str:
    """A cell of the markdown leaderboard's task table, without its marks (bold, †, ⚑)."""
    return _markdown_row(md, label)[title].replace("*", "").replace("†", "").replace("⚑", "").strip()


def _site_td(task_page: str, label: str, key: str, table: str = "board") -> str:
    """The inner HTML of a cell of one of the task page's tables."""
    body = task_page.split(f'id="{table}"', 1)[1].split("</table>", 1)[0]
    row = re.search(rf'<tr data-kind="\w+" data-label="{re.escape(label)}"[^>]*>(.*?)</tr>', body, re.S)
    assert row, label
    cell = re.search(rf'data-key="{re.escape(key)}" data-sort="[^"]*">(.*?)</td>', row.group(1))
    assert cell, key
    return cell.group(1)


def _site_cell(task_page: str, label: str, key: str) -> str:
    return html.unescape(re.sub("<[^>]+>", "", _site_td(task_page, label, key))).replace("†", "").strip()


def test_task_table_shows_the_markdown_leaderboards_numbers(results: Path, site: dict[str, bytes]) -> None:
    md, _ = render(collect(results))
    task = page(site, f"task-{TASK}.html")
    for label in ("map", DROPOUT):
        for title, key in (("NLL ↓", "cls/nll"), ("Acc ↑", "cls/acc"), ("peak MiB", "memory/peak_mib")):
            assert _site_cell(task, label, key) == _markdown_cell(md, label, title)
    assert "±" in _site_cell(task, "map", "cls/nll")  # two seeds: an interval


def test_site_cells_carry_the_markdowns_marks(results: Path, site: dict[str, bytes]) -> None:
    found = collect(results)
    md, _ = render(found)
    task = page(site, f"task-{TASK}.html")
    emphasis = {"bold": 0, "italic": 0, "differs": 0}
    for label in ("map", DROPOUT):
        cells = _markdown_row(md, label)
        for title, key, _ in columns_for(found.table[TASK]):
            theirs, ours = cells[title], _site_td(task, label, key)
            bold, italic = theirs.startswith("**"), theirs.startswith("*") and not theirs.startswith("**")
            assert (bold, italic) == (ours.startswith("<strong>"), ours.startswith("<em>")), (label, key)
            assert ("†" in theirs) == ("†" in html.unescape(ours)), (label, key)
            emphasis["bold"] += bold
            emphasis["italic"] += italic
            emphasis["differs"] += "†" in theirs
    assert emphasis["bold"] + emphasis["italic"] > 0 and emphasis["differs"] > 0  # the check saw marks


def test_headline_table_has_at_most_eight_figures_and_names_the_ood_score(site: dict[str, bytes]) -> None:
    task = page(site, f"task-{TASK}.html")
    headline = task.split('id="headline"', 1)[1].split("</table>", 1)[0]
    titles = re.findall(r"<th[^>]*>([^<]*)</th>", headline.split("</thead>", 1)[0])
    assert titles[0] == "method" and 1 < len(titles) - 1 <= 8
    assert any(t.startswith("AUROC shuffled (best score)") for t in titles)
    ood = _site_td(task, "map", "ood/shuffled/auroc/entropy", table="headline")
    assert re.search(r"\((entropy|variance|mutual_info|centred_var)\)", html.unescape(ood))


def _command(run_page: str) -> list[str]:
    match = re.search(r'<pre class="command"><code>(.*?)</code></pre>', run_page, re.S)
    assert match
    return shlex.split(html.unescape(match.group(1)))


def test_run_page_holds_the_command_that_reproduces_the_run(site: dict[str, bytes]) -> None:
    argv = _command(page(site, f"runs/{TASK}/{DROPOUT}/seed0.html"))
    assert argv[:5] == ["python", "-m", "bench", "--plugin", "PATH/TO/tiny_task.py"]  # the task is a plugin's
    args = build_parser().parse_args(argv[3:])
    assert (args.command, args.method, args.task, args.seed, args.settings, args.smoke) == \
        ("run", "mc-dropout", TASK, 0, ["samples=4"], False)
    config = RunConfig(method=args.method, task=args.task, seed=args.seed,
                       settings=dict(s.split("=", 1) for s in args.settings))
    assert (resolve(config).method_label, resolve(config).task_label) == (DROPOUT, TASK)
    assert build_parser().parse_args(_command(page(site, f"runs/{TASK}/map/seed1.html"))[3:]).settings == []
    assert "PATH/TO/ is where your copy of tiny_task.py lives" in page(site, f"runs/{TASK}/map/seed1.html")


def _without_command(record: RunRecord) -> RunRecord:
    """As a record written before runs kept their command."""
    return dataclasses.replace(record, provenance=dataclasses.replace(record.provenance, command=None))


def test_a_run_keeps_the_command_it_was_given_and_the_site_shows_it(results: Path) -> None:
    record = read_record(results / "runs" / TASK / DROPOUT / "seed0.json")
    assert record.provenance.command == ("python -m bench --plugin PATH/TO/tiny_task.py run --method mc-dropout "
                                         f"--task {TASK} --seed 0 --set samples=4")
    assert reproduce(record).command == record.provenance.command
    assert reproduce(_without_command(record)).command == record.provenance.command  # rebuilt, the same


def test_reproduce_sets_task_options_and_says_when_defaults_moved(results: Path) -> None:
    record = _without_command(read_record(results / "runs" / TASK / "map" / "seed0.json"))
    config = dataclasses.replace(record.config, task_options={**record.config.task_options, "hidden": 16})
    moved = reproduce(dataclasses.replace(record, config=config, task=f"{TASK}@hidden=16"))
    assert shlex.split(moved.command)[-2:] == ["--set", "hidden=16"]
    assert not any(n.startswith("today") for n in moved.notes)
    stale = reproduce(dataclasses.replace(record, config=config))  # labelled as if hidden were the default
    assert any("option defaults changed" in n for n in stale.notes)


def test_reproduce_reads_the_labels_of_a_method_not_registered_here(results: Path) -> None:
    record = _without_command(read_record(results / "runs" / TASK / "map" / "seed0.json"))
    config = dataclasses.replace(record.config, method="gone")
    lost = reproduce(dataclasses.replace(record, config=config, method="gone@k=v,w=1|2"))
    assert shlex.split(lost.command)[-4:] == ["--set", "method.k=v", "--set", "method.w=1|2"]
    assert any("not registered" in n for n in lost.notes)


def test_build_is_deterministic(results: Path, site: dict[str, bytes]) -> None:
    assert build_site(results) == site


def test_pages_work_offline_with_relative_links_that_resolve(site: dict[str, bytes]) -> None:
    for path, data in site.items():
        if not path.endswith(".html"):
            continue
        text = data.decode()
        assert not re.search(r'(src|href)="(https?:)?//', text), path
        depth = path.count("/")
        assert f'<script src="{"../" * depth}static/site.js"></script>' in text
        for target in re.findall(r'(?:src|href)="([^"#]+)"', text):
            assert posixpath.normpath(posixpath.join(posixpath.dirname(path), unquote(target))) in site, (path, target)


def test_check_passes_after_write_and_fails_on_edits_and_changed_runs(
        results: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "results"
    shutil.copytree(results, root)
    out = tmp_path / "site"
    args = ["site", "--results", str(root), "--out", str(out)]
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "--check"]) == 0
    assert capsys.readouterr().out.strip().startswith("site up to date (")

    edited = out / f"task-{TASK}.html"
    edited.write_text(edited.read_text().replace("map", "MAP"))
    assert main([*args, "--check"]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and str(edited) in lines[0] and "python -m bench site" in lines[0]

    assert main(args) == 0
    capsys.readouterr()
    run_file = root / "runs" / TASK / "map" / "seed1.json"
    record = json.loads(run_file.read_text())
    run_file.write_text(dumps_json({**record, "flags": ["a new warning"]}))
    assert main([*args, "--check"]) == 1
    assert len(capsys.readouterr().out.strip().splitlines()) == 1


def test_write_removes_what_an_earlier_build_left(results: Path, tmp_path: Path, site: dict[str, bytes]) -> None:
    out = tmp_path / "site"
    write_site(site, out)
    (out / "runs" / "gone").mkdir()
    (out / "runs" / "gone" / "seed0.html").write_text("old")
    assert check_site(site, out) == [f"{out / 'runs/gone/seed0.html'} is not part of the site"]
    write_site(site, out)
    assert check_site(site, out) == [] and not (out / "runs" / "gone").exists()


def test_screenshots_survive_builds_and_checks(site: dict[str, bytes], tmp_path: Path) -> None:
    out = tmp_path / "site"
    write_site(site, out)
    shot = out / SCREENSHOTS / "task.png"
    shot.parent.mkdir()
    shot.write_bytes(b"png")
    assert check_site(site, out) == []
    write_site(site, out)
    assert shot.read_bytes() == b"png"


def test_no_runs_and_foreign_folders_are_one_line_errors(
        results: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["site", "--results", str(tmp_path / "empty")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main(["site", "--results", str(results), "--out", str(tmp_path / "mine")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and MANIFEST in err[0]
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_method_page_describes_the_method_cites_it_and_lists_its_options(site: dict[str, bytes]) -> None:
    method = html.unescape(page(site, f"method-{DROPOUT}.html"))
    assert "Mean softmax over T dropout masks" in method  # the class docstring's first paragraph
    assert 'Gal and Z. Ghahramani, "Dropout as a Bayesian Approximation' in method
    row = re.search(r'<tr class="changed"><th scope="row"><code>samples</code></th><td>(\d+)</td><td>(\w+)</td>',
                    method)
    assert row and row.groups() == ("32", "4")  # default, and what this label sets
    assert '<tr><th scope="row"><code>rate</code></th>' in method  # an option the label leaves at its default


def test_the_site_offers_the_tables_as_json_and_the_csv(results: Path, site: dict[str, bytes]) -> None:
    import json

    _, csv_text = render(collect(results))
    assert site["leaderboard.csv"].decode() == csv_text
    tables = json.loads(site[f"task-{TASK}.json"])
    assert {r["label"] for r in tables["full"]} >= {"map", DROPOUT}
    nll = next(c for r in tables["full"] if r["label"] == "map" for c in r["cells"] if c["key"] == "cls/nll")
    assert nll["text"] == _site_cell(page(site, f"task-{TASK}.html"), "map", "cls/nll")
    assert f'href="task-{TASK}.json"' in page(site, f"task-{TASK}.html")


def test_the_site_of_runs_that_keep_their_commands_never_imports_the_runner(results: Path, tmp_path: Path) -> None:
    code = ("import sys; from pathlib import Path; from bench.plugins import load_plugin; "
            f"load_plugin(Path({str(TINY_TASK)!r})); from bench.site import build_site; "
            f"build_site(Path({str(results)!r})); print('bench.runner' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False"
