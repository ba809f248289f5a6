"""Amortized RegVar: the listing's regulariser, its λ → 0 limit, and the Method API."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import hessian, jacrev, vmap
from torch.utils.data import TensorDataset

from bench.errors import BenchError
from bench.formulas import probit_probs
from bench.method_api import METHODS, FitContext
from bench.options import build
from bench.studies import context_around
from bench.tasks.base import TaskData, TrainRecipe
from bench_methods.regvar.common import (
    FlatModel,
    Optimizer,
    Regularizer,
    SolverSettings,
    StackedObjective,
    solve,
)

CPU = torch.device("cpu")
WD = 1e-2
C = 2


@pytest.fixture(scope="module")
def logistic():
    g = torch.Generator().manual_seed(0)
    n = 150

    def split(m: int) -> TensorDataset:
        x = torch.randn(m, 3, generator=g, dtype=torch.float64)
        y = (x[:, 0] - x[:, 1] + 0.7 * torch.randn(m, generator=g, dtype=torch.float64) > 0).long()
        return TensorDataset(x, y)

    data = TaskData(train=split(n), val=split(60), test=split(8), num_classes=C)
    x, y = data.train.tensors
    torch.manual_seed(0)
    model = nn.Linear(3, C).double()
    opt = torch.optim.LBFGS(
        model.parameters(),
        max_iter=500,
        tolerance_grad=1e-14,
        tolerance_change=0,
        line_search_fn="strong_wolfe",
    )

    def objective() -> torch.Tensor:
        return nn.functional.cross_entropy(model(x), y) + 0.5 * WD * sum(p.pow(2).sum() for p in model.parameters())

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    opt.step(closure)
    return data, model


def context(data: TaskData, model: nn.Module) -> FitContext:
    recipe = TrainRecipe(epochs=1, batch_size=32, lr=1e-2, weight_decay=WD)
    return context_around(model, data, recipe)


def fit(data: TaskData, model: nn.Module, **settings: str):
    cls = METHODS.get("regvar-amortized")
    method = cls(build(cls.Options, settings, "method regvar-amortized"))
    method.fit(context(data, model))
    return method


def test_regulariser_sign_and_scale_follow_the_listing(logistic):
    """Loss = CE + (wd/2)|θ|² + λ·mean|f|/n over the batch; λ > 0 shrinks the outputs."""
    data, model = logistic
    x, y = data.train.tensors
    fm = FlatModel(model, torch.float64, CPU)
    lam = 2.0
    obj = StackedObjective(fm, x, y, WD, Regularizer(torch.tensor([lam], dtype=torch.float64)))
    theta = fm.theta0.clone().requires_grad_(True)
    out = fm(theta, x)
    loss = nn.functional.cross_entropy(out, y) + 0.5 * WD * theta.pow(2).sum() + lam * out.abs().mean() / len(x)
    torch.testing.assert_close(obj.full_grad(fm.theta0[None], 1000)[0], torch.autograd.grad(loss, theta)[0])
    fitted = solve(obj, fm.theta0[None].clone(), SolverSettings(Optimizer.LBFGS, 100, 0.0, 1000, rtol=1e-12))
    assert fm.stacked_logits(fitted.expand(len(x), -1), x).abs().mean() < fm(fm.theta0, x).abs().mean()


@pytest.mark.parametrize("difference", ["central", "forward", "paper"])
def test_estimate_matches_its_own_limit_not_the_variance(logistic, difference):
    """λ → 0: |J_k(x) P⁻¹ E_x'[Σ_j sign f_j(x') J_j(x')ᵀ]|/C (regvar.md), not J_k P⁻¹ J_kᵀ."""
    data, model = logistic
    method = fit(data, model, lam_grid="1e-4", difference=difference, steps="100")
    xq = data.test.tensors[0]
    got = method.predict(xq).scores["variance"].double()
    x = data.train.tensors[0]
    fm = FlatModel(model, torch.float64, CPU)
    n = len(x)

    def objective(t: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(fm(t, x), data.train.tensors[1]) + 0.5 * WD * t.pow(2).sum()

    h = hessian(objective)(fm.theta0) * n
    jac = vmap(jacrev(lambda t, xi: fm(t, xi[None])[0]), in_dims=(None, 0))
    j_tr = jac(fm.theta0, x)  # n, C, D
    direction = (fm(fm.theta0, x).sign()[:, :, None] * j_tr).sum(1).mean(0) / C
    j_q = jac(fm.theta0, xq)
    top = fm(fm.theta0, xq).argmax(1)
    j_top = j_q[torch.arange(len(xq)), top]
    limit = (j_top @ torch.linalg.solve(h, direction)).abs()
    variance = torch.einsum("nd,de,ne->n", j_top, torch.linalg.inv(h), j_top)
    torch.testing.assert_close(got, limit, rtol=2e-2, atol=1e-12)
    assert (got / variance).median() < 0.5  # a different quantity: far from the variance


def test_method_predicts_tunes_and_records(logistic):
    data, model = logistic
    state = {k: v.clone() for k, v in model.state_dict().items()}
    method = fit(data, model, lam_grid="1e-4|1e-3", optimizer="adam", steps="20", lr="1e-3", batch_size="32")
    pred = method.predict(data.test.tensors[0])
    assert pred.probs.shape == (8, C)
    torch.testing.assert_close(pred.probs.sum(1), torch.ones(8))
    assert pred.scores["variance"].shape == (8,)
    s = method.summary()
    assert s["lam"] in (1e-4, 1e-3) and set(s["grid"]) == {"0.0001", "0.001"}
    # λ is the one whose best scale gives the lowest validation NLL; the predictive itself is s = 1
    assert s["val_nll"] == min(row["val_nll"] for row in s["grid"].values()) == s["grid"][str(s["lam"])]["val_nll"]
    assert s["scale"] == 1.0 and s["profile_scale"] == s["grid"][str(s["lam"])]["scale"]
    x = data.test.tensors[0]
    logits, var = method._mean_var(*method.pair, method.lam_joint, x)
    torch.testing.assert_close(pred.probs.double(), probit_probs(logits, var, 1.0), rtol=0, atol=1e-7)
    assert s["optimizer"] == "adam"
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    again = fit(data, model, lam_grid="1e-4|1e-3", optimizer="adam", steps="20", lr="1e-3", batch_size="32").predict(
        data.test.tensors[0]
    )
    torch.testing.assert_close(again.probs, pred.probs, rtol=0, atol=0)


def test_auto_counts_frozen_weights_as_the_cost_of_a_full_pass(logistic):
    """A LoRA transformer has few trainable weights and a large frozen backbone: full-batch L-BFGS
    passes the backbone over every review per iteration (an hour on MiniLM's smoke set), so auto
    must pick minibatch adam by the weights a pass goes through, not by the trainable ones."""
    data, head = logistic
    frozen = nn.Linear(3, 3).double().requires_grad_(False)
    with torch.no_grad():
        frozen.weight.copy_(torch.eye(3))
        frozen.bias.zero_()
    model = nn.Sequential(frozen, head)
    n, trainable, every = len(data.train), 3 * C + C, 3 * C + C + 12
    budget = str(n * (trainable + every) / 2)  # between n·trainable and n·every
    method = fit(data, model, lam_grid="1e-4", steps="5", lr="1e-3", full_batch_budget=budget)
    assert method.summary()["optimizer"] == "adam"
    head_only = fit(data, head, lam_grid="1e-4", steps="5", full_batch_budget=budget)
    assert head_only.summary()["optimizer"] == "lbfgs"


@pytest.mark.parametrize(("batch_size", "used"), [(None, 32), ("8", 8)])
def test_minibatches_default_to_the_map_recipes_batch(logistic, batch_size, used):
    """The listing fine-tunes with the training step: a LoRA recipe's 16 reviews, not 128 (which
    made the default smoke fine-tune of imdb-lora take two hours on a core)."""
    data, model = logistic
    options = {"batch_size": batch_size} if batch_size else {}
    method = fit(data, model, lam_grid="1e-4", optimizer="adam", steps="3", lr="1e-3", **options)
    assert method.summary()["batch_size"] == used  # the test recipe's batch is 32


def test_bad_grid_is_refused(logistic):
    data, model = logistic
    with pytest.raises(BenchError, match="lam_grid"):
        fit(data, model, lam_grid="0")


def test_by_default_the_mean_is_the_map_and_without_variance_the_row_is_the_map(logistic):
    data, model = logistic
    method = fit(data, model, lam_grid="1e-4", optimizer="adam", steps="20", lr="1e-2")
    assert method.summary()["difference"] == "paper"
    x = data.test.tensors[0]
    mean, _ = method._mean_var(*method.pair, method.lam_joint, x)
    with torch.no_grad():
        map_logits = model(x).double()
    torch.testing.assert_close(mean, map_logits)
    method.scale = 0.0  # the variance removed: exactly the map row's predictive
    torch.testing.assert_close(method.predict(x).probs.double(), map_logits.softmax(1), rtol=0, atol=1e-7)
    fits = fit(data, model, lam_grid="1e-4", optimizer="adam", steps="20", lr="1e-2", map_mean="false",
               difference="central")
    fits_mean, _ = fits._mean_var(*fits.pair, fits.lam_joint, x)
    assert not torch.allclose(fits_mean, mean)  # 20 steps at lr 1e-2 moved the fits' mean
