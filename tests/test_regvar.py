"""Per-input RegVar: the estimator against exact linearized Laplace, and the Method API."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import hessian, jacrev, vmap
from torch.utils.data import TensorDataset

from bench.errors import BenchError
from bench.method_api import METHODS, FitContext
from bench.options import build
from bench.tasks.base import TaskData, TrainRecipe
from bench_methods.regvar import Difference, Output, output_weights, regvar_variance
from bench_methods.regvar_common import (
    FlatModel,
    Optimizer,
    Regularizer,
    SolverSettings,
    StackedObjective,
    inverse_hessian,
    solve,
)

CPU = torch.device("cpu")
WD = 1e-2


@pytest.fixture(scope="module")
def logistic():
    """Converged float64 logistic regression (2 logits) and its exact sum-scale Hessian."""
    g = torch.Generator().manual_seed(0)
    n = 200
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = (x[:, 0] - x[:, 1] + 0.7 * torch.randn(n, generator=g, dtype=torch.float64) > 0).long()
    torch.manual_seed(0)
    fm = FlatModel(nn.Linear(3, 2), torch.float64, CPU)

    def objective(t: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(fm(t, x), y) + 0.5 * WD * t.pow(2).sum()

    theta = fm.theta0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [theta],
        max_iter=500,
        tolerance_grad=1e-14,
        tolerance_change=0,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective(theta)
        loss.backward()
        return loss

    opt.step(closure)
    fm.theta0 = theta.detach().clone()
    h = hessian(objective)(fm.theta0) * n  # P on the log-joint scale
    queries = torch.randn(6, 3, generator=g, dtype=torch.float64) * 2
    return fm, x, y, h, queries


def exact(fm: FlatModel, h: torch.Tensor, queries: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    jac = vmap(jacrev(lambda t, xi: fm(t, xi[None])[0]), in_dims=(None, 0))(fm.theta0, queries)
    jg = torch.einsum("nkc,ncd->nkd", w, jac)
    return torch.einsum("nkd,de,nke->nk", jg, torch.linalg.inv(h), jg)


@pytest.mark.parametrize("hessian_start", [False, True])
@pytest.mark.parametrize("difference", list(Difference))
@pytest.mark.parametrize("output", list(Output))
def test_finite_difference_matches_laplace_variance_on_logistic_regression(
    logistic, output, difference, hessian_start
):
    """σ² = g'ᵀP⁻¹g' within 1% (the paper's Theorem 4.1) for a small λ, every read-out,
    with the fits' L-BFGS started from γ·I or from the exact P⁻¹ at θ₀."""
    fm, x, y, h, queries = logistic
    w = output_weights(fm.logits(fm.theta0, queries), output)
    settings = SolverSettings(Optimizer.LBFGS, 100, 0.0, 64, rtol=1e-10)
    curvature = None
    if hessian_start:
        curvature = inverse_hessian(StackedObjective(fm, x, y, WD, Regularizer(torch.zeros(1, dtype=x.dtype))),
                                    fm.theta0)
    got = regvar_variance(fm, x, y, WD, queries, w, (1e-3,), settings, difference,
                          curvature=curvature)[100][..., 0]
    torch.testing.assert_close(got, exact(fm, h, queries, w), rtol=1e-2, atol=0)


def test_central_difference_cancels_the_first_order_bias(logistic):
    fm, x, y, h, queries = logistic
    w = output_weights(fm.logits(fm.theta0, queries), Output.TOP)
    target = exact(fm, h, queries, w)[:, 0]
    settings = SolverSettings(Optimizer.LBFGS, 100, 0.0, 64, rtol=1e-12)
    lam = (3.0,)  # large on purpose: the O(λ) bias of the forward difference shows
    fwd = regvar_variance(fm, x, y, WD, queries, w, lam, settings, Difference.FORWARD)[100][:, 0, 0]
    cen = regvar_variance(fm, x, y, WD, queries, w, lam, settings, Difference.CENTRAL)[100][:, 0, 0]
    assert ((cen - target).abs() / target).max() < ((fwd - target).abs() / target).max()


def test_regulariser_sign_and_scale_follow_the_paper(logistic):
    """The loss term is −(λ/n)·g(x*): the refit *raises* g(x*) (argmax L + λ g), by ≈ λσ²."""
    fm, x, y, h, queries = logistic
    w = output_weights(fm.logits(fm.theta0, queries[:1]), Output.TOP)[:, 0]
    lam = 0.5
    obj = StackedObjective(
        fm, x, y, WD, Regularizer(torch.tensor([lam], dtype=torch.float64), queries[:1], w)
    )
    theta = fm.theta0.clone().requires_grad_(True)
    g_reg = torch.autograd.grad(-(lam / len(x)) * (w[0] * fm(theta, queries[:1])[0]).sum(), theta)[
        0
    ]
    no_reg = StackedObjective(
        fm, x, y, WD, Regularizer(torch.zeros(1, dtype=torch.float64), queries[:1], w)
    )
    torch.testing.assert_close(
        obj.full_grad(fm.theta0[None], 64) - no_reg.full_grad(fm.theta0[None], 64), g_reg[None]
    )
    fitted = solve(
        obj, fm.theta0[None].clone(), SolverSettings(Optimizer.LBFGS, 100, 0.0, 64, rtol=1e-12)
    )
    before = (w * fm.logits(fm.theta0, queries[:1])).sum()
    after = (w * fm.stacked_logits(fitted, queries[:1])).sum()
    sigma2 = exact(fm, h, queries[:1], w[:, None])[0, 0]
    assert after > before
    torch.testing.assert_close(after - before, lam * sigma2, rtol=2e-2, atol=0)


def test_batched_equals_one_at_a_time(logistic):
    fm, x, y, _, queries = logistic
    queries = queries[:3]
    w = output_weights(fm.logits(fm.theta0, queries), Output.LOGITS)
    settings = SolverSettings(Optimizer.LBFGS, 30, 0.0, 64, rtol=1e-10)
    batched = regvar_variance(fm, x, y, WD, queries, w, (1e-2,), settings, query_batch=64)[30]
    single = torch.cat(
        [
            regvar_variance(
                fm, x, y, WD, queries[i : i + 1], w[i : i + 1], (1e-2,), settings, query_batch=1
            )[30]
            for i in range(len(queries))
        ]
    )
    torch.testing.assert_close(batched, single, rtol=1e-6, atol=0)


def test_checkpoints_and_several_lambdas(logistic):
    fm, x, y, h, queries = logistic
    w = output_weights(fm.logits(fm.theta0, queries[:2]), Output.TOP)
    settings = SolverSettings(Optimizer.LBFGS, 40, 0.0, 64, rtol=1e-12)
    out = regvar_variance(fm, x, y, WD, queries[:2], w, (1e-3, 1e-2), settings, checkpoints=(1, 5))
    assert sorted(out) == [1, 5, 40]
    assert out[40].shape == (2, 1, 2)
    target = exact(fm, h, queries[:2], w)
    err_1 = ((out[1][..., 0] - target).abs() / target).max()
    err_40 = ((out[40][..., 0] - target).abs() / target).max()
    assert err_40 < 1e-2 < err_1
    with pytest.raises(BenchError):
        regvar_variance(fm, x, y, WD, queries[:2], w, (0.0,), settings)


# --- the Method, on a tiny image task ------------------------------------------------------

C = 3
RECIPE = TrainRecipe(epochs=1, batch_size=32, lr=1e-2, weight_decay=1e-3)


def tiny_data() -> TaskData:
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(C, 1, 6, 6, generator=g)

    def split(n: int) -> TensorDataset:
        y = torch.randint(0, C, (n,), generator=g)
        return TensorDataset(centers[y] + 0.8 * torch.randn(n, 1, 6, 6, generator=g), y)

    return TaskData(train=split(64), val=split(24), test=split(10), num_classes=C)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, stride=2), nn.Tanh(), nn.Flatten(), nn.Dropout(0.2), nn.Linear(8, C)
    )


def fit_predict(seed: int = 0, **settings: str):
    data, model = tiny_data(), tiny_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cls = METHODS.get("regvar")
    method = cls(build(cls.Options, settings, "method regvar"))
    ctx = FitContext(
        data=data,
        make_model=tiny_model,
        recipe=RECIPE,
        device=CPU,
        seed=seed,
        map_model=model,
        train_model=lambda m: model,
        progress=lambda it, **_: it,
        log=lambda _m: None,
    )
    method.fit(ctx)
    pred = method.predict(data.test.tensors[0])
    for k, v in model.state_dict().items():  # the MAP network is never modified
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    return method, pred


@pytest.mark.parametrize(
    "settings",
    [
        {"steps": "20", "val_queries": "8"},
        {
            "optimizer": "adam",
            "steps": "10",
            "lr": "1e-3",
            "batch_size": "16",
            "val_queries": "8",
            "lam": "1e-3",
        },
        {"output": "logits", "steps": "10", "val_queries": "4"},
        {"output": "mean-abs", "difference": "forward", "steps": "10", "val_queries": "0"},
    ],
)
def test_method_predicts_and_records_its_settings(settings):
    method, pred = fit_predict(**settings)
    assert pred.probs.shape == (10, C)
    torch.testing.assert_close(pred.probs.sum(1), torch.ones(10))
    assert pred.scores["variance"].shape == (10,)
    assert torch.isfinite(pred.scores["variance"]).all()
    summary = method.summary()
    assert {"scale", "lam", "optimizer", "prior_precision", "max_queries"} <= set(summary)
    assert summary["prior_precision"] == pytest.approx(64 * RECIPE.weight_decay)
    assert method.eval_limit == summary["max_queries"]


def test_method_is_deterministic_and_refuses_too_many_inputs():
    a, pa = fit_predict(steps="10", val_queries="4")
    _, pb = fit_predict(steps="10", val_queries="4")
    torch.testing.assert_close(pa.probs, pb.probs, rtol=0, atol=0)
    torch.testing.assert_close(pa.scores["variance"], pb.scores["variance"], rtol=0, atol=0)
    a.options.max_queries = 3
    with pytest.raises(BenchError, match="max_queries"):
        a.predict(tiny_data().test.tensors[0])


def test_last_layer_matches_exact_last_layer_laplace():
    data, model = tiny_data(), tiny_model()
    method, pred = fit_predict(weights="last-layer", val_queries="0", precision="float64")
    assert method.summary()["n_params"] == 8 * C + C
    body = nn.Sequential(*list(model)[:-1]).eval()
    with torch.no_grad():
        feats = body(data.train.tensors[0]).double()
        q_feats = body(data.test.tensors[0]).double()
    fm = FlatModel(model[-1], torch.float64, CPU)
    w = output_weights(fm.logits(fm.theta0, q_feats), Output.TOP)  # the MAP's predicted class
    y = data.train.tensors[1]

    def objective(t: torch.Tensor) -> torch.Tensor:
        ce = nn.functional.cross_entropy(fm(t, feats), y)
        return ce + 0.5 * RECIPE.weight_decay * t.pow(2).sum()

    # The MAP's head is not a stationary point (1 epoch of AdamW); the converged fits measure
    # the curvature at the head's optimum, so the exact target is taken there too.
    theta = fm.theta0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], max_iter=500, tolerance_grad=1e-13, tolerance_change=0,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective(theta)
        loss.backward()
        return loss

    opt.step(closure)
    fm.theta0 = theta.detach()
    h = hessian(objective)(fm.theta0) * len(y)
    torch.testing.assert_close(pred.scores["variance"].double(), exact(fm, h, q_feats, w)[:, 0],
                               rtol=1e-3, atol=0)


def test_last_layer_refuses_a_model_whose_output_is_not_its_last_linear():
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = tiny_model()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2.0 * self.net(x)

    data = tiny_data()
    cls = METHODS.get("regvar")
    method = cls(build(cls.Options, {"weights": "last-layer", "val_queries": "0"}, "regvar"))
    ctx = FitContext(data=data, make_model=Scaled, recipe=RECIPE, device=CPU, seed=0,
                     map_model=Scaled(), train_model=lambda m: None, progress=lambda it, **_: it,
                     log=lambda _m: None)
    with pytest.raises(BenchError, match="last-layer"):
        method.fit(ctx)


@pytest.mark.parametrize(("budget", "expected"), [(1e12, "all"), (1.0, "last-layer")])
def test_auto_weights_refit_everything_only_when_full_batch_fits_are_affordable(budget, expected):
    method, _ = fit_predict(full_batch_budget=str(budget), val_queries="0", steps="10")
    summary = method.summary()
    assert summary["weights"] == expected
    dim_all = sum(p.numel() for p in tiny_model().parameters())
    assert summary["n_params"] == (dim_all if expected == "all" else 8 * C + C)
