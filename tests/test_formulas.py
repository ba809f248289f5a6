"""bench.formulas: the one probit, NLL and entropy, cross-checked against sklearn and scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import entropy as scipy_entropy
from sklearn.metrics import log_loss

from bench.formulas import entropy, nll, probit_probs


def test_nll_matches_sklearn_log_loss_including_confidence_exactly_one() -> None:
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.5, 0.3], [0.0, 0.0, 1.0], [0.4, 0.4, 0.2]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0])
    assert nll(probs, labels) == pytest.approx(log_loss(labels.numpy(), probs.numpy(), labels=[0, 1, 2]), abs=1e-12)


def test_nll_of_a_zero_probability_is_huge_not_inf() -> None:
    value = nll(torch.tensor([[1.0, 0.0]]), torch.tensor([1]))
    assert math.isfinite(value) and value == pytest.approx(-math.log(torch.finfo(torch.float64).tiny))


def test_entropy_matches_scipy_with_zeros_and_ties() -> None:
    probs = np.array([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0.0], [0.7, 0.2, 0.1]])
    np.testing.assert_allclose(entropy(torch.from_numpy(probs)).numpy(), scipy_entropy(probs, axis=1), atol=1e-15)


@pytest.mark.parametrize("shape", ["per-input", "per-logit", "covariance"])
def test_probit_reads_every_variance_shape_the_same_way(shape: str) -> None:
    g = torch.Generator().manual_seed(0)
    logits, var = 3 * torch.randn(5, 4, generator=g), torch.rand(5, 4, generator=g) * 10
    if shape == "per-input":
        var = var[:, 0]
        expected = (logits.double() / torch.sqrt(1 + math.pi / 8 * var.double())[:, None]).softmax(1)
        given = var
    else:
        expected = (logits.double() / torch.sqrt(1 + math.pi / 8 * var.double())).softmax(1)
        off_diagonal = 0.3 * (1 - torch.eye(4))  # does not enter the probit
        given = var if shape == "per-logit" else torch.diag_embed(var) + off_diagonal
    torch.testing.assert_close(probit_probs(logits, given), expected)
    torch.testing.assert_close(probit_probs(logits, given, 2.0), probit_probs(logits, 2 * given))


def test_probit_without_variance_is_the_softmax_and_variance_flattens_it() -> None:
    logits = torch.tensor([[4.0, 0.0], [1.0, -1.0]])
    torch.testing.assert_close(probit_probs(logits, torch.zeros(2)), logits.double().softmax(1))
    flat = probit_probs(logits, torch.tensor([100.0, 100.0]))
    assert (flat.max(1).values < logits.double().softmax(1).max(1).values).all()
    torch.testing.assert_close(probit_probs(logits, torch.tensor([-1e-9, 0.0])), logits.double().softmax(1))
