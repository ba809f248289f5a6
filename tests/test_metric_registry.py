"""bench.metrics.registry: each metric declared once serves run-time scoring and the bootstrap;
one binning for ECE, MCE and the reliability diagrams; a plugin's metric and score reach every output."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TASK, run_cli
from torchmetrics.functional.classification import multiclass_calibration_error

from bench.metrics.calibration import N_BINS
from bench.metrics.registry import SHIFT, TEST, confidence_bins, set_metrics
from bench.plots import reliability_bins


def _predictions(seed: int, n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 5, (n,), generator=g)
    probs = (2.5 * torch.randn(n, 5, generator=g).double() + torch.nn.functional.one_hot(labels, 5)).softmax(1)
    probs[:7] = torch.nn.functional.one_hot(labels[:7], 5).double()  # confidence exactly 1
    probs[7:12] = 0.2  # a five-way tie
    return probs.numpy(), labels.numpy()


@pytest.mark.parametrize("seed", range(3))
def test_every_metric_from_its_terms_equals_its_value(seed: int) -> None:
    probs, labels = _predictions(seed)
    for metric in set_metrics():
        value = metric.value(torch.from_numpy(probs), torch.from_numpy(labels))
        from_terms = metric.from_sums(np.ones((1, len(labels))) @ metric.terms(probs, labels), len(labels))[0]
        # torchmetrics returns its calibration errors in float32
        assert from_terms == pytest.approx(value, rel=1e-6 if metric.namespace == "cal" else 1e-12), metric.name


def test_the_registry_declares_the_leaderboards_metrics_in_column_order() -> None:
    names = [m.name for m in set_metrics()]
    assert names[:5] == ["acc", "nll", "ece", "brier", "mce"]
    shown = {m.name: m.shown_on for m in set_metrics()}
    assert shown["nll"] == (TEST, SHIFT) and shown["brier"] == (TEST,) and shown["mce"] == ()


def test_a_confidence_on_a_bin_edge_falls_where_torchmetrics_puts_it() -> None:
    edges = torch.linspace(0, 1, N_BINS + 1, dtype=torch.float64)
    conf = edges[[8, 10, 12]].clone()  # exactly on edges
    probs = torch.stack([conf, 1 - conf], 1)  # conf > 0.5 here, so it is the top label
    labels = torch.tensor([0, 1, 0])
    assert confidence_bins(conf.numpy()).tolist() == [8, 10, 12]
    counts, acc, mean_conf = reliability_bins(probs.numpy(), labels.numpy())
    assert counts.nonzero()[0].tolist() == [8, 10, 12]
    ece = float(np.sum(counts * np.abs(acc - mean_conf)) / counts.sum())
    expected = multiclass_calibration_error(probs, labels, num_classes=2, n_bins=N_BINS, norm="l1")
    assert ece == pytest.approx(float(expected), abs=1e-6)
    assert confidence_bins(np.array([1.0, 0.0]))[0] == N_BINS - 1  # confidence 1: the last bin, not a phantom one


PLUGIN = textwrap.dedent('''
    import numpy as np
    from bench.metrics.registry import TEST, Score, SetMetric, register_metric, register_score

    def top2(probs, labels):
        return (probs.topk(2, dim=1).indices == labels[:, None]).any(1).double().mean().item()

    def top2_terms(probs, labels):
        return (np.argsort(-probs, 1, kind="stable")[:, :2] == labels[:, None]).any(1).astype(np.float64)[:, None]

    def margin(probs):
        best = probs.double().topk(2, dim=1).values
        return 1 - (best[:, 0] - best[:, 1])

    register_metric(SetMetric("top2", "Top-2 acc", 1, "cls", top2, top2_terms, lambda s, n: s[:, 0] / n,
                              shown_on=(TEST,)))
    register_score(Score("margin", "1 - the gap between the two largest probabilities", margin))
''')


@pytest.mark.slow
def test_a_plugins_metric_and_score_reach_the_printout_leaderboard_paired_table_and_site(tmp_path: Path) -> None:
    plugin = tmp_path / "top2.py"
    plugin.write_text(PLUGIN)
    out, plugins = tmp_path / "out", ["--plugin", str(TINY_TASK), "--plugin", str(plugin)]
    run = run_cli(*plugins, "run", "--method", "map", "--task", "tiny-digits", "--smoke", "--quiet", "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert "cls/top2" in run.stdout and "ood/shuffled/auroc/margin" in run.stdout
    sweep = run_cli(*plugins, "sweep", "--methods", "map,map-ts", "--tasks", "tiny-digits", "--seeds", "0",
                    "--smoke", "--quiet", "--out", str(out))
    assert sweep.returncode == 0, sweep.stderr
    table = run_cli(*plugins, "table", "--results", str(out))
    assert table.returncode == 0, table.stderr
    board = (out / "leaderboard.md").read_text()
    assert "Top-2 acc ↑" in board and "AUROC shuffled (margin) ↑" in board
    assert "Δ cls/top2" in board and "Δ ood/shuffled/auroc/margin" in board  # the paired table
    assert "margin, 1 - the gap between the two largest probabilities" in board
    site = run_cli(*plugins, "site", "--results", str(out))
    assert site.returncode == 0, site.stderr
    page = next((out / "site").rglob("task-tiny-digits*.html")).read_text()
    assert "Top-2 acc" in page and "(margin)" in page
    without = run_cli("--plugin", str(TINY_TASK), "table", "--results", str(out), "--check")
    assert without.returncode == 1 and "load the plugin that registers it (--plugin FILE)" in without.stderr
