"""MC dropout on tiny dummy models: test-time dropout only, p=0, seeds, rates, refusals."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from bench.errors import BenchError
from bench.method_api import METHODS, FitContext, batched_logits
from bench.options import build
from bench.tasks.base import TaskData, TrainRecipe
from bench.training import train
from bench_methods.mc_dropout import MCDropout, MCDropoutOptions, dropout_layers, seeded_rng

N_IN, N_CLASSES = 4, 3
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]


def mlp(
    p: float = 0.5, dropout: type[nn.Module] = nn.Dropout, batch_norm: bool = False
) -> Callable[[], nn.Module]:
    """A make_model factory: Linear → [BatchNorm] → ReLU → dropout(p) → Linear."""

    def make_model() -> nn.Module:
        norm = [nn.BatchNorm1d(32)] if batch_norm else []
        return nn.Sequential(
            nn.Linear(N_IN, 32), *norm, nn.ReLU(), dropout(p), nn.Linear(32, N_CLASSES)
        )

    return make_model


def make_ctx(
    make_model: Callable[[], nn.Module], seed: int = 0, device: str = "cpu"
) -> tuple[FitContext, list[int | str]]:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(64, N_IN, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    data = TaskData(
        train=TensorDataset(x, y),
        val=TensorDataset(x[:8], y[:8]),
        test=TensorDataset(x, y),
        num_classes=N_CLASSES,
    )
    recipe = TrainRecipe(epochs=2, batch_size=16, lr=1e-2, weight_decay=0.0)
    calls: list[int | str] = []
    shared: dict[int, nn.Module] = {}

    def train_model(member: int) -> nn.Module:
        """Like the harness: one shared, cached network per member."""
        calls.append(member)
        if member not in shared:
            torch.manual_seed(seed + member)
            gen = torch.Generator().manual_seed(seed + member)
            shared[member] = train(
                make_model(), data.train, recipe, torch.device(device), gen, lambda it, **k: it
            )
        return shared[member]

    def train_variant(name: str, model: nn.Module) -> nn.Module:
        """Like the harness: the method's changed network trained with the recipe (not the MAP)."""
        calls.append(name)
        gen = torch.Generator().manual_seed(seed + 100)
        return train(model, data.train, recipe, torch.device(device), gen, lambda it, **k: it)

    ctx = FitContext(
        data=data,
        make_model=make_model,
        recipe=recipe,
        device=torch.device(device),
        seed=seed,
        map_model=None,
        train_model=train_model,
        progress=lambda it, **k: it,
        log=lambda m: None,
        train_variant=train_variant,
    )
    return ctx, calls


def fitted(
    make_model=None, seed: int = 0, device: str = "cpu", **options
) -> tuple[MCDropout, FitContext, list[int]]:
    ctx, calls = make_ctx(make_model or mlp(), seed, device)
    method = MCDropout(MCDropoutOptions(**{"samples": 8, **options}))
    method.fit(ctx)
    return method, ctx, calls


def test_registered_with_options() -> None:
    assert METHODS.get("mc-dropout") is MCDropout
    assert build(MCDropoutOptions, {"samples": "4", "rate": "0.2"}, "mc-dropout").rate == 0.2
    with pytest.raises(BenchError, match="rate"):
        build(MCDropoutOptions, {"rate": "1"}, "mc-dropout")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dropout", [nn.Dropout, nn.AlphaDropout])
def test_rate_zero_equals_deterministic_model(dropout: type[nn.Module], device: str) -> None:
    method, ctx, _ = fitted(mlp(p=0.0, dropout=dropout), device=device)
    x = torch.randn(25, N_IN)
    pred = method.predict(x)
    expected = batched_logits(ctx.train_model(0), x, torch.device(device)).double().softmax(-1)
    torch.testing.assert_close(pred.probs, expected)
    assert torch.all(pred.scores["mutual_info"] < 1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch_size", [3, 1024])
def test_same_seed_same_numbers(batch_size: int, device: str) -> None:
    x = torch.randn(10, N_IN)
    a = fitted(seed=3, batch_size=batch_size, device=device)[0]
    b = fitted(seed=3, batch_size=batch_size, device=device)[0]
    pa = a.predict(x)
    torch.testing.assert_close(pa.probs, b.predict(x).probs, rtol=0, atol=0)
    torch.testing.assert_close(pa.probs, a.predict(x).probs, rtol=0, atol=0)  # per-call reseed
    assert (pa.scores["mutual_info"] > 0).any()  # masks do differ between passes
    other = fitted(seed=4, batch_size=batch_size, device=device)[0]
    assert not torch.equal(pa.probs, other.predict(x).probs)


def test_predict_leaves_global_rng_alone() -> None:
    method = fitted()[0]
    x = torch.randn(5, N_IN)
    state = torch.get_rng_state()
    method.predict(x)
    assert torch.equal(torch.get_rng_state(), state)


def test_only_dropout_samples_batch_norm_stays_eval() -> None:
    method, ctx, _ = fitted(mlp(batch_norm=True))
    bn = next(m for m in method.model.modules() if isinstance(m, nn.BatchNorm1d))
    stats = bn.running_mean.clone()
    method.predict(torch.randn(30, N_IN) * 10)
    assert not bn.training
    assert torch.equal(bn.running_mean, stats)
    assert all(m.training for m in dropout_layers(method.model))


def test_shared_map_network_not_modified() -> None:
    method, ctx, calls = fitted()
    assert calls == [0]
    shared = ctx.train_model(0)
    assert method.model is not shared
    method.predict(torch.randn(4, N_IN))
    assert not any(m.training for m in shared.modules())


def test_model_without_dropout_is_refused() -> None:
    ctx, calls = make_ctx(lambda: nn.Sequential(nn.Linear(N_IN, N_CLASSES)))
    for rate in (-1.0, 0.3):
        with pytest.raises(BenchError, match="no nn.Dropout"):
            MCDropout(MCDropoutOptions(rate=rate)).fit(ctx)
    assert calls == [0]  # only the default rate asked for the MAP network


def test_other_rate_retrains_with_that_rate() -> None:
    method, ctx, calls = fitted(mlp(p=0.5), rate=0.1)
    assert calls == ["dropout=0.1"]  # trained through the context; the cached MAP network (p=0.5) is not used
    assert method.summary() == {"samples": 8, "dropout_rates": [0.1], "retrained_with_rate": True}
    assert [m.p for m in dropout_layers(ctx.make_model())] == [0.5]


def test_own_rate_reuses_map_network() -> None:
    method, _, calls = fitted(mlp(p=0.5), rate=0.5)
    assert calls == [0]
    assert method.summary()["retrained_with_rate"] is False


def test_predict_before_fit_is_refused() -> None:
    with pytest.raises(BenchError, match="before fit"):
        MCDropout().predict(torch.randn(2, N_IN))


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_rng_restores_state(device: str) -> None:
    dev = torch.device(device)
    x = torch.ones(1000, device=dev)
    state = torch.get_rng_state()
    device_state = torch.cuda.get_rng_state() if dev.type == "cuda" else None
    with seeded_rng(dev, 5):
        a = nn.functional.dropout(x, 0.5)
    assert torch.equal(torch.get_rng_state(), state)
    if device_state is not None:
        assert torch.equal(torch.cuda.get_rng_state(), device_state)
    with seeded_rng(dev, 5):
        torch.testing.assert_close(nn.functional.dropout(x, 0.5), a, rtol=0, atol=0)
    with seeded_rng(dev, 6):
        assert not torch.equal(nn.functional.dropout(x, 0.5), a)
