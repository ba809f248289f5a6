"""``bench.prediction_arrays``: packing, reading, cutting and checking a run's npz arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.errors import BenchError
from bench.metrics import evaluate
from bench.prediction_arrays import TEST, VAL, PredictionArrays, ood_set, shift_set
from bench.types import Prediction

N, C = 6, 3


def _probs(n: int = N, c: int = C, seed: int = 0) -> torch.Tensor:
    return torch.softmax(torch.randn(n, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), 1)


def _gaussian(n: int) -> Prediction:
    mean = torch.randn(n, C, generator=torch.Generator().manual_seed(n))
    return Prediction(mean.double().softmax(1), {"variance": torch.ones(n)}, mean, torch.full((n, C), 0.5))


def _packed(indices: dict[str, np.ndarray] | None = None) -> PredictionArrays:
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    return PredictionArrays.pack(
        _gaussian(N), labels, {"far": _gaussian(4)}, {"noisy": (_gaussian(5), labels[:5])},
        val=(_gaussian(7), torch.arange(7) % C), indices=indices)


def test_packed_predictions_read_back_per_set_and_give_the_metrics_of_the_tensors() -> None:
    packed = _packed()
    assert packed.problem() is None and packed.has_gaussian
    assert packed.sets() == [TEST, ood_set("far"), shift_set("noisy")]
    assert packed.ood_names() == ["far"] and packed.shift_names() == ["noisy"]
    assert packed.probs(TEST).dtype == np.float64 and packed.scores(ood_set("far"))["variance"].shape == (4,)
    mean, var = packed.gaussian(VAL)
    assert mean.shape == var.shape == (7, C) and (var == 0.5).all()
    test, far, noisy = _gaussian(N), _gaussian(4), _gaussian(5)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    expected = evaluate(test.probs, labels, test.scores, ood={"far": (far.probs, far.scores)},
                        shift={"noisy": (noisy.probs, labels[:5])})
    assert evaluate(**packed.metric_inputs()) == expected


def test_logit_gaussians_are_stored_in_half_precision_unless_out_of_range() -> None:
    probs = torch.full((2, 3), 1 / 3, dtype=torch.float64)
    labels = torch.zeros(2, dtype=torch.int64)
    full_cov = torch.eye(3).expand(2, 3, 3)
    small = PredictionArrays.pack(Prediction(probs, {}, torch.zeros(2, 3), full_cov), labels, {}, {})
    mean, var = small.gaussian(TEST)
    assert mean.dtype == var.dtype == np.float16 and var.tolist() == [[1, 1, 1]] * 2  # full covariance: its diagonal
    huge = PredictionArrays.pack(Prediction(probs, {}, torch.zeros(2, 3), torch.full((2, 3), 1e6)), labels, {}, {})
    assert huge.gaussian(TEST)[1].dtype == np.float32 and huge.gaussian(TEST)[0].dtype == np.float16
    plain = PredictionArrays.pack(Prediction(probs), labels, {}, {})
    assert not plain.has_gaussian and set(plain.arrays) == {"test/probs", "test/labels"}


def test_restrict_cuts_each_set_to_its_rows_and_refuses_rows_past_the_end() -> None:
    full = _packed()
    cut = full.restrict({TEST: np.array([4, 0]), ood_set("far"): np.array([3])})
    np.testing.assert_array_equal(cut.probs(TEST), full.probs(TEST)[[4, 0]])
    np.testing.assert_array_equal(cut.gaussian(TEST)[0], full.gaussian(TEST)[0][[4, 0]])
    assert cut.labels(TEST).tolist() == [1, 0] and len(cut.probs(ood_set("far"))) == 1
    np.testing.assert_array_equal(cut.probs(shift_set("noisy")), full.probs(shift_set("noisy")))  # not cut
    assert cut.subset_indices() == {}
    with pytest.raises(BenchError, match="indexes past its 6 rows"):
        full.restrict({TEST: np.array([6])})


def test_a_capped_runs_subset_rows_travel_with_its_arrays() -> None:
    capped = _packed({TEST: np.array([3, 1, 5, 0, 2, 4]), VAL: np.arange(7)})
    assert capped.problem() is None
    assert capped.subset_indices()[TEST].tolist() == [3, 1, 5, 0, 2, 4]


def test_with_probs_replaces_every_sets_probabilities_and_keeps_only_what_is_evaluated() -> None:
    packed = _packed({TEST: np.arange(N)})
    uniform = packed.with_probs(lambda where: np.full_like(packed.probs(where), 1 / C), drop_scores=("variance",))
    assert uniform.problem() is None and not uniform.has_gaussian
    assert all((uniform.probs(where) == 1 / C).all() for where in uniform.sets())
    assert uniform.scores(TEST) == {} and not any(k.startswith("val/") for k in uniform.arrays)
    assert uniform.subset_indices()[TEST].tolist() == list(range(N))
    np.testing.assert_array_equal(uniform.labels(shift_set("noisy")), packed.labels(shift_set("noisy")))


def _arrays() -> dict[str, np.ndarray]:
    p = _probs().numpy()
    return {"test/probs": p, "test/labels": np.array([0, 1, 2, 0, 1, 2]), "test/score/variance": np.ones(N),
            "ood/far/probs": p[:4], "ood/far/score/variance": np.ones(4),
            "shift/noisy/probs": p[:5], "shift/noisy/labels": np.zeros(5, dtype=np.int64),
            "index/test": np.arange(N)}


def test_consistent_arrays_have_no_problem() -> None:
    assert PredictionArrays(_arrays()).problem() is None


@pytest.mark.parametrize("change,message", [
    (lambda a: a.pop("test/labels"), "lacks test/probs or test/labels"),
    (lambda a: a.pop("shift/noisy/labels"), "lacks shift/noisy/labels"),
    (lambda a: a.pop("ood/far/probs"), "lacks ood/far/probs"),
    (lambda a: a.update({"ood/far/score/variance": np.ones(5)}), "ood/far: score 'ood/far/score/variance'"),
    (lambda a: a.update({"test/labels": np.arange(N - 1)}), "expected 6 integer labels"),
    (lambda a: a.update({"test/labels": np.array([0, 1, 2, 3, 0, 1])}), "labels outside 0..2"),
    (lambda a: a.update({"shift/noisy/probs": np.full((5, C), np.nan)}), "NaN or inf"),
    (lambda a: a.update({"ood/far/probs": _probs(4, C + 1).numpy()}), "4 classes, the task has 3"),
    (lambda a: a.update({"index/test": np.arange(3)}), "index/test has shape"),
    (lambda a: a.update({"whatever": np.ones(3)}), "unexpected array 'whatever'"),
    (lambda a: a.update({"val/labels": np.zeros(2, dtype=np.int64)}), "val: it has labels but no logit Gaussian"),
    (lambda a: a.update({"ood/far/logit_mean": np.zeros((4, C))}), "only one of logit_mean and logit_var"),
    (lambda a: a.update({"ood/far/logit_mean": np.zeros((3, C)), "ood/far/logit_var": np.ones((3, C))}),
     "are not 4 x 3"),
])
def test_inconsistent_arrays_are_named(change, message: str) -> None:
    arrays = _arrays()
    change(arrays)
    problem = PredictionArrays(arrays).problem()
    assert problem is not None and message in problem
