"""MAP training with a task's recipe, and the checkpoint cache that makes it happen once."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bench.cache import cache_root
from bench.errors import BenchError
from bench.tasks.base import TrainRecipe


def train(
    model: nn.Module,
    data: TensorDataset,
    recipe: TrainRecipe,
    device: torch.device,
    generator: torch.Generator,
    progress: Callable[..., Iterable],
    desc: str = "train",
) -> nn.Module:
    """Minimise mean cross-entropy + decoupled weight decay (the MAP objective used here)."""
    model.to(device).train()
    loader = DataLoader(data, batch_size=recipe.batch_size, shuffle=True, generator=generator)
    if recipe.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    elif recipe.optimizer == "sgd":
        opt = torch.optim.SGD(
            model.parameters(), lr=recipe.lr, momentum=0.9, weight_decay=recipe.weight_decay
        )
    else:
        raise BenchError(f"unknown optimizer {recipe.optimizer!r} in recipe; use adamw or sgd")
    total = recipe.epochs * len(loader)
    sched = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total, 1))
        if recipe.schedule == "cosine"
        else None
    )
    loss_fn = nn.CrossEntropyLoss()
    for epoch in progress(range(recipe.epochs), desc=desc, unit="epoch"):
        finite = torch.ones((), dtype=torch.bool, device=device)  # checked once an epoch: no per-step sync
        for xb, yb in loader:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            finite &= torch.isfinite(loss.detach())
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
        if not (bool(finite) and weights_finite(model)):
            raise TrainingDiverged(
                f"training diverged ({desc}): the loss or the weights became NaN or inf in epoch {epoch + 1} of "
                f"{recipe.epochs} (recipe: {recipe.optimizer}, lr {recipe.lr}); nothing was cached. "
                "This is the task's training, not the method: lower the recipe's learning rate"
            )
    model.eval()
    return model


class TrainingDiverged(BenchError):
    """Training produced a non-finite loss or weights (never cached, never handed to a method)."""


def weights_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point())


def checkpoint_path(task_key: str, recipe: TrainRecipe, seed: int, member: int = 0) -> Path:
    name = f"seed{seed}" + (f"-member{member}" if member else "") + ".pt"
    return cache_root() / "checkpoints" / task_key / recipe.key() / name


def save_state(model: nn.Module, path: Path) -> None:
    """Atomic save: a crash never leaves a half-written checkpoint behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_state(model: nn.Module, path: Path) -> bool:
    """Load cached weights (``weights_only=True``); False if absent, error if corrupt."""
    if not path.exists():
        return False
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
        raise BenchError(
            f"cached checkpoint {path} is unreadable ({type(exc).__name__}); delete it and rerun"
        ) from None
    if not weights_finite(model):  # written by a diverged training before it was refused
        raise BenchError(f"cached checkpoint {path} holds NaN or inf weights; delete it and rerun")
    return True
