"""The ``laplace`` and ``laplace-ll`` methods on a tiny task, through the Method API."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from bench.errors import BenchError
from bench.method_api import METHODS, FitContext
from bench.options import build
from bench.studies import context_around
from bench.tasks.base import TaskData, TrainRecipe
from bench.training import train

pytest.importorskip("laplace")
import bench_methods.laplace  # noqa: E402,F401  (registers the methods)

C = 3
RECIPE = TrainRecipe(epochs=4, batch_size=32, lr=1e-2, weight_decay=1e-4)


class TinyCNN(nn.Module):
    """Not an nn.Sequential, like the task models."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(0.1), nn.Linear(27, 8), nn.ReLU(), nn.Linear(8, C))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def make_data() -> TaskData:
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(C, 1, 6, 6, generator=g)

    def split(n: int) -> TensorDataset:
        y = torch.randint(0, C, (n,), generator=g)
        return TensorDataset(centers[y] + 0.8 * torch.randn(n, 1, 6, 6, generator=g), y)

    return TaskData(train=split(120), val=split(40), test=split(25), num_classes=C)


@pytest.fixture(scope="module")
def setup() -> tuple[TaskData, nn.Module]:
    data = make_data()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = train(TinyCNN(), data.train, RECIPE, torch.device("cpu"), gen, lambda it, **_: it)
    model.zero_grad(set_to_none=True)
    return data, model


def context(data: TaskData, model: nn.Module, seed: int = 0) -> FitContext:
    return context_around(model, data, RECIPE, seed=seed, make_model=TinyCNN)


def run(setup, name: str, **settings: str):
    data, model = setup
    cls = METHODS.get(name)
    method = cls(build(cls.Options, settings, f"method {name}"))
    method.fit(context(data, model))
    return method, method.predict(data.test.tensors[0])


def check_prediction(pred, n: int) -> None:
    assert pred.probs.shape == (n, C)
    torch.testing.assert_close(pred.probs.sum(1), torch.ones(n, dtype=pred.probs.dtype))
    assert set(pred.scores) == {"variance"}
    assert torch.isfinite(pred.scores["variance"]).all()
    assert (pred.scores["variance"] > 0).all()


@pytest.mark.parametrize(
    ("name", "settings"),
    [
        ("laplace-ll", {}),
        ("laplace-ll", {"structure": "full", "link": "mc", "n_samples": "30"}),
        ("laplace-ll", {"structure": "diag", "prior_method": "fixed"}),
        ("laplace", {}),
        ("laplace", {"structure": "diag", "prior_structure": "layerwise"}),
        ("laplace", {"structure": "full", "link": "mc", "n_samples": "30"}),
        ("laplace", {"predictive": "laplace-torch", "batch_size": "10"}),
    ],
)
def test_methods_predict_valid_distributions(setup, name, settings):
    method, pred = run(setup, name, **settings)
    check_prediction(pred, 25)
    info = method.summary()
    assert info["structure"] == settings.get("structure", "kron")
    assert info["link"] == settings.get("link", "probit")
    assert info["prior_precision"] == info["prior_precision"]  # not NaN
    if name == "laplace":
        assert info["n_params"] == sum(p.numel() for p in setup[1].parameters())
        assert info["predictive"] == settings.get("predictive", "fast")
    else:
        assert info["n_params"] == 8 * C + C and info["last_layer"] == "head.3"
    assert info["backend"].endswith("GGN")


def test_fast_and_laplace_torch_predictives_agree(setup):
    _, fast = run(setup, "laplace")
    _, ref = run(setup, "laplace", predictive="laplace-torch")
    assert (fast.probs - ref.probs).abs().max() <= 1e-5
    torch.testing.assert_close(fast.scores["variance"], ref.scores["variance"], rtol=1e-4, atol=0)


def test_map_model_untouched(setup):
    data, model = setup
    before = copy.deepcopy(model.state_dict())
    hooks = (len(model._forward_hooks), len(model._backward_hooks))
    model.train()
    run(setup, "laplace", structure="diag")  # BackPack/ASDL would extend a shared model
    run(setup, "laplace-ll")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert (len(model._forward_hooks), len(model._backward_hooks)) == hooks
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    model.eval()


@pytest.mark.parametrize("name", ["laplace", "laplace-ll"])
def test_same_seed_same_numbers(setup, name):
    _, a = run(setup, name, link="mc", n_samples="20")
    _, b = run(setup, name, link="mc", n_samples="20")
    assert torch.equal(a.probs, b.probs)
    assert torch.equal(a.scores["variance"], b.scores["variance"])


@pytest.mark.parametrize("name", ["laplace", "laplace-ll"])
def test_gridsearch_picks_the_grid_value_with_lowest_val_nll(setup, name):
    method, pred = run(setup, name, prior_method="gridsearch", grid_min="-2", grid_max="2",
                       grid_size="5")
    check_prediction(pred, 25)
    chosen = method.summary()["prior_precision"]
    x_val, y_val = setup[0].val.tensors
    nlls = []
    for value in (0.01, 0.1, 1.0, 10.0, 100.0):  # each scored on its own (no running mean)
        method.la.prior_precision = value
        probs = method.predict(x_val).probs
        nlls.append(float(-probs[torch.arange(len(y_val)), y_val].log().mean()))
    best = (0.01, 0.1, 1.0, 10.0, 100.0)[min(range(5), key=nlls.__getitem__)]
    assert chosen == pytest.approx(best, rel=1e-5)


@pytest.mark.parametrize("name", ["laplace", "laplace-ll"])
def test_larger_prior_precision_means_smaller_variance(setup, name):
    m1, weak = run(setup, name, prior_method="fixed", prior_precision="0.1")
    m2, strong = run(setup, name, prior_method="fixed", prior_precision="100")
    assert m1.summary()["prior_precision"] == pytest.approx(0.1)
    assert (strong.scores["variance"] < weak.scores["variance"]).all()
    # with a strong prior the predictive is close to ... itself less spread: max prob grows
    assert strong.probs.max(1).values.mean() > weak.probs.max(1).values.mean()


def test_full_refused_for_large_models(setup):
    with pytest.raises(BenchError, match="max_full_params"):
        run(setup, "laplace", structure="full", max_full_params="100")


def test_backpack_on_non_sequential_model_is_a_bench_error(setup):
    with pytest.raises(BenchError, match="backend"):
        run(setup, "laplace", structure="diag", backend="backpack")


def test_last_layer_laplace_on_a_one_module_model_is_a_bench_error(setup):
    """laplace-torch's own 'The model only has one module.' ValueError becomes one line with advice."""
    data, _ = setup
    flat = TensorDataset(data.train.tensors[0].flatten(1), data.train.tensors[1])
    flat_data = TaskData(train=flat, val=flat, test=flat, num_classes=C)
    method = METHODS.get("laplace-ll")()
    with pytest.raises(BenchError, match="laplace-ll: laplace-torch cannot use this model .*one module.*use laplace"):
        method.fit(context(flat_data, nn.Linear(36, C)))


def test_gridsearch_with_layerwise_prior_refused(setup):
    with pytest.raises(BenchError, match="prior_structure=scalar"):
        run(setup, "laplace", prior_method="gridsearch", prior_structure="layerwise")


@pytest.mark.parametrize("name,settings,expected", [
    ("laplace", {"structure": "diag"}, "layerwise"),  # auto, marglik: the evidence's choice
    ("laplace", {"structure": "diag", "prior_method": "gridsearch"}, "scalar"),  # grid search tunes one value
    ("laplace-ll", {}, "scalar"),  # laplace-torch's last layer has no layerwise prior
])
def test_auto_prior_structure_resolves_and_is_recorded(setup, name, settings, expected):
    method, _ = run(setup, name, **settings)
    assert method.summary()["prior_structure"] == expected
    prior = method.summary()["prior_precision"]
    assert isinstance(prior, list) == (expected == "layerwise")


def test_last_layer_layerwise_prior_refused(setup):
    with pytest.raises(BenchError, match="prior_structure=scalar"):
        run(setup, "laplace-ll", prior_structure="layerwise")


def test_bad_option_value_names_the_choices():
    with pytest.raises(BenchError, match="kron"):
        build(METHODS.get("laplace").Options, {"structure": "lowrank"}, "method laplace")


def test_auto_backend_for_diag_depends_on_the_container():
    from bench_methods.laplace import Backend, Structure, resolve_backend

    seq = nn.Sequential(nn.Linear(2, 2))
    assert resolve_backend(Backend.AUTO, Structure.DIAG, seq).__name__ == "BackPackGGN"
    assert resolve_backend(Backend.AUTO, Structure.DIAG, TinyCNN()).__name__ == "AsdlGGN"
    assert resolve_backend(Backend.AUTO, Structure.KRON, seq).__name__ == "CurvlinopsGGN"
    assert resolve_backend(Backend.ASDL, Structure.KRON, seq).__name__ == "AsdlGGN"


@pytest.mark.parametrize("name", ["laplace", "laplace-ll"])
def test_objective_prior_is_the_maps_own_n_times_wd_as_regvar_reads_it(setup, name):
    """prior_method=objective puts Laplace at the MAP objective's prior, n·wd: the precision
    per-input RegVar's summary reports for the same run, so the pair differs by method only."""
    data, _ = setup
    method, _ = run(setup, name, prior_method="objective")
    expected = len(data.train) * RECIPE.weight_decay
    assert method.summary()["prior_precision"] == pytest.approx(expected)
    assert method.summary()["prior_method"] == "objective"
    regvar_cls = METHODS.get(name.replace("laplace", "regvar"))
    regvar = regvar_cls(build(regvar_cls.Options, {"max_queries": "2"}, "regvar"))
    regvar.fit(context(*setup))
    assert regvar.summary()["prior_precision"] == pytest.approx(expected)
