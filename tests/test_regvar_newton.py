"""Hessian-free pieces: exact curvature products against torch.func, batched CG against a solve."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import hessian, jacrev

from bench_methods.regvar import newton as regvar_newton
from bench_methods.regvar.common import FlatModel
from bench_methods.regvar.newton import (
    CurvatureKind,
    CurvatureProducts,
    LinearSoftmaxProducts,
    activations_per_row,
    batched_cg,
    curvature_products,
)

CPU = torch.device("cpu")
WD = 0.05


def problem(n: int = 40):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    torch.manual_seed(0)
    fm = FlatModel(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)), torch.float64, CPU)
    return fm, x, y


def objective(fm: FlatModel, x: torch.Tensor, y: torch.Tensor):
    return lambda t: nn.functional.cross_entropy(fm(t, x), y) + 0.5 * WD * t.pow(2).sum()


@pytest.mark.parametrize("vectorize", [False, True])
def test_hessian_products_equal_torch_func_hessian(vectorize: bool) -> None:
    fm, x, y = problem()
    h = hessian(objective(fm, x, y))(fm.theta0)
    products = CurvatureProducts(fm, x, y, WD, CurvatureKind.HESSIAN, vectorize=vectorize)
    v = torch.randn(3, fm.dim, dtype=torch.float64)
    torch.testing.assert_close(products.at(fm.theta0, v), v @ h)
    thetas = fm.theta0 + 0.1 * torch.randn(3, fm.dim, dtype=torch.float64)
    for i in range(3):  # stacked: each vector at its own point
        h_i = hessian(objective(fm, x, y))(thetas[i])
        torch.testing.assert_close(products.stacked(thetas, v)[i], h_i @ v[i])


@pytest.mark.parametrize("vectorize", [False, True])
def test_ggn_products_equal_the_gauss_newton_matrix(vectorize: bool) -> None:
    """Jᵀ Λ J / n + wd·I with J from jacrev and Λ the softmax cross-entropy Hessian per row."""
    fm, x, y = problem()
    jac = jacrev(lambda t: fm(t, x))(fm.theta0)  # (n, C, D)
    p = fm(fm.theta0, x).softmax(-1)
    lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    ggn = torch.einsum("ncd,nce,neD->dD", jac, lam, jac) / len(x) + WD * torch.eye(fm.dim, dtype=torch.float64)
    products = CurvatureProducts(fm, x, y, WD, CurvatureKind.GGN, vectorize=vectorize)
    v = torch.randn(2, fm.dim, dtype=torch.float64)
    torch.testing.assert_close(products.at(fm.theta0, v), v @ ggn)


def test_chunks_change_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    import bench_methods.regvar.newton as rn

    fm, x, y = problem()
    v = torch.randn(2, fm.dim, dtype=torch.float64)
    whole = CurvatureProducts(fm, x, y, WD).at(fm.theta0, v)
    monkeypatch.setattr(rn, "CHUNK_ELEMENTS", 7 * activations_per_row(fm, x))  # 7 rows per chunk
    chunked = CurvatureProducts(fm, x, y, WD)
    assert chunked.rows_per_chunk(1) == 7
    torch.testing.assert_close(chunked.at(fm.theta0, v), whole)
    grad = torch.func.grad(objective(fm, x, y))(fm.theta0)
    torch.testing.assert_close(chunked.gradient(fm.theta0[None])[0], grad)


def spd(dim: int, cond: float) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    return q @ torch.diag(torch.logspace(0, torch.log10(torch.tensor(cond)).item(), dim, dtype=torch.float64)) @ q.T


def test_batched_cg_solves_each_system_and_bx_grows_to_the_quadratic_form() -> None:
    a = spd(30, 1e3)
    b = torch.randn(4, 30, dtype=torch.float64)
    seen: dict[int, torch.Tensor] = {}
    res = batched_cg(lambda p, _r: p @ a, b, rtol=1e-12, max_iter=200, checkpoints=(2, 5, 10),
                     record=lambda k, x: seen.__setitem__(k, (b * x).sum(1)))
    exact = torch.linalg.solve(a, b.T).T
    torch.testing.assert_close(res.x, exact, rtol=1e-8, atol=1e-10)
    assert bool(res.converged.all()) and not bool(res.negative_curvature.any())
    quad = (b * exact).sum(1)
    assert bool(((seen[2] <= seen[5] + 1e-12) & (seen[5] <= seen[10] + 1e-12) & (seen[10] <= quad + 1e-9)).all())


def test_batched_cg_energy_rule_stops_early_with_the_variance_accurate() -> None:
    a = spd(200, 1e4)
    b = torch.randn(3, 200, dtype=torch.float64)
    res = batched_cg(lambda p, _r: p @ a, b, rtol=1e-14, max_iter=500, energy_tol=1e-4)
    full = batched_cg(lambda p, _r: p @ a, b, rtol=1e-14, max_iter=500)
    quad = (b * torch.linalg.solve(a, b.T).T).sum(1)
    assert bool(res.converged.all())
    assert int(res.iterations.max()) < 0.8 * int(full.iterations.min())
    assert float(((quad - (b * res.x).sum(1)) / quad).max()) < 1e-2


def test_batched_cg_flags_negative_curvature_and_non_convergence() -> None:
    a = torch.diag(torch.tensor([1.0, 2.0, -3.0, 4.0], dtype=torch.float64))
    b = torch.stack([torch.ones(4, dtype=torch.float64), torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=torch.float64)])
    res = batched_cg(lambda p, _r: p @ a, b, rtol=1e-10, max_iter=50)
    assert res.negative_curvature.tolist() == [True, False]
    assert res.converged.tolist() == [False, True]
    slow = batched_cg(lambda p, _r: p @ spd(50, 1e6), torch.ones(1, 50, dtype=torch.float64), 1e-12, max_iter=3)
    assert slow.iterations.tolist() == [3] and slow.converged.tolist() == [False]


def test_batched_cg_only_multiplies_active_right_hand_sides() -> None:
    a = spd(10, 10.0)
    calls: list[int] = []

    def matvec(p: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        calls.append(len(rows))
        return p @ a

    b = torch.stack([torch.zeros(10, dtype=torch.float64), torch.ones(10, dtype=torch.float64)])
    res = batched_cg(matvec, b, rtol=1e-10, max_iter=100)
    assert set(calls) == {1}  # the zero right-hand side is done before any product
    assert res.converged.tolist() == [True, True] and res.iterations[0] == 0


@pytest.mark.parametrize("frozen_bias", [False, True])
@pytest.mark.parametrize("kind", list(CurvatureKind))
def test_closed_form_linear_products_equal_the_autograd_ones(
    kind: CurvatureKind, frozen_bias: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """regvar-ll's read-out: the closed form and torch.func agree on products, stacked products
    at per-vector points, and gradients (Hessian = GGN for a linear softmax layer)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(70, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (70,), generator=g)
    torch.manual_seed(1)
    head = nn.Linear(6, 4)
    head.bias.requires_grad_(not frozen_bias)
    fm = FlatModel(head, torch.float64, CPU)
    fast = curvature_products(fm, x, y, WD, kind)
    slow = CurvatureProducts(fm, x, y, WD, kind, vectorize=True)
    assert isinstance(fast, LinearSoftmaxProducts) and fm.dim == 24 + (0 if frozen_bias else 4)
    v = torch.randn(5, fm.dim, generator=g, dtype=torch.float64)
    thetas = fm.theta0 + 0.3 * torch.randn(5, fm.dim, generator=g, dtype=torch.float64)
    torch.testing.assert_close(fast.at(fm.theta0, v), slow.at(fm.theta0, v))
    torch.testing.assert_close(fast.stacked(thetas, v), slow.stacked(thetas, v))
    torch.testing.assert_close(fast.gradient(thetas), slow.gradient(thetas))
    monkeypatch.setattr(regvar_newton, "LINEAR_CHUNK_ELEMENTS", 5 * 4 * 16)  # 16-row chunks sum the same
    assert len(list(fast._chunks(len(v)))) == 5
    torch.testing.assert_close(fast.at(fm.theta0, v), slow.at(fm.theta0, v))


def test_hidden_layer_networks_get_closed_form_products_unless_autograd_is_asked_for() -> None:
    from bench_methods.regvar.mlp import MLPProducts

    fm, x, y = problem()
    assert type(curvature_products(fm, x, y, WD)) is MLPProducts
    assert type(curvature_products(fm, x, y, WD, engine=regvar_newton.ProductEngine.AUTOGRAD)) is CurvatureProducts
    conv = FlatModel(nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(4, 3)), torch.float64, CPU)
    assert type(curvature_products(conv, x[:, None, :], y, WD)) is CurvatureProducts
