"""What the harness derives from a method's Gaussian over logits, identically for every method.

Laplace and RegVar both end in N(f̄(x), Σ(x)) over the C logits; they differ in which entries of
Σ they estimate (``Prediction.logit_cov``: full C × C for Laplace with a Kronecker or full
posterior, per-logit variances for RegVar). From it the harness computes, with one definition:

- ``top_var``: the variance of the predicted (top) class's logit, Σ[ŷ, ŷ];
- ``centred_var``: the trace of the softmax-centred covariance H Σ H, H = I − 11ᵀ/C, i.e. the
  variance that does not move all logits together (a common shift leaves the softmax unchanged);
  with only a diagonal it is Σ_c σ²_c (1 − 1/C), the off-diagonal terms being unknown;
- ``mutual_info``: I(y; f | x) from ``MI_SAMPLES`` draws of the logit Gaussian (as ensembles and
  MC dropout get theirs from members and masks);
- the probit predictive at s = 1 (untuned) and at the validation-tuned s
  (``bench.scale_tuning``), for the leaderboard's ``[s=1]`` and ``[s tuned]`` rows.
"""

from __future__ import annotations

import torch

from bench.formulas import mutual_information

MI_SAMPLES = 100
_BATCH = 512  # inputs per sampling batch: memory O(batch · samples · C)


def diagonal(cov: torch.Tensor) -> torch.Tensor:
    """Per-logit variances (N, C) from per-logit variances or a full covariance (N, C, C)."""
    return cov.diagonal(dim1=1, dim2=2) if cov.ndim == 3 else cov


def top_var(mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """Σ[ŷ, ŷ], the variance of the predicted class's logit (N,)."""
    return diagonal(cov).double().gather(1, mean.argmax(1, keepdim=True)).squeeze(1)


def centred_var(cov: torch.Tensor) -> torch.Tensor:
    """trace(H Σ H) = trace Σ − 1ᵀΣ1 / C (N,); for a diagonal, Σ σ²_c (1 − 1/C)."""
    cov = cov.double()
    c = cov.shape[1]
    trace = diagonal(cov).sum(1)
    total = cov.sum(dim=(1, 2)) if cov.ndim == 3 else trace
    return (trace - total / c).clamp_min(0.0)


def _draws(mean: torch.Tensor, cov: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """MI_SAMPLES draws of the logits, S × N × C (Cholesky of Σ + a tiny jitter when full)."""
    mean = mean.double()
    z = torch.randn((MI_SAMPLES, *mean.shape), generator=generator, dtype=torch.float64)
    if cov.ndim == 2:
        return mean + z * cov.double().clamp_min(0.0).sqrt()
    cov = cov.double()
    jitter = 1e-10 * diagonal(cov).mean(1).clamp_min(1e-30)[:, None, None] * torch.eye(cov.shape[1], dtype=cov.dtype)
    factor, _ = torch.linalg.cholesky_ex(cov + jitter)
    return mean + torch.einsum("nij,snj->sni", factor.nan_to_num(0.0), z)


def sampled_mutual_info(mean: torch.Tensor, cov: torch.Tensor, seed: int) -> torch.Tensor:
    """I(y; f | x) under the logit Gaussian, from MI_SAMPLES seeded draws (N,)."""
    generator = torch.Generator().manual_seed(seed)
    parts = [mutual_information(_draws(mean[i : i + _BATCH], cov[i : i + _BATCH], generator).softmax(-1))
             for i in range(0, len(mean), _BATCH)]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.float64)


def gaussian_scores(mean: torch.Tensor, cov: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """The harness's scores of a logit Gaussian (see the module docstring), float64 on CPU."""
    mean, cov = mean.detach().cpu(), cov.detach().cpu()
    return {
        "top_var": top_var(mean, cov),
        "centred_var": centred_var(cov),
        "mutual_info": sampled_mutual_info(mean, cov, seed),
    }
