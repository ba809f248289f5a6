"""``bench.derived_rows``: the [s=1] and [s tuned] rows, from a run's stored logit Gaussian."""

from __future__ import annotations

import numpy as np
import torch

from bench.derived_rows import TUNED, UNTUNED, derive
from bench.formulas import nll, probit_probs
from bench.prediction_arrays import PredictionArrays
from bench.scale_tuning import SCALE_GRID


def _arrays(overconfident: float) -> dict[str, np.ndarray]:
    """Logits ``overconfident`` times too large with unit variances: a larger s helps."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, n in (("test", 300), ("val", 400), ("ood/far", 50)):
        true = torch.randn(n, 3, generator=g, dtype=torch.float64)
        labels = torch.multinomial(true.softmax(-1), 1, generator=g).squeeze(1)
        mean, var = (overconfident * true).float(), torch.ones(n, 3)
        out[f"{name}/logit_mean"], out[f"{name}/logit_var"] = mean.numpy(), var.numpy()
        if name != "val":
            out[f"{name}/probs"] = mean.double().softmax(-1).numpy()  # the method's own: variance ignored
            out[f"{name}/score/variance"] = var.mean(1).double().numpy()
            out[f"{name}/score/mutual_info"] = np.zeros(n)
        if name != "ood/far":
            out[f"{name}/labels"] = labels.numpy()
    return out


def test_derived_rows_are_the_probit_at_one_and_at_the_validation_best_scale() -> None:
    arrays = _arrays(4.0)
    assert PredictionArrays(arrays).has_gaussian and PredictionArrays(arrays).problem() is None
    rows = {kind: (derived.arrays, s, flag) for kind, (derived, s, flag) in derive(PredictionArrays(arrays)).items()}
    untuned, s1, flag1 = rows[UNTUNED]
    mean, var = (torch.from_numpy(arrays[f"test/logit_{k}"]).double() for k in ("mean", "var"))
    np.testing.assert_array_equal(untuned["test/probs"], probit_probs(mean, var, 1.0).numpy())
    assert s1 == 1.0 and flag1 is None and "val/labels" not in untuned and "test/logit_mean" not in untuned
    tuned, s, _ = rows[TUNED]
    val_mean, val_var = (torch.from_numpy(arrays[f"val/logit_{k}"]).double() for k in ("mean", "var"))
    val_y = torch.from_numpy(arrays["val/labels"])
    best = min(SCALE_GRID, key=lambda g: nll(probit_probs(val_mean, val_var, g), val_y))
    assert s == best > 1.0
    np.testing.assert_array_equal(tuned["ood/far/probs"], probit_probs(
        torch.from_numpy(arrays["ood/far/logit_mean"]).double(), torch.ones(50, 3, dtype=torch.float64), s).numpy())
    assert "test/score/mutual_info" in untuned and "test/score/mutual_info" not in tuned  # drawn at s = 1
    assert "test/score/variance" in tuned


def test_a_tuned_scale_on_the_grid_floor_is_flagged() -> None:
    arrays = _arrays(0.05)  # underconfident already: any variance hurts, s goes to the floor
    _, s, flag = derive(PredictionArrays(arrays))[TUNED]
    assert s == SCALE_GRID[0] and "floor" in flag


def test_bad_gaussian_arrays_are_named() -> None:
    arrays = _arrays(1.0)
    arrays["test/logit_var"] = -arrays["test/logit_var"]
    assert "negative" in PredictionArrays(arrays).problem()
    arrays = _arrays(1.0)
    del arrays["val/logit_var"]
    assert "only one of" in PredictionArrays(arrays).problem()


CAPPED_GAUSSIAN = '''
import torch
from bench.method_api import register_method
from bench.types import Prediction
from bench_methods.map import MAP

@register_method("capped-gauss")
class CappedGauss(MAP):
    """The MAP with a unit-variance logit Gaussian, evaluated on 50 inputs per set."""
    eval_limit = 50
    def predict(self, x):
        own = super().predict(x)
        logits = own.probs.clamp_min(1e-12).log()
        return Prediction(own.probs, {}, logits, torch.ones_like(logits))
'''


def test_a_capped_gaussian_method_gets_derived_rows_in_the_leaderboard(tmp_path) -> None:
    from conftest import TINY_TASK

    from bench.cli import main

    plugin = tmp_path / "capped_gauss.py"
    plugin.write_text(CAPPED_GAUSSIAN)
    for method in ("map", "capped-gauss"):
        assert main(["--plugin", str(TINY_TASK), "--plugin", str(plugin), "run", "--method", method,
                     "--task", "tiny-digits", "--out", str(tmp_path), "--quiet"]) == 0
    assert main(["table", "--results", str(tmp_path)]) == 0
    md = (tmp_path / "leaderboard.md").read_text()
    rows = {line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ")}
    assert {"capped-gauss [s=1]", "capped-gauss [s tuned]", "map ⊂ capped-gauss"} <= rows
    assert not [r for r in rows if r.startswith("map ⊂") and r.endswith("]")]  # one paired row per subset
    assert "- capped-gauss [s tuned]: tuned s per seed " in md


NEGATIVE_GAUSSIAN = '''
import torch
from bench.method_api import register_method
from bench.types import Prediction
from bench_methods.map import MAP

@register_method("negative-gauss")
class NegativeGauss(MAP):
    """The MAP with per-logit variances, the first input's below 0 (a finite difference's noise)."""
    def predict(self, x):
        own = super().predict(x)
        var = torch.ones_like(own.probs)
        var[0] = -0.5
        return Prediction(own.probs, {}, own.probs.clamp_min(1e-12).log(), var)
'''


def test_negative_variance_estimates_are_clamped_and_flagged_not_quiet(tmp_path) -> None:
    import json

    from conftest import TINY_TASK

    from bench.cli import main

    plugin = tmp_path / "negative.py"
    plugin.write_text(NEGATIVE_GAUSSIAN)
    assert main(["--plugin", str(TINY_TASK), "--plugin", str(plugin), "run", "--method", "negative-gauss",
                 "--task", "tiny-digits", "--out", str(tmp_path), "--quiet"]) == 0
    record = json.loads((tmp_path / "runs" / "tiny-digits" / "negative-gauss" / "seed0.json").read_text())
    (flag,) = [f for f in record["flags"] if not f.startswith("MAP is NOT a certified")]  # the plugin has no finish
    assert flag.startswith("negative variances clamped at 0")
    assert "10 of 4970 variance estimates for the test set" in flag
    with np.load(tmp_path / "runs" / "tiny-digits" / "negative-gauss" / "seed0.npz") as arrays:
        assert arrays["test/logit_var"].min() == 0.0
    assert main(["table", "--results", str(tmp_path)]) == 0


def _collected_rows(arrays: dict[str, np.ndarray], summary: dict) -> tuple[set[str], set[str], list]:
    """What the leaderboard makes of one run with these arrays and method summary: its derived
    row labels, the kinds named as its own row, and its flags."""
    from dataclasses import replace

    from conftest import make_record

    from bench.leaderboard import Collected, _add_derived

    out = Collected()
    record = replace(make_record(), method="m", method_summary=summary)
    _add_derived(out, record, PredictionArrays(arrays), {})
    return set(out.table["t"]), out.same_as_own[("t", "m")], out.flags[("t", "m")]


def test_a_run_declaring_its_probit_at_one_gets_no_repeated_row_by_definition() -> None:
    from bench.method_api import OWN_PREDICTIVE_KEY, PROBIT_AT_1

    arrays = _arrays(4.0)
    mean, var = (torch.from_numpy(arrays[f"test/logit_{k}"]).double() for k in ("mean", "var"))
    arrays["test/probs"] = probit_probs(mean, var.half().double(), 1.0).numpy()  # float16-stored variances
    rows, own, flags = _collected_rows(arrays, {OWN_PREDICTIVE_KEY: PROBIT_AT_1})
    assert rows == {f"m {TUNED}"} and own == {UNTUNED} and flags == []
    # Without the declaration the same arrays are two predictives that differ in the last bits: both shown.
    rows, own, _ = _collected_rows(arrays, {OWN_PREDICTIVE_KEY: "the mc link of its Gaussian"})
    assert rows == {f"m {UNTUNED}", f"m {TUNED}"} and own == set()


def test_a_declared_probit_that_the_stored_gaussian_contradicts_is_flagged() -> None:
    from bench.method_api import OWN_PREDICTIVE_KEY, PROBIT_AT_1

    arrays = _arrays(4.0)  # its own probabilities ignore the variance: not the probit at s = 1
    _, own, flags = _collected_rows(arrays, {OWN_PREDICTIVE_KEY: PROBIT_AT_1})
    assert own == {UNTUNED} and len(flags) == 1 and "declared the probit at s=1" in flags[0][1]
