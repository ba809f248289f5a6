"""bench.headline: at most eight figures, the hardest shift set, each row's best OOD score named."""

from __future__ import annotations

from bench.cells import MISSING, Mark
from bench.headline import TOTAL_COST, headline_cell, headline_columns, headline_labels


def _runs() -> dict[str, list[dict[str, float]]]:
    base = {"cls/acc": 0.9, "cls/nll": 0.3, "cal/ece": 0.02, "costs/train_s": 100.0, "costs/fit_posthoc_s": 5.0,
            "costs/predict_per_1k_s": 1.0, "memory/peak_mib": 50.0}
    ood = {"ood/a/auroc/entropy": 0.7, "ood/b/auroc/entropy": 0.6, "shift/mild/nll": 0.5, "shift/hard/nll": 2.5,
           "shift/mild/acc": 0.8}
    return {"map": [{**base, **ood}, {**base, **ood}],
            "laplace": [{**base, **ood, "ood/a/auroc/variance": 0.95}, {**base, **ood, "ood/a/auroc/variance": 0.93}],
            "laplace [s=1]": [{**base, **ood}], "capped": [{**base, "subset": 100.0}]}


def test_at_most_eight_figures_with_the_hardest_shift_and_one_auroc_per_ood_set() -> None:
    columns = headline_columns(_runs())
    assert len(columns) <= 8
    assert [c.title for c in columns] == ["Acc ↑", "NLL ↓", "ECE ↓", "AUROC a (best score) ↑",
                                          "AUROC b (best score) ↑", "hard NLL ↓ (hardest shift)", "cost s ↓",
                                          "peak MiB"]
    assert columns[3].keys == ("ood/a/auroc/entropy", "ood/a/auroc/variance")


def test_rows_are_full_set_and_not_the_untuned_derived_ones() -> None:
    assert headline_labels(_runs()) == ["laplace", "map"]


def test_an_ood_cell_shows_the_rows_best_score_and_names_it() -> None:
    runs = _runs()
    column = headline_columns(runs)[3]
    marks = {"ood/a/auroc/entropy": Mark("0.7000", 0.7),
             "ood/a/auroc/variance": Mark("0.9400 ± 0.1", 0.94, best="bold")}
    cell = headline_cell(runs["laplace"], marks, column)
    assert (cell.text, cell.note, cell.best) == ("0.9400 ± 0.1", "variance", "bold")
    assert cell.markdown() == "**0.9400 ± 0.1 (variance)**"
    only_entropy = headline_cell(runs["map"], {"ood/a/auroc/entropy": Mark("0.7000", 0.7)}, column)
    assert only_entropy.note == "entropy"
    assert headline_cell(runs["map"], {}, column) == MISSING


def test_cost_is_train_fit_and_predict_per_run_median_over_seeds() -> None:
    runs = {"m": [{"costs/train_s": 100.0, "costs/fit_posthoc_s": 5.0, "costs/predict_per_1k_s": 1.0},
                  {"costs/train_s": 200.0, "costs/fit_posthoc_s": 5.0, "costs/predict_per_1k_s": 1.0},
                  {"costs/train_s": 120.0, "costs/fit_posthoc_s": 4.0, "costs/predict_per_1k_s": 2.0}]}
    cost = next(c for c in headline_columns(runs) if c.keys == (TOTAL_COST,))
    cell = headline_cell(runs["m"], {}, cost)
    assert cell.text == "126 [106, 206]" and cell.mean == 126.0
