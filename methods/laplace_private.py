"""laplace-torch's private attributes, read in this module only.

laplace-torch has no public call for the GLM functional posterior (the logits' mean and C × C
covariance), for drawing from it, for the device a posterior lives on, or for the name of the
layer a last-layer posterior chose; the methods need all four. Keeping them here means a
laplace-torch release that renames one breaks one module, with a line naming the tested range
(pinned in pyproject.toml) instead of an AttributeError deep in a fit.
"""

from __future__ import annotations

from typing import Any

import torch

from bench.errors import BenchError

TESTED_RANGE = ">=0.3,<0.4"  # keep in step with the laplace-torch pin in pyproject.toml


def _private(owner: object, name: str) -> Any:
    try:
        return getattr(owner, name)
    except AttributeError:
        from importlib.metadata import version

        raise BenchError(
            f"laplace-torch {version('laplace-torch')} has no {type(owner).__name__}.{name}; "
            f"install laplace-torch{TESTED_RANGE}, the range these methods are tested with"
        ) from None


def glm_functional(la: object, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean logits (N, C) and their covariance (N, C, C) under the GLM (linearised) posterior."""
    return _private(la, "_glm_predictive_distribution")(x)


def glm_samples(la: object, f_mu: torch.Tensor, f_var: torch.Tensor, n_samples: int,
                generator: torch.Generator | None) -> torch.Tensor:
    """``n_samples`` softmax draws (S, N, C) from N(f_mu, f_var), laplace-torch's own sampler."""
    return _private(la, "_glm_predictive_samples")(f_mu, f_var, n_samples=n_samples, generator=generator)


def posterior_device(la: object) -> torch.device:
    """The device laplace-torch keeps the posterior on."""
    return _private(la, "_device")


def last_layer_name(la: object) -> str | None:
    """The module name of the layer a last-layer posterior chose (None before it chose one)."""
    return _private(_private(la, "model"), "_last_layer_name")
