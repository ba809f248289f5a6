"""Guarded NLL, prior tuning guards and batched prediction shared by the Laplace methods."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import TensorDataset

from bench.errors import BenchError
from bench_methods.laplace_common import (
    GuardedNLL,
    Link,
    PriorMethod,
    PriorStructure,
    log_grid,
    nll_of,
    predict_batched,
    tune_prior,
)


def test_nll_is_finite_when_a_true_class_has_probability_zero():
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    nll = nll_of(probs, torch.tensor([1, 0]))
    assert math.isfinite(float(nll)) and float(nll) > 100  # clamped, still heavily penalised


def test_nll_nan_becomes_inf_and_matches_plain_nll_otherwise():
    assert float(nll_of(torch.full((2, 2), float("nan")), torch.tensor([0, 1]))) == math.inf
    probs = torch.tensor([[0.2, 0.8], [0.6, 0.4]])
    expected = -(math.log(0.8) + math.log(0.6)) / 2
    assert float(nll_of(probs, torch.tensor([1, 0]))) == pytest.approx(expected)


def test_guarded_nll_is_stateless_between_calls():
    metric = GuardedNLL()
    y = torch.tensor([0])
    a = metric(torch.tensor([[0.9, 0.1]]), y)
    b = metric(torch.tensor([[0.1, 0.9]]), y)
    assert float(b) == pytest.approx(-math.log(0.1))  # not a running mean with the first call
    assert metric.history == pytest.approx([float(a), float(b)])


class FakeLaplace:
    def __init__(self) -> None:
        self.prior_precision = torch.tensor([1.0])


def tune(la, val_nll, method=PriorMethod.GRIDSEARCH, structure=PriorStructure.SCALAR):
    val = TensorDataset(torch.zeros(3, 1), torch.zeros(3, dtype=torch.long))
    return tune_prior(la, method, structure, 1.0, marglik_steps=1, marglik_lr=0.1,
               grid=log_grid(-1, 1, 3), val=val, batch_size=2, link=Link.PROBIT, n_samples=1,
               val_nll=val_nll)


def test_gridsearch_takes_the_argmin():
    la = FakeLaplace()
    scores = iter([3.0, 1.0, 2.0])
    assert tune(la, lambda: next(scores)) is None  # an interior optimum: no flag
    assert la.prior_precision == pytest.approx(1.0)


@pytest.mark.parametrize(("scores", "edge"), [([1.0, 2.0, 3.0], "floor"), ([3.0, 2.0, 1.0], "ceiling")])
def test_gridsearch_on_a_grid_edge_returns_a_flag(scores: list[float], edge: str) -> None:
    values = iter(scores)
    flag = tune(FakeLaplace(), lambda: next(values))
    assert flag is not None and f"prior precision={0.1 if edge == 'floor' else 10:g} is on the {edge}" in flag


def test_gridsearch_with_no_finite_value_is_refused():
    with pytest.raises(BenchError, match="not finite at any grid value"):
        tune(FakeLaplace(), lambda: math.inf)


def test_fixed_prior_sets_the_value():
    la = FakeLaplace()
    tune(la, None, method=PriorMethod.FIXED)
    assert la.prior_precision == 1.0


def test_grid_bounds_order_checked():
    with pytest.raises(BenchError, match="grid_min"):
        log_grid(2, 1, 3)
    torch.testing.assert_close(log_grid(-1, 1, 3), torch.tensor([0.1, 1.0, 10.0]))


def test_predict_batched_batches_and_scores():
    seen = []

    def functional(x):
        seen.append(len(x))
        f_var = torch.diag_embed(x.expand(-1, 2) ** 2)
        return torch.zeros(len(x), 2), f_var

    x = torch.arange(5.0).reshape(5, 1)
    pred = predict_batched(functional, lambda m, v: torch.softmax(m, 1), x, 2,
                           lambda it, **_: it, "t")
    assert seen == [2, 2, 1]
    torch.testing.assert_close(pred.scores["variance"], (x.reshape(-1) ** 2).double())
    assert pred.probs.shape == (5, 2) and pred.probs.dtype == torch.float64
    empty = predict_batched(functional, None, x[:0], 2, lambda it, **_: it, "t")
    assert empty.probs.shape[0] == 0 and empty.scores["variance"].shape == (0,)
