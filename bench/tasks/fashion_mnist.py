"""Task ``fashion-mnist``: real Fashion-MNIST, a small CNN, MNIST as OOD, rotations as shift.

``--set shift_suite=true`` replaces the two rotated sets by the shift-intensity suite
(``bench.data.shift_suite``: rotations 0–180° in 15° steps and five corruptions at severities 1–5,
``suite_size`` test images each), drawn by ``bench plot`` as accuracy / ECE / NLL against intensity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from bench.data import shift_suite
from bench.data.mnist_family import load_fashion_mnist, load_mnist_test_images
from bench.options import as_dict, option
from bench.tasks.base import Task, TaskData, TrainRecipe, register_task

MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST training-set pixel statistics
SPLIT_SEED = 20240601  # the train/validation split is fixed, independent of the run seed
NORMALISATION = shift_suite.Normalisation(MEAN, STD)
# Options that change only the evaluation sets, never the weights: one MAP checkpoint serves them all.
EVALUATION_ONLY = ("shift_angles", "shift_size", "shift_suite", "suite_size")
KEYED_AT_DEFAULT = ("shift_angles", "shift_size")  # were in the key before; see FashionMNIST.cache_key


@dataclass
class FashionMNISTOptions:
    val_size: int = option(5000, "training images held out for validation (tuning)", min=100)
    dropout: float = option(0.25, "dropout rate of the CNN (MC dropout uses these layers)", min=0.0, max=0.95)
    epochs: int = option(8, "MAP training epochs", min=1)
    shift_angles: tuple[float, ...] = option((30.0, 60.0), "rotation angles (degrees) of the shift sets")
    shift_size: int = option(2000, "test images per rotated shift set", min=10)
    shift_suite: bool = option(False, "shift sets: the shift-intensity suite (rotations 0-180 step 15, five "
                                      "corruptions at severities 1-5) instead of shift_angles")
    suite_size: int = option(300, "test images per shift-suite set (the same images in every set)", min=10)
    allow_download: bool = option(True, "download from the publisher if no local copy exists")


class FashionCNN(nn.Module):
    """Two conv blocks and an MLP head with dropout; ~114k parameters."""

    def __init__(self, num_classes: int = 10, dropout: float = 0.25, width: int = 16, hidden: int = 64):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.head = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(2 * width * 7 * 7, hidden), nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class SmallFashionCNN(nn.Sequential):
    """≤ 10k parameters, for exact-curvature fidelity checks (≈ 3.6k)."""

    def __init__(self, num_classes: int = 10):
        super().__init__(
            nn.Conv2d(1, 4, 5, stride=2, padding=2), nn.Tanh(),   # 4×14×14
            nn.Conv2d(4, 8, 5, stride=2, padding=2), nn.Tanh(),   # 8×7×7
            nn.AdaptiveAvgPool2d(3), nn.Flatten(),                 # 72
            nn.Linear(72, 24), nn.Tanh(), nn.Linear(24, num_classes),
        )


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return NORMALISATION.from_pixels(torch.from_numpy(images.astype(np.float32)) / 255.0).unsqueeze(1)


def rotate(images: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate normalised images; the corners are filled with the background value."""
    return shift_suite.rotate(images, degrees, NORMALISATION)


@register_task("fashion-mnist")
class FashionMNIST(Task):
    """Fashion-MNIST 10-way classification (55k train / 5k val / 10k test)."""

    Options = FashionMNISTOptions

    def load(self) -> TaskData:
        opts = self.options
        arrays, source = load_fashion_mnist(self.data_dir, opts.allow_download)
        x_all, y_all = to_tensor(arrays["train_x"]), torch.from_numpy(arrays["train_y"].astype(np.int64))
        x_test, y_test = to_tensor(arrays["test_x"]), torch.from_numpy(arrays["test_y"].astype(np.int64))
        perm = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(SPLIT_SEED))
        val_idx, train_idx = perm[: opts.val_size], perm[opts.val_size :]
        mnist, mnist_source = load_mnist_test_images(self.data_dir, opts.allow_download)
        x_mnist = to_tensor(mnist)
        pick = torch.randperm(len(x_test), generator=torch.Generator().manual_seed(SPLIT_SEED + 1))
        shift_idx = pick[: opts.suite_size if opts.shift_suite else opts.shift_size]
        if self.smoke:
            train_idx, val_idx = train_idx[:2000], val_idx[:500]
            x_test, y_test = x_test[:1000], y_test[:1000]
            x_mnist, shift_idx = x_mnist[:500], shift_idx[:300]
        shift_x = to_tensor(arrays["test_x"])[shift_idx]
        shift_y = torch.from_numpy(arrays["test_y"].astype(np.int64))[shift_idx]
        info = {"source": source, "ood_source": {"mnist": mnist_source}, "split_seed": SPLIT_SEED}
        if opts.shift_suite:
            shift = shift_suite.suite_sets(shift_x, shift_y, NORMALISATION)
            info["shift_suite"] = shift_suite.describe()
        else:
            shift = {f"rotate-{angle:g}": TensorDataset(rotate(shift_x, angle), shift_y) for angle in opts.shift_angles}
        return TaskData(
            train=TensorDataset(x_all[train_idx], y_all[train_idx]),
            val=TensorDataset(x_all[val_idx], y_all[val_idx]),
            test=TensorDataset(x_test, y_test),
            num_classes=10,
            ood={"mnist": x_mnist},
            shift=shift,
            info=info,
        )

    def make_model(self, num_classes: int) -> nn.Module:
        return FashionCNN(num_classes, dropout=self.options.dropout)

    def make_small_model(self, num_classes: int) -> nn.Module:
        return SmallFashionCNN(num_classes)

    def recipe(self) -> TrainRecipe:
        epochs = 1 if self.smoke else self.options.epochs
        return TrainRecipe(epochs=epochs, batch_size=128, lr=2e-3, weight_decay=1e-4)

    def trained_options(self) -> dict[str, Any]:
        """Without the evaluation-only options, so a suite run reuses the cached MAP. The two that
        were keyed before are keyed at their defaults (the suite's are left out): the key of every
        checkpoint cached before stays what it was."""
        defaults = as_dict(self.Options())
        return {k: defaults[k] if k in KEYED_AT_DEFAULT else v for k, v in as_dict(self.options).items()
                if k not in EVALUATION_ONLY or k in KEYED_AT_DEFAULT}
