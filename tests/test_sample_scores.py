"""Mean predictive, expected entropy and mutual information from sample stacks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bench_methods.sample_scores import (
    batched_summary,
    expected_entropy,
    mean_predictive,
    mutual_information,
    summarize,
)


def random_stack(s: int, n: int, c: int, seed: int = 0, sharp: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (sharp * torch.randn(s, n, c, generator=g)).softmax(dim=-1)


def numpy_reference(stack: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The textbook formulas, written independently in numpy."""
    mean = stack.mean(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = lambda p: -np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=-1)  # noqa: E731
    expected = ent(stack).mean(axis=0)
    return mean, expected, ent(mean) - expected


@pytest.mark.parametrize("s,n,c", [(1, 5, 2), (5, 7, 3), (32, 11, 10)])
def test_matches_numpy(s: int, n: int, c: int) -> None:
    stack = random_stack(s, n, c, seed=s)
    mean, exp_ent, mi = numpy_reference(stack.double().numpy())
    np.testing.assert_allclose(mean_predictive(stack).numpy(), mean, rtol=0, atol=1e-12)
    np.testing.assert_allclose(expected_entropy(stack).numpy(), exp_ent, rtol=0, atol=1e-12)
    np.testing.assert_allclose(
        mutual_information(stack).numpy(), np.maximum(mi, 0), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("sharp", [0.1, 3.0, 30.0])
def test_mutual_information_nonnegative(sharp: float) -> None:
    mi = mutual_information(random_stack(8, 200, 5, sharp=sharp))
    assert (mi >= 0).all()
    assert (mi > 0).any()


@pytest.mark.parametrize("sharp", [0.1, 3.0, 30.0])
def test_mutual_information_zero_when_samples_agree(sharp: float) -> None:
    one = random_stack(1, 50, 4, sharp=sharp)
    stack = one.expand(6, -1, -1)
    assert torch.all(mutual_information(stack) < 1e-12)
    torch.testing.assert_close(expected_entropy(stack), expected_entropy(one))


def test_disagreeing_one_hot_members() -> None:
    """Two confident members that disagree: all uncertainty is epistemic, MI = log 2."""
    stack = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    assert expected_entropy(stack).item() == 0.0
    assert mutual_information(stack).item() == pytest.approx(math.log(2), abs=1e-12)
    torch.testing.assert_close(mean_predictive(stack), torch.tensor([[0.5, 0.5]]).double())


def test_summarize_decomposes_total_entropy() -> None:
    stack = random_stack(5, 30, 6)
    pred = summarize(stack)
    assert set(pred.scores) == {"mutual_info", "expected_entropy"}
    torch.testing.assert_close(pred.probs.sum(dim=1), torch.ones(30, dtype=torch.float64))
    total = torch.special.entr(pred.probs).sum(dim=1)
    torch.testing.assert_close(pred.scores["mutual_info"] + pred.scores["expected_entropy"], total)


@pytest.mark.parametrize("batch_size", [1, 4, 7, 100])
def test_batched_summary_equals_whole(batch_size: int) -> None:
    stack = random_stack(3, 13, 4)
    x = torch.arange(13)
    whole = summarize(stack)
    pred = batched_summary(x, lambda xb: stack[:, xb], torch.device("cpu"), batch_size)
    torch.testing.assert_close(pred.probs, whole.probs)
    for name in whole.scores:
        torch.testing.assert_close(pred.scores[name], whole.scores[name])


def test_bad_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="S x N x C"):
        mutual_information(torch.rand(4, 3))
