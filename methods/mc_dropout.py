"""MC dropout (Gal & Ghahramani, 2016): dropout kept on at test time, T stochastic passes.

A network trained with dropout is read as a variational posterior over weights; averaging the
softmax over T dropout masks approximates the model average. Only the dropout layers sample:
every other module (batch norm in particular) stays in eval mode, as in the reference
implementations, so that a pass differs from the MAP pass by its masks alone.

Rate: by default each dropout layer keeps the rate the task's model was built with, so the
network is the cached MAP checkpoint (``ctx.train_model(0)``). ``rate=p`` sets p on every
dropout layer *and trains a fresh network with that rate* (same recipe, seed derived from the
run seed): Gal's method samples from the rate it was trained with, and changing p only at test
time would be a different, uncalibrated method. That retraining happens inside ``fit`` (so the
harness's fit time includes it) and is not cached, because methods never write files. Where the
task exposes its model's rate as a task option (``fashion-mnist``: ``--set task.dropout=0.1``),
prefer that: the network then comes from the harness's checkpoint cache like any MAP network.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bench.errors import BenchError
from bench.method_api import FitContext, Method, register_method
from bench.options import option
from bench.seeding import derive_seed
from bench.types import Prediction

from .sample_scores import batched_summary

# Every torch dropout flavour (all subclass the private _DropoutNd).
DROPOUT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
KEEP_RATE = -1.0


@dataclass
class MCDropoutOptions:
    samples: int = option(32, "stochastic forward passes T per input", min=1)
    rate: float = option(
        KEEP_RATE,
        "dropout probability for every dropout layer, in training and at test time; "
        "-1 keeps the model's own rates (and reuses the cached MAP checkpoint); another rate "
        "trains an uncached network in fit (a task's own dropout option, if any, is cached)",
        min=-1.0,
        max=0.99,
    )
    batch_size: int = option(1024, "inputs per forward pass at predict time", min=1)


def dropout_layers(model: nn.Module) -> list[nn.Module]:
    """The model's dropout modules, in registration order."""
    return [m for m in model.modules() if isinstance(m, DROPOUT_TYPES)]


def enable_dropout(model: nn.Module) -> nn.Module:
    """Eval mode everywhere except the dropout layers, which sample (train mode)."""
    model.eval()
    for layer in dropout_layers(model):
        layer.train()
    return model


def _require_dropout(model: nn.Module) -> list[float]:
    """The model's dropout rates; a BenchError if it has no dropout layer to sample from."""
    rates = [float(m.p) for m in dropout_layers(model)]
    if not rates:
        raise BenchError(
            f"mc-dropout: the task's model ({type(model).__name__}) has no nn.Dropout layers; "
            "choose a task whose model uses dropout, or another method"
        )
    return rates


def set_rate(model: nn.Module, rate: float) -> nn.Module:
    for layer in dropout_layers(model):
        layer.p = rate
    return model


@contextmanager
def seeded_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Seed the CPU generator and the default generator of ``device`` for the block, then
    restore both states.

    ``nn.Dropout`` draws its masks from the default generator of the tensor's device and takes
    no ``generator`` argument, so a private ``torch.Generator`` cannot be plugged in without
    re-implementing every dropout flavour. Forking the device RNG gives the same guarantee —
    the same seed gives the same masks — with torch's own kernels, and leaves the caller's
    random stream untouched.
    """
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            yield
        return
    module = torch.get_device_module(device.type)
    index = device.index if device.index is not None else module.current_device()
    with torch.random.fork_rng(devices=[index], device_type=device.type):
        torch.default_generator.manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.default_generators[index].manual_seed(seed)
        else:  # mps and other single-device backends
            module.manual_seed(seed)
        yield


@register_method("mc-dropout")
class MCDropout(Method):
    """Mean softmax over T dropout masks; scores ``mutual_info`` and ``expected_entropy``."""

    citation = (
        'Y. Gal and Z. Ghahramani, "Dropout as a Bayesian Approximation: Representing Model '
        'Uncertainty in Deep Learning", ICML 2016'
    )

    Options = MCDropoutOptions
    # The network comes from ctx.train_model(0) (the cached MAP checkpoint) or, for another
    # rate, from ctx.train_variant: the harness need not prepare the MAP network.
    uses_map = False

    def __init__(self, options: MCDropoutOptions | None = None) -> None:
        super().__init__(options)
        self.model: nn.Module | None = None
        self.device = torch.device("cpu")
        self.seed = 0
        self.retrained = False
        self.rates: list[float] = []

    def fit(self, ctx: FitContext) -> None:
        rate = self.options.rate
        if rate != KEEP_RATE and not 0.0 <= rate < 1.0:
            raise BenchError(
                f"mc-dropout: rate={rate} is invalid; use 0 <= rate < 1, or -1 to keep the "
                "model's own rates"
            )
        self.device = ctx.device
        self.seed = derive_seed(ctx.seed, "mc-dropout", "masks")
        if rate == KEEP_RATE:
            model = self._map_network(ctx)
        else:
            train_seed = derive_seed(ctx.seed, "mc-dropout", "train", rate)
            with seeded_rng(torch.device("cpu"), train_seed):
                model = ctx.make_model()
            own_rates = _require_dropout(model)
            if all(p == rate for p in own_rates):
                model = self._map_network(ctx)  # the MAP network already has this rate
            else:
                model = self._train_with_rate(ctx, set_rate(model, rate), rate)
        self.model = enable_dropout(model.to(ctx.device))
        self.rates = [float(m.p) for m in dropout_layers(self.model)]
        ctx.log(
            f"mc-dropout: {len(self.rates)} dropout layer(s), rates {self.rates}, "
            f"{self.options.samples} passes, "
            + ("network retrained with this rate" if self.retrained else "MAP network")
        )

    def _map_network(self, ctx: FitContext) -> nn.Module:
        # Copy: this may be the harness's shared MAP model, which we must not switch into
        # dropout mode in place.
        model = copy.deepcopy(ctx.train_model(0))
        _require_dropout(model)
        self.retrained = False
        return model

    def _train_with_rate(self, ctx: FitContext, model: nn.Module, rate: float) -> nn.Module:
        """The MAP recipe with every dropout layer at ``rate`` (dropout on while training), trained
        through the context: cached and charged to the run like any network."""
        if ctx.train_variant is None:
            raise BenchError("mc-dropout: this fit context cannot train a network; keep the model's own "
                             "rates (rate=-1)")
        self.retrained = True
        return ctx.train_variant(f"dropout={rate:g}", model)

    def _sample_probs(self, xb: torch.Tensor) -> torch.Tensor:
        assert self.model is not None
        return torch.stack(
            [self.model(xb).double().softmax(dim=-1) for _ in range(self.options.samples)]
        )

    def predict(self, x: torch.Tensor) -> Prediction:
        if self.model is None:
            raise BenchError("mc-dropout: predict called before fit; call fit(ctx) first")
        enable_dropout(self.model)
        # Reseeded per call: predict(x) is a function of x alone, whatever was predicted before.
        with seeded_rng(self.device, self.seed):
            return batched_summary(x, self._sample_probs, self.device, self.options.batch_size)

    def summary(self) -> dict[str, Any]:
        return {
            "samples": self.options.samples,
            "dropout_rates": self.rates,
            "retrained_with_rate": self.retrained,
        }
