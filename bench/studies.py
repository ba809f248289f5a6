"""What a method's own studies (``bench perf``, ``bench fidelity``) and its tests take from the
harness: a task's data with its cached MAP network, and a fit context around a network that is
already trained. One of each, so that no study builds them by hand."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench import options as opts
from bench.errors import BenchError
from bench.method_api import FitContext
from bench.registry import parse_spec
from bench.tasks import TASKS, Task, TaskData, TrainRecipe
from bench.training import load_state, map_checkpoint


@dataclass
class TaskWithMap:
    """A task, its data, and its MAP network: the cached one ``bench run`` trained (``checkpoint``),
    or, where none is cached, the seeded initial network (``checkpoint`` None)."""

    task: Task
    data: TaskData
    model: nn.Module
    checkpoint: Path | None

    def describe(self) -> str:
        """Where the weights come from, for a study's report."""
        if self.checkpoint is not None:
            return f"cached MAP checkpoint {self.checkpoint}"
        return (f"initial weights (no cached MAP checkpoint; `python -m bench run --method map --task "
                f"{self.task.name}{' --smoke' if self.task.smoke else ''}` makes one)")

    def require_checkpoint(self, seed: int) -> Path:
        if self.checkpoint is None:
            raise BenchError(f"no cached MAP checkpoint for {self.task.name} seed {seed}; run `python -m bench run "
                             f"--method map --task {self.task.name} --seed {seed}` first")
        return self.checkpoint


def task_with_map(task_spec: str, seed: int = 0, smoke: bool = False,
                  device: torch.device | None = None) -> TaskWithMap:
    """Load the task named by ``task_spec`` (``name`` or ``name(k=v)``) and its MAP for ``seed``."""
    name, raw = parse_spec(task_spec)
    cls = TASKS.get(name)
    task = cls(opts.build(cls.Options, raw, f"task {name}"), smoke=smoke)
    data = task.load()
    model, path = map_checkpoint(task, data, seed)
    cached = load_state(model, path)
    return TaskWithMap(task, data, model.to(device or torch.device("cpu")).eval(), path if cached else None)


def context_around(model: nn.Module, data: TaskData, recipe: TrainRecipe, *, seed: int = 0,
                   device: torch.device | None = None, make_model: Callable[[], nn.Module] | None = None,
                   log: Callable[[str], None] | None = None, **extra: Any) -> FitContext:
    """A fit context whose MAP (and ensemble member 0) is ``model``, already trained; it trains
    no other network (a method asking for one gets a one-line error)."""

    def train_model(member: int) -> nn.Module:
        if member != 0:
            raise BenchError(f"this fit context holds one trained network (the MAP), not ensemble member {member}; "
                             "run the method through `bench run`, which trains its networks")
        return model

    return FitContext(
        data=data, make_model=make_model or (lambda: copy.deepcopy(model)), recipe=recipe,
        device=device or torch.device("cpu"), seed=seed, map_model=model, train_model=train_model,
        progress=lambda it, **_: it, log=log or (lambda _message: None), **extra,
    )
