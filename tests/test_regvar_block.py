"""Block conjugate gradients against a dense solve, and their failure flags."""

from __future__ import annotations

import torch

from bench_methods.regvar.block import block_cg
from bench_methods.regvar.newton import batched_cg


def spd_with_outliers(dim: int = 120, outliers: int = 12, seed: int = 0, top: float = 5.0) -> torch.Tensor:
    """Eigenvalues in [1, 2] plus a few far above: plain CG spends an iteration on each outlier,
    a block shares them between its right-hand sides."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    values = 1.0 + torch.rand(dim, generator=g, dtype=torch.float64)
    values[:outliers] = torch.logspace(2, top, outliers, dtype=torch.float64)
    return (q * values) @ q.T


def test_block_cg_solves_every_system_in_fewer_iterations_than_plain_cg() -> None:
    a = spd_with_outliers()
    b = torch.randn(8, 120, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    block = block_cg(lambda p, _r: p @ a, b, rtol=1e-10, max_iter=200)
    plain = batched_cg(lambda p, _r: p @ a, b, rtol=1e-10, max_iter=200)
    exact = torch.linalg.solve(a, b.T).T
    torch.testing.assert_close(block.x, exact, rtol=1e-7, atol=1e-9)
    assert bool(block.converged.all()) and not bool(block.negative_curvature.any())
    assert int(block.iterations.max()) < int(plain.iterations.min())


def test_variance_grows_monotonically_and_the_energy_rule_stops_early_accurately() -> None:
    a = spd_with_outliers(outliers=30)
    b = torch.randn(4, 120, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    exact = (b * torch.linalg.solve(a, b.T).T).sum(1)
    seen: dict[int, torch.Tensor] = {}
    full = block_cg(lambda p, _r: p @ a, b, 1e-12, 200, checkpoints=range(1, 8),
                    record=lambda k, x: seen.__setitem__(k, (b * x).sum(1)))
    steps = torch.stack([seen[k] for k in sorted(seen)])
    assert bool((steps[1:] >= steps[:-1] - 1e-12).all())  # bᵀx_k never decreases
    early = block_cg(lambda p, _r: p @ a, b, 1e-14, 200, energy_tol=1e-4, energy_delay=2)
    assert int(early.iterations.max()) < int(full.iterations.max())
    assert float(((b * early.x).sum(1) / exact - 1).abs().max()) < 1e-4


def test_dependent_right_hand_sides_are_solved_and_an_indefinite_matrix_is_flagged() -> None:
    a = spd_with_outliers(dim=40, top=3.0)
    b = torch.randn(3, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    b = torch.cat([b, b[:1], 2 * b[1:2]])  # rank 3 of 5
    res = block_cg(lambda p, _r: p @ a, b, rtol=1e-10, max_iter=100)
    torch.testing.assert_close(res.x, torch.linalg.solve(a, b.T).T, rtol=1e-7, atol=1e-9)
    indefinite = a - 1.5 * torch.eye(40, dtype=torch.float64)
    bad = block_cg(lambda p, _r: p @ indefinite, b, rtol=1e-10, max_iter=100)
    assert bool(bad.negative_curvature.all()) and not bool(bad.converged.any())
