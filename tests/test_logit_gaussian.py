"""``bench.logit_gaussian``: the scores every method with a logit Gaussian gets, one definition."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.formulas import mutual_information
from bench.logit_gaussian import MI_SAMPLES, centred_var, diagonal, gaussian_scores, sampled_mutual_info, top_var


def _random_cov(n: int, c: int, seed: int) -> torch.Tensor:
    a = torch.randn(n, c, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a @ a.transpose(1, 2) + 0.1 * torch.eye(c, dtype=torch.float64)


def test_top_var_is_the_predicted_class_entry_in_both_forms() -> None:
    mean = torch.tensor([[0.0, 2.0, 1.0], [3.0, -1.0, 0.0]], dtype=torch.float64)
    cov = _random_cov(2, 3, 0)
    np.testing.assert_allclose(top_var(mean, cov).numpy(), [cov[0, 1, 1].item(), cov[1, 0, 0].item()])
    np.testing.assert_allclose(top_var(mean, diagonal(cov)).numpy(), top_var(mean, cov).numpy())


def test_centred_var_matches_numpy_and_ignores_the_common_mode() -> None:
    cov = _random_cov(4, 5, 1)
    h = np.eye(5) - np.ones((5, 5)) / 5
    expected = [np.trace(h @ c @ h) for c in cov.numpy()]
    np.testing.assert_allclose(centred_var(cov).numpy(), expected, rtol=1e-12)
    common = 7.0 * torch.ones(1, 5, 5, dtype=torch.float64)  # all logits move together: softmax unchanged
    assert centred_var(common).item() == pytest.approx(0.0, abs=1e-12)
    assert top_var(torch.zeros(1, 5), common).item() == 7.0  # the uncentred score would count it
    diag = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    assert centred_var(diag).item() == pytest.approx(6.0 * (1 - 1 / 3))


def test_sampled_mutual_info_is_the_sample_formula_on_seeded_draws_and_zero_without_variance() -> None:
    mean = torch.randn(6, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    var = torch.rand(6, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    g = torch.Generator().manual_seed(11)
    z = torch.randn((MI_SAMPLES, 6, 4), generator=g, dtype=torch.float64)
    expected = mutual_information((mean + z * var.sqrt()).softmax(-1))
    torch.testing.assert_close(sampled_mutual_info(mean, var, seed=11), expected)
    assert torch.equal(sampled_mutual_info(mean, var, 11), sampled_mutual_info(mean, var, 11))  # seeded
    assert sampled_mutual_info(mean, torch.zeros_like(var), 0).abs().max() < 1e-12
    full = torch.diag_embed(var)  # a diagonal given in full draws the same logits
    torch.testing.assert_close(sampled_mutual_info(mean, full, 11), expected, rtol=1e-6, atol=1e-9)


def test_gaussian_scores_names() -> None:
    scores = gaussian_scores(torch.zeros(3, 2), torch.ones(3, 2), seed=0)
    assert sorted(scores) == ["centred_var", "mutual_info", "top_var"]
    assert all(v.dtype == torch.float64 and v.shape == (3,) for v in scores.values())
