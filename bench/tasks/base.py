"""What a task is: in-distribution data, shift and OOD sets, a model factory and a recipe."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from bench.options import as_dict
from bench.planning import EvaluationPlan, LoadPlan
from bench.prediction_arrays import ood_set, shift_set
from bench.registry import Registry


@dataclass(frozen=True)
class TrainRecipe:
    """How the task's model is trained to MAP (also used by ensembles and MC dropout)."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    optimizer: str = "adamw"
    schedule: str = "cosine"
    # After training, a trust-region Newton finish to a certified minimum of mean CE + (wd/2)‖θ‖²
    # (``bench.map_finish``). False where it is unaffordable: the MAP is then measured, not finished.
    newton_finish: bool = False

    def key(self) -> str:
        fields = dataclasses.asdict(self)
        if not self.newton_finish:  # recipes without a finish keep the keys they had before it existed
            del fields["newton_finish"]
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class TaskData:
    """Tensors in memory. ``ood`` sets have inputs only; ``shift`` sets keep their labels."""

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    num_classes: int
    ood: dict[str, torch.Tensor] = field(default_factory=dict)
    shift: dict[str, TensorDataset] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    # Sets the task loaded only in part (a capped run's subset, see ``Task.evaluation``): their
    # name ("test", "ood/<name>", "shift/<name>") → (full size, indices of the loaded rows).
    subsets: dict[str, tuple[int, np.ndarray]] = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        """Every set's full size (a set loaded in part counts what it was drawn from)."""
        out = {"train": len(self.train), "val": len(self.val), "test": len(self.test)}
        out.update({ood_set(k): len(v) for k, v in self.ood.items()})
        out.update({shift_set(k): len(v) for k, v in self.shift.items()})
        out.update({k: full for k, (full, _) in self.subsets.items()})
        return out


@dataclass
class NoOptions:
    """A task or method without options."""


class Task(ABC):
    """Base class of registered tasks. Subclasses set ``Options`` and implement the abstract API.

    ``smoke`` asks for a small, fast configuration (CI, tests); ``data_dir`` points at user data.
    """

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any = None, smoke: bool = False, data_dir: Path | None = None):
        self.options = options if options is not None else self.Options()
        self.smoke = smoke
        self.data_dir = data_dir
        # Set by the harness before ``load``: a capped run's seed and limit. A task whose loading
        # is expensive per input (embedding) may load only that seed's subset of each evaluation
        # set and say so in ``TaskData.subsets``; others ignore it.
        self.evaluation: EvaluationPlan | None = None

    def plan(self) -> LoadPlan | None:
        """What ``load`` will produce and cost, without loading (None: loading is cheap, so
        the harness loads first and plans from the data)."""
        return None

    @abstractmethod
    def load(self) -> TaskData:
        """Read (and if needed, download or embed) the data; deterministic splits."""

    @abstractmethod
    def make_model(self, num_classes: int) -> nn.Module:
        """A freshly initialised trainable model (seeded by the caller)."""

    @abstractmethod
    def recipe(self) -> TrainRecipe:
        """The MAP training recipe."""

    def make_small_model(self, num_classes: int) -> nn.Module:
        """A version of the model small enough (≤ 10k params) for exact curvature."""
        raise NotImplementedError(f"task {self.name} has no small model for fidelity checks")

    def trained_options(self) -> dict[str, Any]:
        """The options that can change the trained weights (all of them unless a task says which
        only change its evaluation sets): what the checkpoint cache is keyed by."""
        return as_dict(self.options)

    def cache_key(self) -> str:
        """Identifies the data and model configuration for checkpoint caching."""
        payload = {"task": self.name, "smoke": self.smoke, "options": self.trained_options()}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


TASKS: Registry[type[Task]] = Registry("task")
register_task = TASKS.register
