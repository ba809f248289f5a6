"""MAP training with a task's recipe, and the checkpoint cache that makes it happen once."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bench.cache import cache_root
from bench.errors import BenchError
from bench.record import MapCertificate
from bench.results import atomic_write_bytes
from bench.seeding import derive_seed
from bench.tasks.base import Task, TaskData, TrainRecipe


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


def _feed_architecture(digest: Any, model: nn.Module) -> Any:
    digest.update(repr(model).encode())
    for name, value in model.state_dict().items():
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype};".encode())
    return digest


def _feed_data(digest: Any, train: TensorDataset) -> Any:
    for tensor in train.tensors:
        array = tensor.detach().cpu().contiguous().numpy()
        digest.update(f"{array.shape}:{array.dtype};".encode())
        digest.update(memoryview(array).cast("B"))
    return digest


def fingerprint(model: nn.Module, train: TensorDataset) -> str:
    """What a checkpoint was trained for: the network's architecture (its repr and every state
    entry's name, shape and dtype) and the exact training tensors. A changed data split or a
    changed network gets its own checkpoint instead of silently reusing one trained for another."""
    return _feed_data(_feed_architecture(hashlib.sha256(), model), train).hexdigest()[:12]


def fingerprint_parts(model: nn.Module, train: TensorDataset) -> dict[str, str]:
    """The architecture and the training data hashed apart, kept beside a checkpoint so that a
    later miss can say which of the two changed."""
    return {"architecture": _feed_architecture(hashlib.sha256(), model).hexdigest()[:12],
            "data": _feed_data(hashlib.sha256(), train).hexdigest()[:12]}


PARTS_FILE = "fingerprint.json"


def save_parts(path: Path, parts: dict[str, str]) -> None:
    atomic_write_bytes(path.parent / PARTS_FILE, json.dumps(parts).encode())


def why_not_cached(path: Path, parts: dict[str, str]) -> str:
    """Why checkpoint ``path`` is absent: what differs from the cached networks of the same task,
    recipe, seed and member (which are never used for another architecture or data)."""
    others = [p for p in path.parent.parent.glob(f"*/{path.name}") if p.parent != path.parent]
    if not others:
        return "no cached checkpoint"
    names = {"architecture": "architecture", "data": "training data"}
    differences = []  # per cached checkpoint, what differs; the closest one explains the miss
    for other in others:
        try:
            theirs = json.loads((other.parent / PARTS_FILE).read_text())
        except (OSError, ValueError):  # trained before the parts were kept
            theirs = {}
        unknown = ["architecture or training data"]
        changed = [names[k] for k in names if theirs.get(k) != parts[k]] if theirs else unknown
        differences.append((changed, other))
    changed, closest = min(differences, key=lambda d: len(d[0]))
    what = " and ".join(changed)
    return f"the network's {what} changed since the cached checkpoint {closest} was trained; not reusing it"


def checkpoint_path(task_key: str, recipe: TrainRecipe, fingerprint_: str, seed: int, member: int = 0,
                    variant: str = "") -> Path:
    """Where the cache keeps a network: task options, recipe, architecture + data fingerprint
    (a variant, e.g. ``dropout=0.3``, differs in what the parameters do not show: named)."""
    name = f"seed{seed}" + (f"-member{member}" if member else "") + (f"-{variant}" if variant else "") + ".pt"
    return cache_root() / "checkpoints" / task_key / recipe.key() / fingerprint_ / name


def map_checkpoint(
    task: Task, data: TaskData, seed: int, member: int = 0, fingerprint_: str | None = None
) -> tuple[nn.Module, Path]:
    """A fresh (seeded) network of ``task`` and the path its trained weights are cached at;
    ``fingerprint_`` is the task's (from an earlier call) to save hashing the data again."""
    torch.manual_seed(seed if member == 0 else derive_seed(seed, "member", member))
    model = task.make_model(data.num_classes)
    print_ = fingerprint_ if fingerprint_ is not None else fingerprint(model, data.train)
    return model, checkpoint_path(task.cache_key(), task.recipe(), print_, seed, member)


@dataclass(frozen=True)
class TrainingCost:
    """What training a cached network cost when it was trained (read back on every load)."""

    seconds: float
    device: str
    threads: int | None = None  # CPU threads torch used (None: recorded before threads were kept)
    peak_bytes: int | None = None  # peak memory of the training, of ``memory_kind``
    memory_kind: str | None = None


def _cost_path(path: Path) -> Path:
    return path.with_suffix(".cost.json")


def save_cost(path: Path, cost: TrainingCost) -> None:
    atomic_write_bytes(_cost_path(path), json.dumps(dataclasses.asdict(cost)).encode())


def read_cost(path: Path) -> TrainingCost:
    """The training cost stored beside checkpoint ``path`` (a one-line error if unreadable)."""
    try:
        return TrainingCost(**json.loads(_cost_path(path).read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise BenchError(f"cached checkpoint {path} has no readable training cost ({type(exc).__name__}); "
                         "delete the checkpoint and rerun") from None


def _certificate_path(path: Path) -> Path:
    return path.with_suffix(".map.json")


def save_certificate(path: Path, certificate: MapCertificate) -> None:
    atomic_write_bytes(_certificate_path(path), json.dumps(dataclasses.asdict(certificate)).encode())


def read_certificate(path: Path) -> MapCertificate | None:
    """The certificate kept beside checkpoint ``path`` (None: trained before they were kept)."""
    where = _certificate_path(path)
    if not where.exists():
        return None
    try:
        return MapCertificate(**json.loads(where.read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise BenchError(f"cached checkpoint {path} has an unreadable MAP certificate ({type(exc).__name__}); "
                         "delete the checkpoint and rerun") from None


def frozen_names(model: nn.Module) -> set[str]:
    """State entries of parameters that training never changes (a pretrained backbone's)."""
    return {name for name, p in model.named_parameters() if not p.requires_grad}


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint stores: the state without frozen parameters, which come with the model
    (a LoRA network's checkpoint is its adapters and head, not 22M backbone weights again)."""
    frozen = frozen_names(model)
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if k not in frozen}


def save_state(model: nn.Module, path: Path) -> None:
    """Atomic save (``bench.results.atomic_write_bytes``): a crash never leaves half a checkpoint."""
    buffer = io.BytesIO()
    torch.save(trained_state(model), buffer)
    atomic_write_bytes(path, buffer.getvalue())


class CorruptCheckpoint(BenchError):
    """A cached checkpoint that cannot be used (unreadable, mismatched or non-finite weights)."""


def move_aside(path: Path) -> Path:
    """Rename a corrupt checkpoint out of the cache's way (kept for inspection); its new path."""
    target = path.with_name(path.name + ".corrupt")
    path.replace(target)
    return target


def load_state(model: nn.Module, path: Path) -> bool:
    """Load cached weights (``weights_only=True``); False if absent, CorruptCheckpoint if corrupt."""
    if not path.exists():
        return False
    try:
        with warnings.catch_warnings():  # torch warns before failing on a damaged file: one line is ours
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
        result = model.load_state_dict(state, strict=False)
        if result.unexpected_keys or set(result.missing_keys) - frozen_names(model):
            raise KeyError("the checkpoint's entries do not match the model's trainable state")
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
        raise CorruptCheckpoint(
            f"cached checkpoint {path} is unreadable ({type(exc).__name__}); delete it and rerun"
        ) from None
    if not weights_finite(model):  # written by a diverged training before it was refused
        raise CorruptCheckpoint(f"cached checkpoint {path} holds NaN or inf weights; delete it and rerun")
    return True
