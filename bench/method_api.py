"""What a method is and what it is given. Methods never compute metrics or touch files."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from bench.planning import CostPlan, Estimate
from bench.registry import Registry
from bench.tasks.base import NoOptions, TaskData, TrainRecipe
from bench.types import Prediction

Progress = Callable[..., Iterable]


@dataclass
class FitContext:
    """Everything a method may use to fit. ``map_model`` is the shared cached MAP network
    (post-hoc methods start from it and must not modify it in place: copy first).
    ``train_model(member)`` trains a fresh network with the task's recipe for ensemble member
    ``member`` (member 0 is the MAP network), reusing the harness's checkpoint cache.
    """

    data: TaskData
    make_model: Callable[[], nn.Module]
    recipe: TrainRecipe
    device: torch.device
    seed: int
    map_model: nn.Module | None
    train_model: Callable[[int], nn.Module]
    progress: Progress
    log: Callable[[str], None]
    make_small_model: Callable[[], nn.Module] | None = None
    # train_variant(name, model): ``model``, the task's architecture changed in a way its parameters
    # do not show (``name`` says how, e.g. "dropout=0.3"), trained with the task's recipe, cached
    # under that name and charged to the run like any network.
    train_variant: Callable[[str, nn.Module], nn.Module] | None = None


class Method(ABC):
    """Base class of registered methods.

    ``uses_map``: the harness trains (or loads) the MAP network before ``fit``. The class
    docstring's first paragraph describes the method on the site's method page.
    """

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    uses_map: ClassVar[bool] = True
    citation: ClassVar[str] = ""  # the paper the method comes from, as the site's method page cites it

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()

    @abstractmethod
    def fit(self, ctx: FitContext) -> None:
        """Prepare the predictive (post-hoc fit, tuning on ``ctx.data.val``, training...)."""

    @abstractmethod
    def predict(self, x: torch.Tensor) -> Prediction:
        """Predictive probabilities (and the method's own scores) for inputs ``x`` (on CPU)."""

    def estimate(self, plan: CostPlan) -> tuple[float, float] | None:
        """Seconds of (fit, prediction) for a run of ``plan``, from sizes and short probes, before
        any data is embedded or network trained; None: the method does not estimate its cost."""
        return None

    def check_estimate(self, estimate: Estimate) -> None:
        """Raise ``BenchError`` (one line) when the run's estimate exceeds what the method allows
        (by default a method allows any cost)."""
        return None

    def summary(self) -> dict[str, Any]:
        """Fitted quantities worth recording in the result (tuned temperature, prior...).

        A list of strings under ``FLAGS_KEY`` is a warning the harness prints, copies to the
        record's ``flags`` and marks in the leaderboard (e.g. :func:`grid_edge_flag`)."""
        return {}


FLAGS_KEY = "flags"
# A method whose probabilities are, by definition, the probit of the logit Gaussian it returns at
# s = 1 says so under this key: its ``[s=1]`` row is its own row and is not repeated.
OWN_PREDICTIVE_KEY = "own_predictive"
PROBIT_AT_1 = "probit of its logit Gaussian at s=1"


def grid_edge_flag(name: str, value: float, grid: Sequence[float], meaning: str = "") -> str | None:
    """A flag when a value tuned on ``grid`` sits on the grid's first or last point.

    There the optimum may lie outside the grid, or the tuned quantity is switched off (a
    variance scale on its floor): either way the choice is not an honest optimum and must show.
    ``meaning`` says what the edge means for this quantity, e.g. "the variance is switched off".
    """
    if len(grid) < 2:
        return None
    lo, hi = min(grid), max(grid)
    edge = "floor" if value <= lo else "ceiling" if value >= hi else None
    if edge is None:
        return None
    return f"tuned {name}={value:.3g} is on the {edge} of its grid [{lo:.3g}, {hi:.3g}]" + (
        f": {meaning}" if meaning else "")


METHODS: Registry[type[Method]] = Registry("method")
register_method = METHODS.register


@torch.no_grad()
def batched_logits(model: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int = 1024) -> torch.Tensor:
    """Eval-mode logits for ``x`` in batches, returned on CPU."""
    model.eval()
    outs = [model(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(outs) if outs else torch.empty(0)
