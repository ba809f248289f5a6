"""``bench.scale_tuning``: the one variance-scale rule (grid, validation NLL, edge flags)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bench.errors import BenchError
from bench.scale_tuning import SCALE_GRID, scale_edge_flag, tune_scale


def test_tune_scale_prefers_large_scale_for_overconfident_logits() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (200,), generator=g)
    logits = 8.0 * torch.randn(200, 3, generator=g)  # confident and unrelated to the labels
    s, nll = tune_scale(logits, torch.ones(200), labels)
    assert s >= 100
    s0, nll0 = tune_scale(logits, torch.ones(200), labels, grid=(1e-4,))
    assert nll < nll0 and s0 == 1e-4
    with pytest.raises(BenchError):
        tune_scale(logits, torch.ones(200), labels, grid=())


def test_a_scale_on_the_grid_floor_is_flagged_as_variance_switched_off() -> None:
    # a well-calibrated, confident MAP: any variance only hurts, so the floor wins on validation
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (300,), generator=g)
    logits = 6.0 * nn.functional.one_hot(labels, 3).double()
    s, _ = tune_scale(logits, torch.full((300,), 5.0), labels)
    assert s == SCALE_GRID[0]
    small, huge = torch.full((300,), 5.0), torch.full((300,), 1e6)
    assert "switched off" in scale_edge_flag(s, small) and "floor" in scale_edge_flag(s, small)
    # a huge variance still acts at the floor: then the flag does not claim it is off
    assert "may lie below the grid" in scale_edge_flag(s, huge) and "switched off" not in scale_edge_flag(s, huge)
    assert "ceiling" in scale_edge_flag(SCALE_GRID[-1], small)
    assert scale_edge_flag(1.0, small) is None and scale_edge_flag(SCALE_GRID[1], small) is None


def test_scale_tuning_refuses_a_nan_objective() -> None:
    """A NaN validation NLL (NaN variances) is an error, never a chosen scale."""
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.1]])
    variance = torch.tensor([float("nan"), 0.3])
    with pytest.raises(BenchError, match="not finite"):
        tune_scale(logits, variance, torch.tensor([0, 1]))
    scale, value = tune_scale(logits, torch.tensor([0.1, 0.3]), torch.tensor([0, 1]))
    assert math.isfinite(value) and scale > 0


def test_a_flat_validation_curve_is_stated_not_reported_as_an_edge() -> None:
    """Variances too small to move any probability: every s gives the same NLL within noise, so
    the floor is no choice, and the flag says the variance does not change NLL."""
    from bench.scale_tuning import flat_within_noise, scale_curve

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 3, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, 3, (300,), generator=g)
    tiny = torch.full((300, 3), 1e-9, dtype=torch.float64)
    curve = scale_curve(logits, tiny, labels)
    assert flat_within_noise(curve)
    s, _ = tune_scale(logits, tiny, labels)
    assert "does not change validation NLL" in scale_edge_flag(s, tiny, curve=curve)
    # a real effect is not flat: overconfident logits with unit variances prefer a large s
    confident = torch.randn(300, 3, generator=g, dtype=torch.float64) * 8
    ones = torch.ones(300, 3, dtype=torch.float64)
    steep = scale_curve(confident, ones, labels)
    assert not flat_within_noise(steep)
    s, _ = tune_scale(confident, ones, labels)
    flag = scale_edge_flag(s, ones, curve=steep)
    assert flag is None or "does not change" not in flag


def test_flatness_is_a_paired_bootstrap_against_the_best_point() -> None:
    from bench.scale_tuning import flat_within_noise

    base = torch.rand(2, 400, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    same_plus_noise = torch.stack([base[0], base[0] + 1e-6 * (base[1] - 0.5)])
    assert flat_within_noise(same_plus_noise)
    shifted = torch.stack([base[0], base[0] + 0.05])  # every input worse by 0.05: not noise
    assert not flat_within_noise(shifted)
