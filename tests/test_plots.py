"""``bench plot``: one reliability figure and one OOD histogram per task, from the run files."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
from conftest import TINY_TASK

from bench.cli import main
from bench.plots import reliability_bins


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
