"""The one definition of a valid prediction and a valid result file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.validation import arrays_problem, prediction_problem, probs_problem, score_problem

N, C = 6, 3


def _probs(n: int = N, c: int = C) -> torch.Tensor:
    return torch.softmax(torch.randn(n, c, generator=torch.Generator().manual_seed(0)), 1)


def test_a_valid_prediction_has_no_problem() -> None:
    assert prediction_problem(_probs(), {"variance": torch.rand(N) * 1e20}, N, C) is None
    assert prediction_problem(_probs().float(), {}, N, C) is None  # float32 sums to 1 within the tolerance


@pytest.mark.parametrize("probs,message", [
    (_probs(N + 1), "expected (6, 3) for 6 inputs"),
    (_probs()[:, :2].softmax(1), "2 classes, the task has 3"),
    (_probs().reshape(-1), "expected (6, 3)"),
    (torch.where(torch.arange(N)[:, None] == 2, float("nan"), _probs()), "NaN or inf in 1 of 6 rows"),
    (_probs() * 2, "do not sum to 1"),
    (torch.tensor([[1.5, -0.5, 0.0]] * N), "negative"),
    (torch.ones(N, C, dtype=torch.long), "not floating point"),
    (_probs().numpy().tolist(), "not a tensor"),
])
def test_bad_probabilities_are_named(probs: object, message: str) -> None:
    problem = probs_problem(probs, N, C)
    assert problem is not None and message in problem


@pytest.mark.parametrize("score,message", [
    (torch.rand(N + 1), "expected (6,)"),
    (torch.rand(N, 1), "expected (6,)"),
    (torch.tensor([0.1, float("nan"), 0.2, float("inf"), 0.3, 0.4]), "NaN or inf for 2 of 6"),
    ([0.1] * N, "not a tensor"),
])
def test_bad_scores_are_named(score: object, message: str) -> None:
    problem = score_problem("variance", score, N)
    assert problem is not None and "'variance'" in problem and message in problem
    assert message in prediction_problem(_probs(), {"variance": score}, N, C)


def _arrays() -> dict[str, np.ndarray]:
    p = _probs().double().numpy()
    return {"test/probs": p, "test/labels": np.array([0, 1, 2, 0, 1, 2]), "test/score/variance": np.ones(N),
            "ood/far/probs": p[:4], "ood/far/score/variance": np.ones(4),
            "shift/noisy/probs": p[:5], "shift/noisy/labels": np.zeros(5, dtype=np.int64),
            "index/test": np.arange(N)}


def test_consistent_arrays_have_no_problem() -> None:
    assert arrays_problem(_arrays()) is None


@pytest.mark.parametrize("change,message", [
    (lambda a: a.pop("test/labels"), "lacks test/probs or test/labels"),
    (lambda a: a.pop("shift/noisy/labels"), "lacks shift/noisy/labels"),
    (lambda a: a.pop("ood/far/probs"), "lacks ood/far/probs"),
    (lambda a: a.update({"ood/far/score/variance": np.ones(5)}), "ood/far: score 'ood/far/score/variance'"),
    (lambda a: a.update({"test/labels": np.arange(N - 1)}), "expected 6 integer labels"),
    (lambda a: a.update({"test/labels": np.array([0, 1, 2, 3, 0, 1])}), "labels outside 0..2"),
    (lambda a: a.update({"shift/noisy/probs": np.full((5, C), np.nan)}), "NaN or inf"),
    (lambda a: a.update({"ood/far/probs": _probs(4, C + 1).double().numpy()}), "4 classes, the task has 3"),
    (lambda a: a.update({"index/test": np.arange(3)}), "index/test has shape"),
    (lambda a: a.update({"whatever": np.ones(3)}), "unexpected array 'whatever'"),
])
def test_inconsistent_arrays_are_named(change, message: str) -> None:
    arrays = _arrays()
    change(arrays)
    problem = arrays_problem(arrays)
    assert problem is not None and message in problem
