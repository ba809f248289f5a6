"""The one definition of a valid prediction and a valid result file."""

from __future__ import annotations

import pytest
import torch

from bench.validation import prediction_problem, probs_problem, score_problem

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
