"""``bench table``: metrics recomputed from the run files, paired rows for capped methods,
ranking and the staleness check."""

from __future__ import annotations

import csv
import textwrap
from pathlib import Path

import pytest
from conftest import TINY_TASK

from bench.cli import main

CAPPED = '''
from bench.method_api import register_method
from bench_methods.map import MAP

@register_method("subset-map")
class SubsetMap(MAP):
    """The MAP evaluated on at most 40 inputs per set, like per-input RegVar."""
    eval_limit = 40
'''


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("results")
    plugin = root / "capped.py"
    plugin.write_text(textwrap.dedent(CAPPED))
    for method in ("map", "subset-map"):
        for seed in ("0", "1"):
            assert main(["--plugin", str(TINY_TASK), "--plugin", str(plugin), "run", "--method", method,
                         "--task", "tiny-digits", "--out", str(root), "--quiet", "--seed", seed]) == 0
    assert main(["table", "--results", str(root)]) == 0
    return root, plugin


def rows(root: Path) -> dict[tuple[str, str], float]:
    with (root / "leaderboard.csv").open() as f:
        return {(r["method"], r["metric"]): float(r["mean"]) for r in csv.DictReader(f)}


def test_capped_method_gets_a_paired_reference_on_its_own_subset(results: tuple[Path, Path]) -> None:
    table = rows(results[0])
    # subset-map is the MAP on a subset: the MAP cut to the same inputs must give the same numbers,
    # and (on 40 inputs) not those of the full test set.
    for metric in ("cls/acc", "cls/nll", "cal/ece", "ood/shuffled/auroc/entropy", "shift/noisy/nll"):
        assert table[("map ⊂ subset-map", metric)] == pytest.approx(table[("subset-map", metric)], abs=1e-12)
    assert table[("map ⊂ subset-map", "cls/nll")] != table[("map", "cls/nll")]
    md = (results[0] / "leaderboard.md").read_text()
    assert "compare it with `map ⊂ subset-map`" in md


def test_subset_rows_are_never_bold(results: tuple[Path, Path]) -> None:
    md = (results[0] / "leaderboard.md").read_text()
    subset_lines = [line for line in md.splitlines() if line.startswith(("| subset-map", "| map ⊂"))]
    assert len(subset_lines) == 2
    assert not any("**" in line for line in subset_lines)


def test_check_passes_when_current_and_fails_when_stale(results: tuple[Path, Path]) -> None:
    root = results[0]
    assert main(["table", "--results", str(root), "--check"]) == 0
    md = root / "leaderboard.md"
    md.write_text(md.read_text().replace("subset-map", "edited-by-hand"))
    assert main(["table", "--results", str(root), "--check"]) == 1
    assert main(["table", "--results", str(root)]) == 0  # restore for the other tests
