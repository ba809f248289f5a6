"""What a run will cost, estimated before it embeds or trains anything.

A run's expensive phases are embedding texts, training the MAP network, the method's fit and its
predictions. Each is estimated from sizes and a short probe of the real work on inputs of the
right shape (the cost of a dense product does not depend on the values): a task that embeds
says how many texts are missing from its feature store and what a few of them cost; the harness
times a few training steps of the task's model; a method that knows its own cost (``Method.
estimate``) prices its fit and predictions. The estimate is printed before the work starts,
stored in the run record beside the measured costs, and a method with a budget refuses a run
whose estimate exceeds it, with one line, before anything is embedded.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from bench.record import CostEstimate

if TYPE_CHECKING:  # bench.tasks.base imports this module's plans
    from bench.tasks.base import TrainRecipe

TRAIN_PROBE_STEPS = 3


@dataclass(frozen=True)
class EvaluationPlan:
    """Which evaluation inputs a run uses: all of them (``limit`` None) or this seed's subset of
    at most ``limit`` per evaluation set (``bench.subsets.draw_subset``)."""

    seed: int
    limit: int | None = None


# Validation inputs the harness predicts to tune the variance scale s (``bench.derived_rows``): all
# of them for a full-set method; for a capped (per-input) method this seed's subset of at least
# this many, so that the curve's bootstrap has inputs enough.
VALIDATION_INPUTS_CAPPED = 200


def validation_inputs(limit: int | None, n_val: int) -> int:
    """How many validation inputs a run with evaluation cap ``limit`` predicts."""
    return n_val if limit is None else min(n_val, max(limit, VALIDATION_INPUTS_CAPPED))


@dataclass
class LoadPlan:
    """What loading will produce and cost, known before it happens: the sets' sizes as the run
    sees them (capped sets at their subset size), one input row (for cost probes), the classes,
    and the texts still to embed with the probe's estimate of their seconds."""

    sizes: dict[str, int]
    example: torch.Tensor
    num_classes: int
    embed_texts: int = 0
    embed_s: float = 0.0


@dataclass
class CostPlan:
    """What a method's ``estimate`` may use: the load plan, the task's model and recipe, the device."""

    load: LoadPlan
    make_model: Callable[[], nn.Module]
    recipe: TrainRecipe
    device: torch.device


@dataclass
class Estimate(CostEstimate):
    """The record's per-phase estimate (``CostEstimate``: ``None`` where the method does not
    estimate its own cost; ``load_s`` the rest of loading, which the planning itself did and
    timed) with notes for the printed line."""

    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line, e.g. 'estimate: loading ≈ 2 s, embedding ≈ 1 min, training ≈ 12 s, fit ≈ 3 min, ...'."""
        fit = "not estimated by the method" if self.fit_s is None else duration(self.fit_s)
        predict = "not estimated by the method" if self.predict_s is None else duration(self.predict_s)
        total = "" if self.total_s is None else f"; total ≈ {duration(self.total_s)}"
        notes = f" ({'; '.join(self.notes)})" if self.notes else ""
        return (f"estimate: loading ≈ {duration(self.load_s)}, embedding ≈ {duration(self.embed_s)}, "
                f"training ≈ {duration(self.train_s)}, "
                f"fit ≈ {fit}, prediction ≈ {predict}{total}{notes}")


def duration(seconds: float) -> str:
    """Seconds as a person reads them: '45 s', '12 min', '3.2 h'."""
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 90:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


def training_seconds(make_model: Callable[[], nn.Module], recipe: TrainRecipe, example: torch.Tensor,
                     num_classes: int, n_train: int, device: torch.device) -> float:
    """The recipe's epochs × steps × one step's seconds, timed on a random batch of the
    example's shape (after one warm-up step)."""
    if n_train == 0:
        return 0.0
    model = make_model().to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    batch = min(recipe.batch_size, n_train)
    x = random_inputs(example, batch).to(device)
    y = torch.randint(0, num_classes, (batch,), device=device)

    def step() -> None:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    step()
    start = time.perf_counter()
    for _ in range(TRAIN_PROBE_STEPS):
        step()
    per_step = (time.perf_counter() - start) / TRAIN_PROBE_STEPS
    return recipe.epochs * math.ceil(n_train / recipe.batch_size) * per_step


def random_inputs(example: torch.Tensor, rows: int) -> torch.Tensor:
    """``rows`` random inputs shaped like ``example`` for a cost probe (token ids stay within its
    value range)."""
    shape = (rows, *example.shape[1:])
    if example.is_floating_point():
        return torch.randn(shape, dtype=example.dtype)
    high = max(int(example.max()) + 1, 2)
    return torch.randint(0, high, shape, dtype=example.dtype)

