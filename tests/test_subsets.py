"""bench.subsets: per-seed evaluation subsets, stratified by label."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.subsets import draw_subset


def test_each_seed_and_set_draws_its_own_reproducible_subset() -> None:
    a, b = draw_subset(1000, 100, 0, "test"), draw_subset(1000, 100, 1, "test")
    assert len(a) == len(np.unique(a)) == 100 and np.all(np.diff(a) > 0)
    assert not np.array_equal(a, b)
    assert np.array_equal(a, draw_subset(1000, 100, 0, "test"))
    assert not np.array_equal(a, draw_subset(1000, 100, 0, "ood/tweets"))


def test_limit_at_or_above_the_set_size_keeps_everything() -> None:
    assert np.array_equal(draw_subset(7, 7, 3, "x"), np.arange(7))
    assert np.array_equal(draw_subset(7, 50, 3, "x"), np.arange(7))


@pytest.mark.parametrize("seed", range(5))
def test_stratified_draw_keeps_each_class_share(seed: int) -> None:
    # 900 / 90 / 10: a plain random draw of 50 often misses class 2 or doubles it
    labels = torch.tensor([0] * 900 + [1] * 90 + [2] * 10)
    pick = draw_subset(len(labels), 50, seed, "test", labels)
    counts = np.bincount(labels[pick].numpy(), minlength=3)
    exact = np.array([900, 90, 10]) * 50 / 1000  # 45, 4.5, 0.5
    assert counts.sum() == 50 and np.all(np.abs(counts - exact) < 1)


def test_stratified_draw_of_balanced_labels_is_exactly_balanced() -> None:
    labels = torch.arange(10).repeat(100)
    pick = draw_subset(1000, 500, 2, "test", labels)
    assert np.array_equal(np.bincount(labels[pick].numpy()), np.full(10, 50))
