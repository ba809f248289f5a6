"""Closed-form MLP curvature products against torch.func's, and the Kronecker preconditioner."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bench_methods.regvar import mlp as regvar_mlp
from bench_methods.regvar.common import FlatModel
from bench_methods.regvar.kfac import KroneckerPreconditioner
from bench_methods.regvar.mlp import MLPProducts, mlp_layers
from bench_methods.regvar.newton import CurvatureKind, CurvatureProducts, batched_cg

CPU = torch.device("cpu")
WD = 0.05


def data(n: int = 60, d: int = 5, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


def mlp(activation: type[nn.Module], bias: bool, depth: int = 2) -> FlatModel:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Dropout(0.3), nn.Linear(5, 6, bias=bias), activation()]
    if depth == 3:
        layers += [nn.Dropout(0.1), nn.Linear(6, 4, bias=bias), activation()]
    layers.append(nn.Linear(layers[-2].out_features, 3))
    return FlatModel(nn.Sequential(*layers), torch.float64, CPU)


@pytest.mark.parametrize("kind", list(CurvatureKind))
@pytest.mark.parametrize(("activation", "bias", "depth"),
                         [(nn.ReLU, True, 2), (nn.Tanh, True, 2), (nn.Tanh, False, 3), (nn.ReLU, True, 3)])
def test_products_equal_the_autograd_products(kind: CurvatureKind, activation: type[nn.Module], bias: bool,
                                              depth: int, monkeypatch: pytest.MonkeyPatch) -> None:
    fm = mlp(activation, bias, depth)
    x, y = data()
    v = torch.randn(4, fm.dim, dtype=torch.float64)
    reference = CurvatureProducts(fm, x, y, WD, kind, vectorize=True).at(fm.theta0, v)
    torch.testing.assert_close(MLPProducts(fm, x, y, WD, kind).at(fm.theta0, v), reference)
    monkeypatch.setattr(regvar_mlp, "ROW_CHUNK_ELEMENTS", 64 * 4 * 6)  # 64-row chunks sum the same
    chunked = MLPProducts(fm, x, y, WD, kind)
    assert len(chunked._row_chunks(4)) == 1 and len(chunked._row_chunks(1)) == 1
    monkeypatch.setattr(regvar_mlp, "ROW_CHUNK_ELEMENTS", 6)  # the floor: 64 rows per chunk
    x2, y2 = data(n=150)
    chunked = MLPProducts(fm, x2, y2, WD, kind)
    assert len(chunked._row_chunks(4)) == 3
    torch.testing.assert_close(chunked.at(fm.theta0, v),
                               CurvatureProducts(fm, x2, y2, WD, kind, vectorize=True).at(fm.theta0, v))


def test_products_at_a_new_point_recompute_the_forward_state() -> None:
    fm = mlp(nn.Tanh, True)
    x, y = data()
    products, reference = MLPProducts(fm, x, y, WD), CurvatureProducts(fm, x, y, WD, vectorize=True)
    v = torch.randn(2, fm.dim, dtype=torch.float64)
    products.at(fm.theta0, v)
    moved = fm.theta0 + 0.2
    torch.testing.assert_close(products.at(moved, v), reference.at(moved, v))


def test_only_plain_trainable_mlps_qualify() -> None:
    assert mlp_layers(mlp(nn.ReLU, True)) is not None
    frozen = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    frozen[0].weight.requires_grad_(False)
    others = [
        frozen,
        nn.Sequential(nn.Linear(5, 6), nn.GELU(), nn.Linear(6, 3)),
        nn.Sequential(nn.Linear(5, 6), nn.ReLU()),
        nn.Sequential(nn.Linear(5, 6), nn.Linear(6, 3)),
        nn.Linear(5, 3),
    ]
    for net in others:
        assert mlp_layers(FlatModel(net, torch.float64, CPU)) is None, net


def test_preconditioner_inverts_the_kronecker_blocks_plus_weight_decay() -> None:
    """One layer: M = G ⊗ A + wd·I with G the mean softmax Hessian and A the mean outer product
    of the inputs with a ones column, formed here explicitly and inverted densely."""
    torch.manual_seed(0)
    fm = FlatModel(nn.Sequential(nn.Linear(5, 3)), torch.float64, CPU)
    x, y = data()
    products = MLPProducts(fm, x, y, WD)
    p = fm(fm.theta0, x).softmax(-1)
    g = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(0)
    xt = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    a = xt.T @ xt / len(x)
    m = torch.kron(g, a) + WD * torch.eye(18, dtype=torch.float64)  # row-major vec of [W | b]
    r = torch.randn(3, fm.dim, dtype=torch.float64)
    aug = torch.cat([r[:, :15].view(3, 3, 5), r[:, 15:, None]], 2).reshape(3, 18)
    z = torch.linalg.solve(m, aug.T).T.view(3, 3, 6)
    expected = torch.cat([z[:, :, :5].reshape(3, 15), z[:, :, 5]], 1)
    torch.testing.assert_close(KroneckerPreconditioner(products, fm.theta0)(r), expected)


@pytest.mark.parametrize("depth", [1, 3])
def test_preconditioned_cg_solves_the_same_system(depth: int) -> None:
    """Inputs on scales from 0.01 to 100 make the curvature ill-conditioned the way KFAC's input
    factor captures: for softmax regression it then needs fewer iterations. (Whether it saves
    iterations on a deeper network depends on the network; bench perf regvar measures it.)"""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 3)) if depth == 1 else mlp(nn.Tanh, True, depth=3).module
    fm = FlatModel(net, torch.float64, CPU)
    x, y = data(n=200)
    x = x * torch.logspace(-2, 2, 5, dtype=torch.float64)
    products = MLPProducts(fm, x, y, 1e-3, CurvatureKind.GGN)  # positive definite
    b = torch.randn(5, fm.dim, dtype=torch.float64)
    plain = batched_cg(lambda v, _r: products.at(fm.theta0, v), b, 1e-10, 2000)
    pre = batched_cg(lambda v, _r: products.at(fm.theta0, v), b, 1e-10, 2000,
                     precondition=KroneckerPreconditioner(products, fm.theta0))
    assert bool(plain.converged.all() and pre.converged.all())
    torch.testing.assert_close(pre.x, plain.x, rtol=1e-6, atol=1e-6 * float(plain.x.abs().max()))
    if depth == 1:
        assert int(pre.iterations.max()) < int(plain.iterations.min()) / 2
