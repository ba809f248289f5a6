"""Predictive and uncertainty scores from a stack of sampled predictive distributions.

Deep ensembles (one sample per member) and MC dropout (one sample per stochastic pass) both
approximate the Bayesian model average p(y|x) ≈ 1/S Σ_s p(y|x, θ_s). From the same stack we get
the usual decomposition of the total (predictive) entropy:

    H[1/S Σ_s p_s]  =  1/S Σ_s H[p_s]  +  I(y; θ | x)
    total              expected entropy    mutual information
                       (aleatoric)         (epistemic, "BALD")

Everything is computed in float64: the mutual information is a small difference of two
entropies and float32 rounding alone would make it negative for confident inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from bench import formulas
from bench.formulas import entropy
from bench.types import Prediction

SCORE_NAMES = ("mutual_info", "expected_entropy")


def _check(samples: torch.Tensor) -> torch.Tensor:
    if samples.ndim != 3:
        raise ValueError(f"samples must be S x N x C probabilities, got {tuple(samples.shape)}")
    return samples.double()


def mean_predictive(samples: torch.Tensor) -> torch.Tensor:
    """The model average: mean over samples of S × N × C probabilities → N × C."""
    return _check(samples).mean(dim=0)


def expected_entropy(samples: torch.Tensor) -> torch.Tensor:
    """Mean over samples of each sample's entropy → (N,)."""
    return entropy(_check(samples)).mean(dim=0)


def mutual_information(samples: torch.Tensor) -> torch.Tensor:
    """Entropy of the mean minus mean entropy → (N,) (``bench.formulas.mutual_information``)."""
    return formulas.mutual_information(_check(samples))


def summarize(samples: torch.Tensor) -> Prediction:
    """Mean predictive plus the ``mutual_info`` and ``expected_entropy`` scores, on CPU.

    (Predictive entropy, the total, is added by the harness from ``probs`` itself.)
    """
    samples = _check(samples)
    mean = samples.mean(dim=0)
    exp_ent = entropy(samples).mean(dim=0)
    mi = formulas.mutual_information(samples)
    return Prediction(mean.cpu(), {"mutual_info": mi.cpu(), "expected_entropy": exp_ent.cpu()})


@torch.no_grad()
def batched_summary(
    x: torch.Tensor,
    sample_probs: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    batch_size: int,
) -> Prediction:
    """Run ``sample_probs`` (a device batch → S × B × C probabilities) over ``x`` in batches.

    Only one batch of samples lives at a time, so memory is O(S · batch · C), not O(S · N · C).
    """
    if len(x) == 0:
        raise ValueError("cannot predict on an empty input tensor")
    parts = [
        summarize(sample_probs(x[i : i + batch_size].to(device, non_blocking=True)))
        for i in range(0, len(x), batch_size)
    ]
    return Prediction.concat(parts)
