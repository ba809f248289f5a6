"""The shared MAP's finish: a certified minimum of P, checked against dense float64 algebra."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from bench.map_finish import Objective, certify, extreme_eigenvalues, finish, gradient_reached, steihaug
from bench.record import MapCertificate
from bench.tasks.base import TrainRecipe

WD = 1e-2


def toy(activation: type[nn.Module] = nn.Tanh, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(300, 5, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] ** 2 > 0.5).long()
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), activation(), nn.Linear(8, 2)), x, y


def dense_objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """P as a function of the flat float64 parameters, written apart from bench.map_finish."""
    net = model.double()
    shapes = [p.shape for p in net.parameters()]

    def p_of(theta: torch.Tensor) -> torch.Tensor:
        params, i = [], 0
        for s in shapes:
            params.append(theta[i:i + s.numel()].view(s))
            i += s.numel()
        h = torch.tanh(x.double() @ params[0].T + params[1])
        logits = h @ params[2].T + params[3]
        return nn.functional.cross_entropy(logits, y) + 0.5 * WD * theta.dot(theta)

    return p_of, torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def test_finish_reaches_a_certified_minimum_with_the_dense_hessians_eigenvalues():
    model, x, y = toy()
    certificate = finish(model, x, y, WD)
    assert certificate.certified and certificate.grad_inf <= 1e-6 and certificate.note == ""
    assert next(model.parameters()).dtype == torch.float32  # handed back in its own dtype
    p_of, theta = dense_objective(model, x, y)
    assert float(torch.func.grad(p_of)(theta).abs().max()) < 1e-6 + 1e-7  # float32 storage rounds θ
    eigenvalues = torch.linalg.eigvalsh(torch.autograd.functional.hessian(p_of, theta))
    assert certificate.lambda_min == pytest.approx(float(eigenvalues[0]), rel=2e-2)
    assert certificate.lambda_max == pytest.approx(float(eigenvalues[-1]), rel=2e-2)
    assert certificate.objective == pytest.approx(float(p_of(theta)), rel=1e-6)


@pytest.mark.slow
def test_a_relu_network_is_reported_not_certified_not_quietly_accepted():
    """ReLU's gradient jumps at every kink: Newton stalls above the tolerance, and says so."""
    model, x, y = toy(nn.ReLU)
    certificate = finish(model, x, y, WD)
    assert not certificate.certified and certificate.grad_inf > 1e-6
    assert "NOT a certified minimum" in certificate.describe() and "above the tolerance" in certificate.note


def test_newton_leaves_a_saddle_point_instead_of_certifying_it():
    """All-zero weights are a stationary point of a tanh network (up to the output bias), and a
    saddle where the data pull harder than the prior: the finish must leave it along the
    negative eigenvector and end at a certified minimum, not report the saddle."""
    model, x, y = toy()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    logs: list[str] = []
    certificate = finish(model, x, y, WD, progress=logs.append)
    assert any("saddle point" in line for line in logs)
    assert certificate.certified, certificate.describe()
    assert float(model[0].weight.abs().max()) > 0.1  # it left θ = 0


def test_steihaug_stops_on_the_boundary_along_negative_curvature():
    matrix = torch.diag(torch.tensor([2.0, -1.0], dtype=torch.float64))
    g = torch.tensor([1.0, 0.5], dtype=torch.float64)
    step, model_value, on_boundary = steihaug(g, lambda v: matrix @ v, radius=0.7, tol=1e-12, max_iter=10)
    assert on_boundary and float(step.norm()) == pytest.approx(0.7)
    assert model_value == pytest.approx(float(g @ step + 0.5 * step @ matrix @ step))
    assert model_value < 0
    spd = torch.diag(torch.tensor([2.0, 1.0], dtype=torch.float64))
    step, _, on_boundary = steihaug(g, lambda v: spd @ v, radius=10.0, tol=1e-12, max_iter=10)
    assert not on_boundary
    torch.testing.assert_close(step, -torch.linalg.solve(spd, g))


def test_lanczos_finds_a_negative_eigenvalue_where_there_is_one():
    model, x, y = toy()
    obj = Objective(model, x, y, 0.0)  # no prior and an untrained network: indefinite
    p_of, theta = dense_objective(model, x, y)
    low, high, _, resolved = extreme_eigenvalues(obj, obj.flat())
    assert resolved
    dense = torch.linalg.eigvalsh(torch.autograd.functional.hessian(p_of, theta) - WD * torch.eye(len(theta)))
    assert low < 0
    assert low == pytest.approx(float(dense[0]), rel=2e-2) and high == pytest.approx(float(dense[-1]), rel=2e-2)


def test_a_recipe_without_finish_measures_the_network_as_trained_and_leaves_it_unchanged():
    model, x, y = toy()
    before = [p.detach().clone() for p in model.parameters()]
    recipe = TrainRecipe(epochs=1, batch_size=32, lr=1e-3, weight_decay=WD)
    certificate = certify(model, TensorDataset(x, y), recipe)
    for a, b in zip(before, model.parameters(), strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)
    assert not certificate.certified and certificate.lambda_min is None and "no Newton finish" in certificate.note
    obj = Objective(model, x, y, WD)
    reference = float(obj.gradient(obj.flat()).abs().max())
    model.float()
    assert certificate.grad_inf == pytest.approx(reference, rel=1e-4)
    value, grad_inf = gradient_reached(model, TensorDataset(x, y), WD, batch_size=7)  # minibatches sum up
    assert grad_inf == pytest.approx(reference, rel=1e-4) and value == pytest.approx(certificate.objective)


def test_recipes_without_a_finish_keep_their_cache_keys():
    recipe = TrainRecipe(epochs=3, batch_size=128, lr=1e-3, weight_decay=1e-2)
    finished = dataclasses.replace(recipe, newton_finish=True)
    assert finished.key() != recipe.key()
    legacy = {k: v for k, v in dataclasses.asdict(recipe).items() if k != "newton_finish"}
    assert recipe.key() == hashlib.sha256(json.dumps(legacy, sort_keys=True).encode()).hexdigest()[:12]


def test_certificate_round_trips_through_the_record_type():
    c = MapCertificate(0.5, 1e-7, 1e-6, 1e-3, 4.0, 9, 300, 12.0)
    assert c.certified and "certified minimum" in c.describe()
    assert not dataclasses.replace(c, lambda_min=-1e-4).certified
    assert not dataclasses.replace(c, grad_inf=1e-5).certified


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_finish_on_cuda_matches_the_cpu():
    cpu_model, x, y = toy()
    gpu_model, _, _ = toy()
    on_cpu = finish(cpu_model, x, y, WD)
    on_gpu = finish(gpu_model.cuda(), x.cuda(), y.cuda(), WD)
    assert on_gpu.certified and next(gpu_model.parameters()).is_cuda
    assert on_gpu.objective == pytest.approx(on_cpu.objective, rel=1e-8)
    assert on_gpu.lambda_min == pytest.approx(on_cpu.lambda_min, rel=2e-2)


def test_an_unresolved_lambda_min_is_read_roughly_and_never_certified(monkeypatch):
    """ARPACK's restarts are bounded: where λ_min is not resolved to ±1e-6 in time, the certificate
    says so and the network is not certified, whatever the rough reading."""
    from bench import map_finish

    model, x, y = toy()
    obj = Objective(model, x, y, 0.0)
    monkeypatch.setattr(map_finish, "LANCZOS_RESTARTS", 1)
    monkeypatch.setattr(map_finish, "LANCZOS_VECTORS", 3)  # too small a Krylov space to converge in one pass
    low, _, _, resolved = extreme_eigenvalues(obj, obj.flat())
    assert not resolved
    note = map_finish._note(1e-8, 1e-6, 1e-4, 3, 0, resolved=False)
    assert "not resolved" in note
