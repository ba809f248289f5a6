"""Per-input RegVar: the estimator against exact linearized Laplace, and the two registered methods."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import hessian, jacrev, vmap
from torch.utils.data import TensorDataset

from bench.errors import BenchError
from bench.method_api import METHODS, FitContext
from bench.options import build
from bench.planning import VALIDATION_INPUTS_CAPPED
from bench.studies import context_around
from bench.tasks.base import TaskData, TrainRecipe
from bench_methods.regvar.newton import ProductEngine
from bench_methods.regvar.response import (
    Difference,
    FitConfig,
    FitStats,
    Output,
    Preconditioner,
    Problem,
    Solver,
    output_weights,
    regvar_response,
)

CPU = torch.device("cpu")
WD = 0.1  # strong enough that the AdamW MAP below has a positive definite Hessian


def adamw_map(net: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 300) -> nn.Module:
    """A few AdamW steps: a MAP that is *not* a stationary point of P (as in the benchmark)."""
    opt = torch.optim.AdamW(net.parameters(), 1e-2, weight_decay=WD)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net


@pytest.fixture(scope="module")
def mlp():
    """A small tanh network after AdamW (not stationary) and its exact Hessian of n·P there."""
    g = torch.Generator().manual_seed(0)
    n = 200
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = (x[:, 0] - x[:, 1] + 0.5 * torch.randn(n, generator=g, dtype=torch.float64) > 0).long()
    y = y + (x[:, 2] > 1.0).long()
    torch.manual_seed(0)
    net = adamw_map(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double(), x, y)
    queries = torch.randn(5, 3, generator=g, dtype=torch.float64) * 2
    return net, x, y, queries


def exact_covariance(net: nn.Module, x, y, queries, theta=None) -> torch.Tensor:
    """J (n·∇²P)⁻¹ Jᵀ per query (N, C, C), from torch.func.hessian and jacrev: the λ → 0 limit."""
    fm = Problem(net, x, y, WD, torch.float64, CPU).fm64
    theta = fm.theta0 if theta is None else theta

    def objective(t: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(fm(t, x), y) + 0.5 * WD * t.pow(2).sum()

    h = hessian(objective)(theta) * len(x)
    assert torch.linalg.eigvalsh(h)[0] > 0, "the fixture's Hessian must be positive definite"
    jac = vmap(jacrev(lambda t, xi: fm(t, xi[None])[0]), in_dims=(None, 0))(theta, queries)
    return torch.einsum("ncd,de,nke->nck", jac, torch.linalg.inv(h), jac)


@pytest.mark.parametrize("solver", list(Solver))
@pytest.mark.parametrize("difference", list(Difference))
@pytest.mark.parametrize("output", list(Output))
def test_hessian_free_fits_reach_the_exact_variance_at_a_non_stationary_map(mlp, output, difference, solver):
    """Δf/λ of the fits = J P⁻¹ J_gᵀ at the MAP (Theorem 4.1) with P the exact Hessian there,
    for every read-out and both solvers; the fits never form P (the tilt makes the MAP stationary)."""
    net, x, y, queries = mlp
    problem = Problem(net, x, y, WD, torch.float64, CPU)
    assert problem.grad_map.abs().max() > 1e-4  # the MAP is not stationary: the tilt matters
    cov = exact_covariance(net, x, y, queries)
    w = output_weights(problem.fm64.logits(problem.fm64.theta0, queries), output)
    config = FitConfig(solver=solver, difference=difference, cg_tol=1e-9, fit_rtol=1e-4, lbfgs_steps=300)
    stats = FitStats()
    got = regvar_response(problem, queries, w, (1e-5,), config, stats).final[:, :, 0]  # (N, K, C)
    expected = torch.einsum("ncj,nkj->nkc", cov, w)  # row w_k of the covariance
    rtol = 1e-3 if difference is Difference.CENTRAL else 2e-2  # forward: O(λ) bias
    torch.testing.assert_close(got, expected, rtol=rtol, atol=1e-4 * float(expected.abs().max()))
    assert not stats.failures(), stats.failures()


@pytest.mark.parametrize(("engine", "preconditioner"), [(ProductEngine.AUTO, Preconditioner.KFAC),
                                                        (ProductEngine.AUTO, Preconditioner.NONE),
                                                        (ProductEngine.AUTOGRAD, Preconditioner.NONE)])
def test_products_and_preconditioners_change_the_cost_not_the_variance(mlp, engine, preconditioner):
    net, x, y, queries = mlp
    problem = Problem(net, x, y, WD, torch.float64, CPU, None, engine, preconditioner)
    assert problem.preconditioner_name == preconditioner.value
    w = output_weights(problem.fm64.logits(problem.fm64.theta0, queries), Output.TOP)
    expected = torch.einsum("ncj,nkj->nkc", exact_covariance(net, x, y, queries), w)
    got = regvar_response(problem, queries, w, (1e-5,), FitConfig(cg_tol=1e-9)).final[:, :, 0]
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max()))


def test_kfac_preconditioning_needs_closed_form_products(mlp):
    net, x, y, _ = mlp
    with pytest.raises(BenchError, match="preconditioner=kfac needs an MLP"):
        Problem(net, x, y, WD, torch.float64, CPU, None, ProductEngine.AUTOGRAD, Preconditioner.KFAC)


def test_central_difference_cancels_the_first_order_bias(mlp):
    """Forward differences err O(λ), central ones O(λ²): halving λ halves one error, quarters the other."""
    net, x, y, queries = mlp
    problem = Problem(net, x, y, WD, torch.float64, CPU)
    w = output_weights(problem.fm64.logits(problem.fm64.theta0, queries), Output.TOP)
    target = torch.einsum("ncj,nkj->nkc", exact_covariance(net, x, y, queries), w)
    errs = {}
    for d in Difference:
        for lam in (4e-3, 2e-3):  # large on purpose: the finite-difference bias shows
            got = regvar_response(problem, queries, w, (lam,), FitConfig(difference=d, cg_tol=1e-12)).final[:, :, 0]
            errs[d, lam] = float(((got - target).abs() / target.abs().max()).max())
    assert errs[Difference.CENTRAL, 4e-3] < errs[Difference.FORWARD, 4e-3]
    assert 1.6 < errs[Difference.FORWARD, 4e-3] / errs[Difference.FORWARD, 2e-3] < 2.4
    assert 3.2 < errs[Difference.CENTRAL, 4e-3] / errs[Difference.CENTRAL, 2e-3] < 4.8


@pytest.mark.parametrize("block", [False, True])
def test_stacked_solves_equal_one_at_a_time_and_checkpoints_converge(mlp, block):
    """Per-query CG gives each query the same iterates however many are stacked; block CG shares
    one Krylov space, so stacking changes its path, not (beyond the tolerances) its answer."""
    net, x, y, queries = mlp
    problem = Problem(net, x, y, WD, torch.float64, CPU)
    w = output_weights(problem.fm64.logits(problem.fm64.theta0, queries), Output.LOGITS)
    config = FitConfig(cg_tol=1e-9, cg_block=block)
    stacked = regvar_response(problem, queries, w, (1e-5, 1e-4), config, checkpoints=(1, 3, 60))
    single = torch.cat([regvar_response(problem, queries[i : i + 1], w[i : i + 1], (1e-5, 1e-4),
                                        FitConfig(cg_tol=1e-9, query_batch=1, cg_block=block)).final
                        for i in range(len(queries))])
    torch.testing.assert_close(stacked.final, single, rtol=1e-4 if block else 1e-6, atol=1e-9)
    assert stacked.final.shape == (5, 3, 2, 3)
    err = {k: float((v - stacked.final).abs().max()) for k, v in stacked.at.items()}
    assert err[60] < 1e-6 < err[1]
    assert err[3] < err[1] or (block and err[3] < 1e-6)
    with pytest.raises(BenchError, match="λ > 0"):
        regvar_response(problem, queries, w, (0.0,), config)


def test_negative_curvature_and_impossible_variances_are_counted_not_silent(mlp):
    """A negative prior makes P indefinite: the solves are flagged, never passed off as converged."""
    net, x, y, queries = mlp
    problem = Problem(net, x, y, -0.5, torch.float64, CPU)
    w = output_weights(problem.fm64.logits(problem.fm64.theta0, queries), Output.TOP)
    stats = FitStats()
    regvar_response(problem, queries, w, (1e-5,), FitConfig(), stats)
    assert stats.negative_curvature > 0
    assert set(stats.failures()) >= {"negative_curvature"}


# --- the registered methods, on a tiny image task ------------------------------------------

C = 3
RECIPE = TrainRecipe(epochs=1, batch_size=32, lr=1e-2, weight_decay=3e-2)


def tiny_data() -> TaskData:
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(C, 1, 6, 6, generator=g)

    def split(n: int) -> TensorDataset:
        y = torch.randint(0, C, (n,), generator=g)
        return TensorDataset(centers[y] + 0.8 * torch.randn(n, 1, 6, 6, generator=g), y)

    return TaskData(train=split(64), val=split(24), test=split(10), num_classes=C,
                    ood={"noise": torch.randn(7, 1, 6, 6, generator=g)})


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, stride=2), nn.Tanh(), nn.Flatten(), nn.Dropout(0.2), nn.Linear(8, C)
    )


def context(model: nn.Module, logs: list[str] | None = None) -> FitContext:
    return context_around(model, tiny_data(), RECIPE, make_model=tiny_model,
                          log=logs.append if logs is not None else None)


def fit_predict(method: str = "regvar", **settings: str):
    data, model = tiny_data(), tiny_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cls = METHODS.get(method)
    m = cls(build(cls.Options, settings, f"method {method}"))
    m.fit(context(model))
    pred = m.predict(data.test.tensors[0])
    for k, v in model.state_dict().items():  # the MAP network is never modified
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    return m, pred


@pytest.mark.parametrize(
    ("method", "settings"),
    [
        ("regvar", {}),
        ("regvar", {"solver": "lbfgs", "lbfgs_steps": "30"}),
        ("regvar", {"output": "logits"}),
        ("regvar-ll", {"output": "mean-abs", "difference": "forward"}),
        ("regvar-ll", {}),
    ],
)
def test_methods_predict_and_record_their_settings(method, settings):
    m, pred = fit_predict(method, **settings)
    assert pred.probs.shape == (10, C)
    torch.testing.assert_close(pred.probs.sum(1), torch.ones(10))
    assert pred.scores["variance"].shape == (10,)
    assert torch.isfinite(pred.scores["variance"]).all()
    summary = m.summary()
    assert {"scale", "lam", "solver", "prior_precision", "max_queries", "weights", "mean_and_variance_from",
            "solver_flags", "cg_iterations_max", "curvature_formed", "products", "preconditioner"} <= set(summary)
    assert summary["preconditioner"] in {"kfac", "none"}
    assert summary["curvature_formed"] is False
    assert summary["prior_precision"] == pytest.approx(64 * RECIPE.weight_decay)
    assert m.eval_limit == summary["max_queries"]


def test_the_two_methods_refit_what_their_names_say_and_never_swap():
    all_w, _ = fit_predict("regvar")
    ll, _ = fit_predict("regvar-ll")
    assert all_w.summary()["weights"] == "all"
    assert all_w.summary()["n_params"] == sum(p.numel() for p in tiny_model().parameters())
    assert ll.summary()["weights"] == "last-layer" and ll.summary()["n_params"] == 8 * C + C
    for name in ("regvar", "regvar-ll"):  # no switch between them exists
        cls = METHODS.get(name)
        with pytest.raises(BenchError, match="weights"):
            build(cls.Options, {"weights": "last-layer"}, f"method {name}")


def test_budget_refusal_is_one_line_before_any_fit():
    cls = METHODS.get("regvar")
    m = cls(build(cls.Options, {"budget_s": "1e-9"}, "method regvar"))
    logs: list[str] = []
    with pytest.raises(BenchError) as err:
        m.fit(context(tiny_model(), logs))
    msg = str(err.value)
    assert "\n" not in msg
    for hint in ("budget_s", "max_queries", "GPU", "regvar-ll"):
        assert hint in msg
    assert m.problem is None and "setup_s" not in m.info and not logs  # nothing was fitted


@pytest.mark.parametrize("probe_seconds, rows", [(0.0, 16), (1e9, 64)])
def test_budget_probe_stops_growing_its_slice_once_a_product_is_slow_enough_to_time(
        monkeypatch: pytest.MonkeyPatch, probe_seconds: float, rows: int) -> None:
    """A slow product (a transformer's double backward) is timed on 16 rows, not 1,024: the
    refusal on a CPU comes in seconds; a fast one grows to every row (here 64) for a fair time."""
    import bench_methods.regvar.per_input as regvar_module

    monkeypatch.setattr(regvar_module, "PROBE_SECONDS", probe_seconds)
    cls = METHODS.get("regvar")
    m = cls(build(cls.Options, {"budget_s": "1e-9"}, "method regvar"))
    with pytest.raises(BenchError, match="budget_s"):
        m.fit(context(tiny_model()))
    assert m.info["probe_rows"] == rows and m.info["probe_s_per_product"] > 0


def test_mean_and_variance_come_from_the_shared_map():
    """The predictive mean is the network θ₀ the fits start from, and θ₀ is the MAP the harness
    hands every method: no private copy is polished or moved."""
    data, model = tiny_data(), tiny_model()
    x = data.test.tensors[0]
    with torch.no_grad():
        map_logits = model.eval()(x).double()
    for name in ("regvar", "regvar-ll"):
        m, _ = fit_predict(name)
        logits, _var = m.moments(x)
        torch.testing.assert_close(logits, map_logits, rtol=1e-6, atol=1e-6)
        m.scale = 0.0  # variance off: the predictive is the softmax of the MAP's logits
        torch.testing.assert_close(m.predict(x).probs.double(), map_logits.softmax(1), rtol=1e-6, atol=1e-6)
        assert m.summary()["mean_and_variance_from"] == "map"


def test_regvar_ll_equals_exact_last_layer_laplace_at_the_map():
    """regvar-ll reads the variance at the MAP's own last layer: J P⁻¹ Jᵀ with
    P the exact Hessian of the last layer's objective there (convex: positive definite)."""
    data, model = tiny_data(), tiny_model()
    m, pred = fit_predict("regvar-ll", precision="float64")
    body = nn.Sequential(*list(model)[:-1]).eval()
    with torch.no_grad():
        feats = body(data.train.tensors[0]).double()
        q_feats = body(data.test.tensors[0]).double()
    head = Problem(model[-1], feats, data.train.tensors[1], RECIPE.weight_decay, torch.float64, CPU)
    fm, y = head.fm64, data.train.tensors[1]

    def objective(t: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(fm(t, feats), y) + 0.5 * RECIPE.weight_decay * t.pow(2).sum()

    h = hessian(objective)(fm.theta0) * len(y)
    w = output_weights(fm.logits(fm.theta0, q_feats), Output.TOP)[:, 0]
    jac = vmap(jacrev(lambda t, xi: fm(t, xi[None])[0]), in_dims=(None, 0))(fm.theta0, q_feats)
    jac = torch.einsum("nc,ncd->nd", w, jac)
    exact = torch.einsum("nd,de,ne->n", jac, torch.linalg.inv(h), jac)
    torch.testing.assert_close(pred.scores["variance"].double(), exact, rtol=1e-3, atol=0)
    assert not m.summary()["solver_flags"]


def test_regvar_ll_refuses_a_model_whose_output_is_not_its_last_linear():
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = tiny_model()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2.0 * self.net(x)

    cls = METHODS.get("regvar-ll")
    m = cls(build(cls.Options, {}, "regvar-ll"))
    with pytest.raises(BenchError, match="last nn.Linear"):
        m.fit(context(Scaled()))


def test_predict_refuses_too_many_inputs_and_is_deterministic():
    a, pa = fit_predict("regvar")
    _, pb = fit_predict("regvar")
    torch.testing.assert_close(pa.probs, pb.probs, rtol=0, atol=0)
    a.options.max_queries = 3  # the harness's validation subset (200) is still allowed, more is not
    x = tiny_data().test.tensors[0]
    with pytest.raises(BenchError, match="max_queries"):
        a.predict(x.repeat(21, 1, 1, 1)[:VALIDATION_INPUTS_CAPPED + 1])


def test_flags_are_logged_as_warnings():
    cls = METHODS.get("regvar")
    m = cls(build(cls.Options, {"cg_max_iter": "1", "cg_block": "false"},
                  "regvar"))
    logs: list[str] = []
    m.fit(context(tiny_model(), logs))
    m.predict(tiny_data().test.tensors[0])
    assert m.summary()["solver_flags"].get("cg_not_converged", 0) > 0
    assert any("WARNING" in line and "cg_not_converged" in line for line in logs)
    # ... and reach the record's flags, which the leaderboard marks
    assert any(f.startswith("solver: cg not converged in") for f in m.summary()["flags"])


def test_a_solve_that_met_negative_curvature_counts_as_not_converged():
    """At an untrained network ∇²P is indefinite: CG meets non-positive curvature, and such a
    solve is counted as not converged (never as converged because it stopped)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(8, C))
    cls = METHODS.get("regvar")
    m = cls(build(cls.Options, {"cg_block": "false", "preconditioner": "none"}, "regvar"))
    m.fit(context_around(model, tiny_data(), TrainRecipe(1, 8, 1e-3, 1e-6), make_model=tiny_model))
    m.predict(tiny_data().test.tensors[0])
    flags = m.summary()["solver_flags"]
    assert flags.get("negative_curvature", 0) > 0
    assert flags["cg_not_converged"] >= flags["negative_curvature"]
