"""Deep ensemble on tiny dummy data: members, mean predictive, scores, determinism."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from bench.errors import BenchError
from bench.method_api import METHODS, FitContext
from bench.options import build
from bench.seeding import derive_seed
from bench.tasks.base import TaskData, TrainRecipe
from bench.training import train
from bench_methods.ensemble import DeepEnsemble, EnsembleOptions

N_IN, N_CLASSES = 4, 3
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(N_IN, 16), nn.ReLU(), nn.Linear(16, N_CLASSES))


def make_ctx(seed: int = 0, device: str = "cpu") -> tuple[FitContext, list[int]]:
    """A FitContext whose train_model trains a member-seeded tiny MLP (records the calls)."""
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
    calls: list[int] = []

    def train_model(member: int) -> nn.Module:
        calls.append(member)
        member_seed = derive_seed(seed, "member", member)
        torch.manual_seed(member_seed)
        gen = torch.Generator().manual_seed(member_seed)
        return train(
            make_model(), data.train, recipe, torch.device(device), gen, lambda it, **k: it
        )

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
    )
    return ctx, calls


def fitted(
    members: int, seed: int = 0, batch_size: int = 1024, device: str = "cpu"
) -> tuple[DeepEnsemble, list[int]]:
    ctx, calls = make_ctx(seed, device)
    method = DeepEnsemble(EnsembleOptions(members=members, batch_size=batch_size))
    method.fit(ctx)
    return method, calls


def test_registered_with_options() -> None:
    assert METHODS.get("ensemble") is DeepEnsemble
    assert build(EnsembleOptions, {"members": "3"}, "ensemble").members == 3
    with pytest.raises(BenchError, match="members"):
        build(EnsembleOptions, {"members": "0"}, "ensemble")


@pytest.mark.parametrize("members", [1, 3])
def test_members_come_from_train_model(members: int) -> None:
    method, calls = fitted(members)
    assert calls == list(range(members))
    assert method.summary() == {"members": members}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch_size", [5, 1024])
def test_mean_of_member_probs(batch_size: int, device: str) -> None:
    method, _ = fitted(3, batch_size=batch_size, device=device)
    x = torch.randn(20, N_IN)
    pred = method.predict(x)
    assert pred.probs.device.type == "cpu"
    with torch.no_grad():
        member_probs = torch.stack([m(x.to(device)).softmax(dim=-1) for m in method.models])
    member_probs = member_probs.double().cpu()
    torch.testing.assert_close(pred.probs, member_probs.mean(dim=0))
    assert set(pred.scores) == {"mutual_info", "expected_entropy"}
    assert (pred.scores["mutual_info"] >= 0).all()
    assert (pred.scores["mutual_info"] > 0).any()  # differently seeded members disagree


def test_single_member_has_zero_mutual_information() -> None:
    method, _ = fitted(1)
    pred = method.predict(torch.randn(10, N_IN))
    assert torch.all(pred.scores["mutual_info"] < 1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_same_numbers(device: str) -> None:
    x = torch.randn(10, N_IN)
    a = fitted(2, seed=7, device=device)[0].predict(x)
    b = fitted(2, seed=7, device=device)[0].predict(x)
    torch.testing.assert_close(a.probs, b.probs, rtol=0, atol=0)
    c = fitted(2, seed=8, device=device)[0].predict(x)
    assert not torch.equal(a.probs, c.probs)


def test_predict_before_fit_is_refused() -> None:
    with pytest.raises(BenchError, match="before fit"):
        DeepEnsemble().predict(torch.randn(2, N_IN))
