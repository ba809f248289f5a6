"""How the leaderboard prints a paired difference."""

from __future__ import annotations

from bench.tables import difference_cell


def test_a_tiny_but_nonzero_interval_is_not_printed_as_zero() -> None:
    assert difference_cell(-0.0123, -0.02, -0.004) == "-0.0123 [-0.0200, -0.0040]"
    assert difference_cell(2e-6, 1e-6, 3e-6) == "+2.0e-06 [+1.0e-06, +3.0e-06]"  # not "+0.0000 [+0.0000, +0.0000]"
    assert difference_cell(0.0, 0.0, 0.0) == "+0.0000 [+0.0000, +0.0000]"  # an exact zero stays a zero


def test_cost_and_memory_cells_are_the_median_and_range_not_a_t_interval() -> None:
    from bench.cells import MEMORY_KEY, cell_text

    runs = [{MEMORY_KEY: 162.4}, {MEMORY_KEY: 623.0}, {MEMORY_KEY: 1051.2}]
    assert cell_text(runs, MEMORY_KEY) == "623 [162, 1051]"
    assert cell_text([{"costs/predict_per_1k_s": 0.0307}], "costs/predict_per_1k_s") == "0.0307"  # not 0.0
    assert cell_text([{"cls/nll": 0.25}, {"cls/nll": 0.27}], "cls/nll").startswith("0.2600 ± ")


def test_headline_metrics_and_total_cost() -> None:
    from bench.answers import headlines, total_cost

    keys = {"cls/nll", "cal/ece", "ood/tweets/auroc/entropy", "ood/tweets/auroc/variance", "shift/rt/nll",
            "shift/rt/acc"}
    assert [(h.key, h.direction) for h in headlines(keys)] == [
        ("cls/nll", -1), ("cal/ece", -1), ("ood/tweets/auroc/entropy", 1), ("shift/rt/nll", -1)]
    runs = [{"costs/train_s": 10.0, "costs/fit_posthoc_s": 1.0, "costs/predict_per_1k_s": 0.5},
            {"costs/train_s": 30.0, "costs/fit_posthoc_s": 1.0, "costs/predict_per_1k_s": 0.5},
            {"costs/fit_posthoc_s": 1.0}]  # a run without a known training cost is left out
    assert total_cost(runs) == 21.5 and total_cost([{}]) is None
