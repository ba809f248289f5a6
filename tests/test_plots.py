"""``bench plot``: one reliability figure and one OOD histogram per task, from the run files."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
from conftest import TINY_TASK

from bench.cli import main
from bench.plots import reliability_bins


@pytest.mark.slow
def test_plot_writes_readable_figures_for_every_task(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for method in ("map", "map-ts"):
        assert main(["--plugin", str(TINY_TASK), "run", "--method", method, "--task", "tiny-digits",
                     "--out", str(tmp_path), "--quiet"]) == 0
    capsys.readouterr()  # the runs' result tables
    assert main(["plot", "--results", str(tmp_path)]) == 0
    written = {Path(line).name for line in capsys.readouterr().out.split()}
    assert written == {"reliability_tiny-digits.png", "ood_hist_tiny-digits_shuffled.png",
                       "cost_quality_tiny-digits.png"}
    for name in written:
        image = mpimg.imread(tmp_path / "plots" / name)
        assert image.shape[0] > 200 and image.shape[1] > 400
        assert image[..., :3].std() > 0.05  # not a blank canvas


def test_reliability_bins_match_a_direct_count() -> None:
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.55, 0.45]])
    labels = np.array([0, 1, 1, 0])
    counts, acc, conf = reliability_bins(probs, labels, n_bins=2)
    assert counts.tolist() == [0, 4]
    assert acc[1] == pytest.approx(0.75)
    assert conf[1] == pytest.approx((0.9 + 0.6 + 0.8 + 0.55) / 4)


def test_plot_without_runs_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plot", "--results", str(tmp_path)]) == 2
    assert "no successful runs" in capsys.readouterr().err


def test_cost_counts_training_only_when_it_is_known() -> None:
    from bench.plots import _cost

    known = {"costs/train_s": 10.0, "costs/fit_posthoc_s": 2.0, "costs/predict_per_1k_s": 0.5}
    assert _cost(known) == (12.5, True)
    assert _cost({"costs/fit_posthoc_s": 2.0, "costs/predict_per_1k_s": 0.5}) == (2.5, False)


def suite_rows(seeds: int, drop: float) -> list[dict[str, float]]:
    """Per-seed metric dicts as ``collect`` gives them, for a suite run whose accuracy falls by
    ``drop`` per level of every shift."""
    from bench.data.shift_suite import ANGLES, CORRUPTIONS, SEVERITIES

    rows = []
    for seed in range(seeds):
        row = {"cls/acc": 0.9, "cal/ece": 0.02, "cls/nll": 0.3, "seed": seed}
        levels = [(f"rotate-{a:g}", i) for i, a in enumerate(ANGLES)]
        levels += [(f"{k}-{s}", s) for k in CORRUPTIONS for s in SEVERITIES]
        for name, level in levels:
            acc = max(0.1, 0.9 - drop * level + 0.01 * seed)
            row |= {f"shift/{name}/acc": acc, f"shift/{name}/ece": 0.9 - acc, f"shift/{name}/nll": 3 * (1 - acc)}
        rows.append(row)
    return rows


def test_shift_intensity_figure_from_per_seed_metrics(tmp_path: Path) -> None:
    from bench.plots import plot_shift_intensity

    runs = {"map": suite_rows(3, 0.1), "laplace": suite_rows(3, 0.05), "laplace [s tuned]": suite_rows(3, 0.0),
            "map ⊂ regvar-ll": suite_rows(2, 0.0)}
    (path,) = plot_shift_intensity("fashion-mnist", runs, tmp_path)
    assert path.name == "shift_intensity_fashion-mnist.png"
    image = mpimg.imread(path)
    assert image.shape[0] > 1000 and image.shape[1] > 1000  # six rows of three panels
    assert image[..., :3].std() > 0.05


def test_shift_intensity_levels_reference_and_intervals() -> None:
    from bench.plots import intensity_curve, intensity_sets

    runs = {"map": suite_rows(3, 0.1)}
    sets = intensity_sets(runs)
    assert list(sets) == ["rotate", "noise", "blur", "contrast", "brightness", "pixelate"]
    assert sets["noise"] == {0.0: "rotate-0", 1.0: "noise-1", 2.0: "noise-2", 3.0: "noise-3", 4.0: "noise-4",
                             5.0: "noise-5"}
    xs, means, halves = intensity_curve(runs["map"], sets["noise"], "acc", "cls/acc")
    assert xs == [0, 1, 2, 3, 4, 5] and means[2] == pytest.approx(0.71)  # 0.9 − 2·0.1 + mean(0, .01, .02)
    assert halves[2] == pytest.approx(4.303 * 0.01 / 3**0.5, rel=1e-3)  # t(0.975, 2)·sd/√n
    # Without rotate-0, intensity 0 is the clean test set; a set no seed has is left out.
    rows = [{k: v for k, v in r.items() if "rotate-0/" not in k and "noise-4/" not in k} for r in runs["map"]]
    sets = intensity_sets({"map": rows})
    assert sets["noise"][0.0] is None and 4.0 not in sets["noise"]
    assert intensity_curve(rows, sets["noise"], "ece", "cal/ece")[1][0] == pytest.approx(0.02)


def test_no_shift_intensity_figure_without_a_suite(tmp_path: Path) -> None:
    """fashion-mnist's default runs (two rotations) and tasks with unrelated shift sets draw none."""
    from bench.plots import plot_shift_intensity

    default = [{"cls/acc": 0.9, "cal/ece": 0.01, "cls/nll": 0.3, "shift/rotate-30/acc": 0.3,
                "shift/rotate-60/acc": 0.1, "shift/noisy/acc": 0.5}]
    assert plot_shift_intensity("fashion-mnist", {"map": default}, tmp_path) == []
    assert not list(tmp_path.iterdir())


SUITE_PLUGIN = '''
import torch
from pathlib import Path
from torch.utils.data import TensorDataset
from bench.plugins import load_plugin
from bench.tasks.base import TASKS, register_task

load_plugin(Path({tiny!r}))
if "tiny-suite" not in TASKS:
    @register_task("tiny-suite")
    class TinySuite(TASKS.get("tiny-digits")):
        """tiny-digits with shift sets named like the suite's: noise at three severities."""

        def load(self):
            data = super().load()
            x, y = data.test.tensors
            g = torch.Generator().manual_seed(3)
            data.shift = {{f"noise-{{s}}": TensorDataset(x + 0.4 * s * torch.randn(x.shape, generator=g), y)
                          for s in (1, 2, 3)}}
            return data
'''


@pytest.mark.slow
def test_plot_draws_the_shift_intensity_figure_for_suite_runs(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    plugin = tmp_path / "tiny_suite.py"
    plugin.write_text(SUITE_PLUGIN.format(tiny=str(TINY_TASK)))
    out = tmp_path / "results"
    for seed in ("0", "1"):
        assert main(["--plugin", str(plugin), "run", "--method", "map", "--task", "tiny-suite", "--seed", seed,
                     "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["plot", "--results", str(out)]) == 0
    written = {Path(line).name for line in capsys.readouterr().out.split()}
    assert "shift_intensity_tiny-suite.png" in written
    assert mpimg.imread(out / "plots" / "shift_intensity_tiny-suite.png")[..., :3].std() > 0.05


def test_ood_histograms_use_each_runs_best_scoring_detector() -> None:
    from dataclasses import replace

    from conftest import make_record

    from bench.plots import best_ood_score

    record = replace(make_record(), metrics={"ood/far/auroc/entropy": 0.6, "ood/far/auroc/centred_var": 0.97,
                                             "ood/far/auroc/msp": 0.61, "ood/near/auroc/variance": 0.99})
    assert best_ood_score(record, "far") == "centred_var"
    assert best_ood_score(record, "gone") == "entropy"


def test_cost_figure_keeps_a_far_outlier_off_the_axis_and_draws_the_pareto_front() -> None:
    import numpy as np

    from bench.plots import _pareto_front, _y_range

    low, top, margin = _y_range(np.array([0.404, 0.4042, 0.4043, 0.4075, 0.4113, 0.45]))
    assert low == 0.404 and top == 0.4113 and margin > 0  # 0.45 would squash the rest: off the axis
    assert _y_range(np.array([0.2, 0.21, 0.22]))[1] == 0.22  # no outlier: everything shown
    assert _pareto_front([(3.0, 0.2), (1.0, 0.5), (2.0, 0.6), (4.0, 0.1)]) == [(1.0, 0.5), (3.0, 0.2), (4.0, 0.1)]
