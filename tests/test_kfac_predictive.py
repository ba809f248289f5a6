"""The fast GLM predictive equals laplace-torch's own on the same fitted posterior."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bench.errors import BenchError
from bench_methods.kfac_predictive import FastGLMPredictive, glm_link, probit_probs
from bench_methods.laplace_private import glm_functional

laplace = pytest.importorskip("laplace")
from laplace.curvature import AsdlGGN, BackPackGGN, CurvlinopsGGN  # noqa: E402

C = 3


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.ReLU(), nn.Linear(8, C))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1, stride=2), nn.ReLU(),  # 3x3x3
        nn.Conv2d(3, 4, 2, padding=1, bias=False), nn.ReLU(),  # 4x4x4
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16, 5), nn.Tanh(), nn.Linear(5, C),
    )


class Nested(nn.Module):
    """A non-Sequential container (like the task CNNs), with a token-position Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())  # 2x4x4
        self.mix = nn.Linear(4, 3)  # applied at each of 2*4 rows: weight shared over positions
        self.head = nn.Linear(24, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).reshape(len(x), 8, 4)
        return self.head(torch.tanh(self.mix(h)).flatten(1))


class WithNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(36, 6), nn.LayerNorm(6), nn.Tanh())
        self.out = nn.Linear(6, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x))


MODELS = {"mlp": mlp, "cnn": cnn, "nested": Nested, "norm": WithNorm}


def fitted(make, structure: str, backend: type, damping: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    model = make().eval()
    x = torch.randn(40, 1, 6, 6)
    y = torch.randint(0, C, (40,))
    kwargs = {"damping": damping} if structure == "kron" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la = laplace.Laplace(model, "classification", subset_of_weights="all",
                             hessian_structure=structure, backend=backend, **kwargs)
        la.fit(DataLoader(TensorDataset(x, y), batch_size=16))
    # a per-layer prior exercises the ordering of blocks against parameters
    la.prior_precision = torch.linspace(0.5, 3.0, la.n_layers)
    return la, torch.randn(7, 1, 6, 6)


CASES = [
    ("mlp", "kron", CurvlinopsGGN, False),
    ("mlp", "kron", CurvlinopsGGN, True),
    ("cnn", "kron", CurvlinopsGGN, False),
    ("cnn", "kron", AsdlGGN, False),
    ("nested", "kron", CurvlinopsGGN, False),
    ("mlp", "diag", BackPackGGN, False),
    ("cnn", "diag", BackPackGGN, False),
    ("nested", "diag", AsdlGGN, False),
    ("norm", "diag", AsdlGGN, False),
    ("cnn", "full", CurvlinopsGGN, False),
    ("norm", "full", CurvlinopsGGN, False),
]


@pytest.mark.parametrize(("name", "structure", "backend", "damping"), CASES)
def test_functional_covariance_matches_laplace_torch(name, structure, backend, damping):
    la, x = fitted(MODELS[name], structure, backend, damping)
    f_mu, f_var = glm_functional(la, x)
    g_mu, g_var = FastGLMPredictive(la).functional(x)
    assert g_var.shape == (len(x), C, C)
    torch.testing.assert_close(g_mu, f_mu, rtol=0, atol=1e-6)
    scale = f_var.abs().max()
    assert scale > 1e-3  # the comparison is not between two near-zero matrices
    torch.testing.assert_close(g_var, f_var, rtol=0, atol=2e-6 * float(scale))
    torch.testing.assert_close(g_var, g_var.transpose(1, 2))


@pytest.mark.parametrize("link", ["probit", "mc"])
def test_link_matches_laplace_torch_call(link):
    la, x = fitted(cnn, "kron", CurvlinopsGGN)
    torch.manual_seed(3)
    expected = la(x, pred_type="glm", link_approx=link, n_samples=50)
    f_mu, f_var = FastGLMPredictive(la).functional(x)
    torch.manual_seed(3)  # laplace-torch's __call__ samples from the global generator
    got = glm_link(la, f_mu, f_var, link, n_samples=50)
    assert (got - expected).abs().max() <= 1e-5
    torch.testing.assert_close(got.sum(1), torch.ones(len(x)))


def test_mc_link_is_seeded_by_generator():
    la, x = fitted(mlp, "kron", CurvlinopsGGN)
    f_mu, f_var = FastGLMPredictive(la).functional(x)
    a = glm_link(la, f_mu, f_var, "mc", 20, torch.Generator().manual_seed(1))
    b = glm_link(la, f_mu, f_var, "mc", 20, torch.Generator().manual_seed(1))
    c = glm_link(la, f_mu, f_var, "mc", 20, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_probit_shrinks_towards_uniform_with_variance():
    f_mu = torch.tensor([[2.0, 0.0, -1.0]])
    low = probit_probs(f_mu, torch.eye(3).unsqueeze(0) * 0.01)
    high = probit_probs(f_mu, torch.eye(3).unsqueeze(0) * 100.0)
    assert low.max() > high.max() > 1 / 3


def test_prior_precision_change_is_seen():
    la, x = fitted(mlp, "kron", CurvlinopsGGN)
    fast = FastGLMPredictive(la)
    before = fast.functional(x)[1]
    la.prior_precision = 100.0
    after = fast.functional(x)[1]
    torch.testing.assert_close(after, glm_functional(la, x)[1], rtol=0, atol=1e-6)
    assert after.diagonal(dim1=1, dim2=2).mean() < before.diagonal(dim1=1, dim2=2).mean()


def test_refuses_last_layer_laplace():
    torch.manual_seed(0)
    la = laplace.Laplace(mlp(), "classification", subset_of_weights="last_layer",
                         hessian_structure="kron")
    with pytest.raises(BenchError, match="predictive=laplace-torch"):
        FastGLMPredictive(la)


def test_refuses_shared_layer():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.f = nn.Linear(C, C)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.f(torch.tanh(self.f(x.flatten(1)[:, :C])))

    la, x = fitted(Twice, "diag", AsdlGGN)
    with pytest.raises(BenchError, match="exactly once"):
        FastGLMPredictive(la).functional(x)
