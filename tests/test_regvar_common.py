"""Shared RegVar pieces: probit predictive as RegVar uses it, flat model, batched solvers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bench.formulas import probit_probs
from bench_methods.regvar.common import (
    FlatModel,
    Optimizer,
    Precision,
    Regularizer,
    SolverSettings,
    StackedObjective,
    mean_cross_entropy,
    resolve,
    solve,
)

CPU = torch.device("cpu")


@pytest.mark.parametrize("spread", [1.0, 80.0])  # 80: exp would overflow without the shift
def test_mean_cross_entropy_matches_torch_in_value_and_gradient_under_vmap(spread: float) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = (spread * torch.randn(3, 50, 10, generator=gen, dtype=torch.float64)).requires_grad_(True)
    labels = torch.randint(0, 10, (50,), generator=gen)
    ours = torch.vmap(mean_cross_entropy, in_dims=(0, None))(logits, labels)
    ref = torch.stack([nn.functional.cross_entropy(z, labels) for z in logits])
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, ref)
    (g_ours,) = torch.autograd.grad(ours.sum(), logits)
    (g_ref,) = torch.autograd.grad(ref.sum(), logits)
    torch.testing.assert_close(g_ours, g_ref)


def test_probit_is_softmax_without_variance_and_flattens_with_it() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.1, 0.0]])
    torch.testing.assert_close(
        probit_probs(logits, torch.zeros(2), 1.0), logits.double().softmax(1)
    )
    var = torch.tensor([1.0, 4.0])
    p = probit_probs(logits, var, 1.0)
    expected = (logits.double() / torch.sqrt(1 + math.pi / 8 * var.double())[:, None]).softmax(1)
    torch.testing.assert_close(p, expected)
    assert (p.max(1).values < logits.double().softmax(1).max(1).values).all()
    per_logit = probit_probs(logits, var[:, None].expand(2, 3), 2.0)
    torch.testing.assert_close(per_logit, probit_probs(logits, 2.0 * var, 1.0))


def test_flat_model_copies_and_round_trips() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    model[0].bias.requires_grad_(False)  # frozen parameters stay constants
    before = [p.clone() for p in model.parameters()]
    fm = FlatModel(model, torch.float64, CPU)
    assert fm.dim == 3 * 4 + 4 * 2 + 2
    x = torch.randn(5, 3)
    torch.testing.assert_close(fm(fm.theta0, x.double()), model.double()(x.double()))
    fm.theta0.add_(1.0)  # our copy, not the caller's
    for p, b in zip(model.parameters(), before, strict=True):
        torch.testing.assert_close(p.float(), b)


@pytest.mark.parametrize(
    ("optimizer", "precision", "dtype"),
    [
        (Optimizer.AUTO, Precision.FLOAT64, torch.float64),
        (Optimizer.ADAM, Precision.FLOAT32, torch.float32),
        (Optimizer.LBFGS, Precision.FLOAT32, torch.float32),
    ],
)
def test_resolve(optimizer: Optimizer, precision: Precision, dtype: torch.dtype) -> None:
    opt, got = resolve(optimizer, precision, n=100, dim=100, full_batch_budget=1e6)
    assert got == dtype
    assert opt is (Optimizer.LBFGS if optimizer is Optimizer.AUTO else optimizer)
    assert resolve(Optimizer.AUTO, Precision.FLOAT32, 10**4, 10**4, 1e6) == (
        Optimizer.ADAM,
        torch.float32,
    )


def logistic_problem(n: int = 80):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * torch.randn(n, generator=g, dtype=torch.float64) > 0).long()
    torch.manual_seed(0)
    fm = FlatModel(nn.Linear(3, 2), torch.float64, CPU)
    return fm, x, y


@pytest.mark.parametrize("copies", [1, 4])
def test_batched_lbfgs_reaches_each_copys_optimum(copies: int) -> None:
    fm, x, y = logistic_problem()
    q = torch.randn(copies, 3, dtype=torch.float64)
    w = torch.nn.functional.one_hot(torch.arange(copies) % 2, 2).double()
    reg = Regularizer(
        coef=torch.linspace(-1.0, 1.0, copies, dtype=torch.float64), queries=q, weights=w
    )
    obj = StackedObjective(fm, x, y, 1e-2, reg)
    theta = solve(
        obj,
        fm.theta0.expand(copies, -1).clone(),
        SolverSettings(Optimizer.LBFGS, 200, 0.0, 32, rtol=1e-12),
    )
    assert obj.full_grad(theta, 32).abs().max() < 1e-9
    # Each copy solved its own problem: copy i alone gives the same answer.
    for i in range(copies):
        sub = StackedObjective(
            fm, x, y, 1e-2, Regularizer(reg.coef[i : i + 1], q[i : i + 1], w[i : i + 1])
        )
        alone = solve(
            sub, fm.theta0[None].clone(), SolverSettings(Optimizer.LBFGS, 200, 0.0, 32, rtol=1e-12)
        )
        torch.testing.assert_close(alone[0], theta[i], atol=1e-8, rtol=1e-6)


def test_full_grad_matches_autograd_of_the_objective() -> None:
    fm, x, y = logistic_problem()
    q, w = torch.randn(1, 3, dtype=torch.float64), torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    lam, wd = 0.7, 1e-2
    obj = StackedObjective(
        fm, x, y, wd, Regularizer(torch.tensor([lam], dtype=torch.float64), q, w)
    )
    theta = fm.theta0.clone().requires_grad_(True)
    loss = (
        nn.functional.cross_entropy(fm(theta, x), y)
        + 0.5 * wd * theta.pow(2).sum()
        - lam / len(x) * fm(theta, q)[0, 1]
    )
    expected = torch.autograd.grad(loss, theta)[0]
    torch.testing.assert_close(obj.full_grad(fm.theta0[None], chunk=7)[0], expected)
    torch.testing.assert_close(obj.full_grad(fm.theta0[None], chunk=1000)[0], expected)


def _mlp_problem(n: int = 300):
    """A small tanh network: a non-linear model with a non-trivial Hessian."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = (x[:, 0] * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    torch.manual_seed(1)
    fm = FlatModel(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)), torch.float64, CPU)
    return fm, x, y


def test_tilt_makes_the_given_point_stationary_and_keeps_the_curvature() -> None:
    """Per-input RegVar's fits subtract ∇P(θ̂)ᵀθ: zero gradient at θ̂, same Hessian everywhere."""
    fm, x, y = _mlp_problem()
    wd = 1e-2
    plain = StackedObjective(fm, x, y, wd, Regularizer(torch.zeros(1, dtype=torch.float64)))
    g0 = plain.full_grad(fm.theta0[None], 64)[0]
    assert g0.abs().max() > 1e-3
    tilted = StackedObjective(fm, x, y, wd, Regularizer(torch.zeros(1, dtype=torch.float64)), tilt=g0)
    assert tilted.full_grad(fm.theta0[None], 64).abs().max() < 1e-12
    other = fm.theta0 + 0.1
    torch.testing.assert_close(
        tilted.full_grad(other[None], 64) - plain.full_grad(other[None], 64), -g0[None]
    )


@pytest.mark.parametrize("optimizer", [Optimizer.ADAM, Optimizer.SGD])
def test_first_order_copies_are_independent_and_deterministic(optimizer: Optimizer) -> None:
    fm, x, y = logistic_problem()
    reg = Regularizer(torch.tensor([0.0, 0.0], dtype=torch.float64))  # amortized form, λ = 0
    obj = StackedObjective(fm, x, y, 1e-2, reg)
    settings = SolverSettings(optimizer, 30, 1e-2, 16, seed=3)
    a = solve(obj, fm.theta0.expand(2, -1).clone(), settings)
    b = solve(obj, fm.theta0.expand(2, -1).clone(), settings)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a[0], a[1], rtol=0, atol=0)  # same data order for every copy
    assert not torch.equal(a[0], fm.theta0)


