"""Laplace predictives against closed forms: Bayesian linear regression and logistic regression.

For a linear model the GGN is the exact Hessian, so the Laplace posterior is known by hand:
checked for laplace-torch's own GLM predictive and for ``FastGLMPredictive`` on the same fit.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bench_methods.kfac_predictive import FastGLMPredictive, probit_probs
from bench_methods.laplace_private import glm_functional

laplace = pytest.importorskip("laplace")

SIGMA, LAMBDA = 0.5, 2.0


def fit(model: nn.Module, likelihood: str, x: torch.Tensor, y: torch.Tensor, structure: str,
        **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la = laplace.Laplace(model, likelihood, subset_of_weights="all",
                             hessian_structure=structure, prior_precision=LAMBDA, **kwargs)
        la.fit(DataLoader(TensorDataset(x, y), batch_size=7))
    return la


def regression_data(d: int = 4, n: int = 30):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x @ torch.randn(d, 1, generator=g, dtype=torch.float64) + 0.3 * torch.randn(
        n, 1, generator=g, dtype=torch.float64)
    x_star = torch.randn(5, d, generator=g, dtype=torch.float64)
    return x, y, x_star


# kron is exact here too: one output, no bias, so the GGN is (Σ 1) ⊗ mean(x xᵀ) = Xᵀ X.
@pytest.mark.parametrize("structure", ["full", "kron"])
def test_bayesian_linear_regression_predictive_variance(structure):
    x, y, x_star = regression_data()
    model = nn.Linear(4, 1, bias=False).double()
    la = fit(model, "regression", x, y, structure, sigma_noise=SIGMA)
    precision = x.T @ x / SIGMA**2 + LAMBDA * torch.eye(4, dtype=torch.float64)
    closed = torch.einsum("nd,de,ne->n", x_star, torch.linalg.inv(precision), x_star)

    f_mu, f_var = la(x_star, pred_type="glm")  # regression: (mean, functional variance)
    torch.testing.assert_close(f_var.reshape(-1), closed, rtol=1e-6, atol=0)
    torch.testing.assert_close(f_mu, model(x_star).detach())
    # the observation noise is added by the user: predictive variance = f_var + σ²
    torch.testing.assert_close((f_var.reshape(-1) + SIGMA**2), closed + SIGMA**2)

    g_mu, g_var = FastGLMPredictive(la).functional(x_star)
    torch.testing.assert_close(g_var.reshape(-1), closed, rtol=1e-6, atol=0)


def test_bayesian_linear_regression_diag():
    x, y, x_star = regression_data()
    la = fit(nn.Linear(4, 1, bias=False).double(), "regression", x, y, "diag",
             sigma_noise=SIGMA, backend=laplace.curvature.BackPackGGN)
    diag_precision = (x**2).sum(0) / SIGMA**2 + LAMBDA
    closed = (x_star**2 / diag_precision).sum(1)
    torch.testing.assert_close(FastGLMPredictive(la).functional(x_star)[1].reshape(-1), closed)
    torch.testing.assert_close(la(x_star, pred_type="glm")[1].reshape(-1), closed)


def test_logistic_regression_hessian_and_predictive():
    """Softmax regression: H = Σ (diag p − p pᵀ) ⊗ x xᵀ for W (C×d) flattened row-major."""
    g = torch.Generator().manual_seed(1)
    n, d, c = 25, 3, 3
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    x_star = torch.randn(4, d, generator=g, dtype=torch.float64)
    model = nn.Linear(d, c, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(c, d, generator=g, dtype=torch.float64))
    la = fit(model, "classification", x, y, "full")

    p = torch.softmax(x @ model.weight.detach().T, dim=1)
    hessian = sum(
        torch.kron(torch.diag(p[i]) - torch.outer(p[i], p[i]), torch.outer(x[i], x[i]))
        for i in range(n)
    )
    precision = hessian + LAMBDA * torch.eye(c * d, dtype=torch.float64)
    torch.testing.assert_close(la.posterior_precision, precision)

    # J(x*) = I_C ⊗ x*ᵀ, so f_var = (I ⊗ x*ᵀ) P⁻¹ (I ⊗ x*)
    cov = torch.linalg.inv(precision)
    jac = torch.stack([torch.kron(torch.eye(c, dtype=torch.float64), xs[None]) for xs in x_star])
    closed = jac @ cov @ jac.transpose(1, 2)
    f_mu, f_var = glm_functional(la, x_star)
    torch.testing.assert_close(f_var, closed)
    fast_mu, fast_var = FastGLMPredictive(la).functional(x_star)
    torch.testing.assert_close(fast_var, closed)

    logits = x_star @ model.weight.detach().T
    kappa = 1 / torch.sqrt(1 + math.pi / 8 * closed.diagonal(dim1=1, dim2=2))
    torch.testing.assert_close(probit_probs(fast_mu, fast_var), torch.softmax(kappa * logits, 1))
    torch.testing.assert_close(la(x_star, link_approx="probit"), torch.softmax(kappa * logits, 1))
