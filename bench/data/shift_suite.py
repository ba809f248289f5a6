"""A shift-intensity suite for small grey-scale images: rotations and corruptions of growing severity.

Researchers read robustness off a curve, not a point: accuracy, ECE and NLL against the strength
of a shift (Ovadia et al. 2019; rotated (F)MNIST in Laplace Redux, 0–180° in 15° steps). This
module builds those sets from a fixed batch of test images, the same way every run: rotations,
and five corruptions at severities 1–5 in the spirit of MNIST-C / CIFAR-10-C.

Images come in and go out *normalised* ((pixel − mean) / std, shape (N, 1, H, W)); corruptions
act in pixel space [0, 1] (clamped there, as a saved image would be) and are re-normalised.
The only random corruption, noise, draws from a generator seeded by (corruption, severity) alone,
so every seed and every method sees the same images.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from bench.seeding import derive_seed

SUITE_SEED = 20240602  # fixed: the corrupted images never depend on the run seed
ANGLES: tuple[float, ...] = tuple(float(a) for a in range(0, 181, 15))  # 0° is the unshifted reference
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)

# One parameter per severity, in pixel units of [0, 1]. The values follow the spirit of
# MNIST-C / CIFAR-10-C (Mu & Gilmer 2019; Hendrycks & Dietterich 2019), scaled to 28×28
# single-channel images; they are NOT those suites' exact parameters. Checked once on a CNN trained
# briefly (86 % clean accuracy): severity 1 costs 0–4 points of accuracy, severity 5 costs 9–25.
#   noise:      std of additive Gaussian noise (ImageNet-C's gaussian_noise values; CIFAR-10-C's are 0.04–0.10)
#   blur:       sigma (pixels) of a Gaussian blur (CIFAR-10-C: 0.4–1 on 32×32; we go further)
#   contrast:   factor c of p ↦ c·p + (1 − c)·mean(p) (CIFAR-10-C's contrast values)
#   brightness: offset added to every pixel (CIFAR-10-C adds 0.05–0.3 to HSV value; a black background
#               needs more to matter)
#   pixelate:   side (pixels) of the block-averaged image before it is enlarged back (28 → 20 … 8)
CORRUPTIONS: dict[str, tuple[float, ...]] = {
    "noise": (0.08, 0.12, 0.18, 0.26, 0.38),
    "blur": (0.5, 0.8, 1.1, 1.5, 2.0),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
    "pixelate": (20, 16, 12, 10, 8),
}
PARAMETERS = {"noise": "noise std", "blur": "blur sigma, px", "contrast": "contrast factor",
              "brightness": "brightness offset", "pixelate": "side, px"}  # what CORRUPTIONS' values are
ROTATE = "rotate"
_NAME = re.compile(r"^([a-z]+)-(\d+(?:\.\d+)?)$")


@dataclass(frozen=True)
class Normalisation:
    """How a task normalises pixels in [0, 1]: x = (p − mean) / std."""

    mean: float
    std: float

    def to_pixels(self, images: torch.Tensor) -> torch.Tensor:
        return images * self.std + self.mean

    def from_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self.mean) / self.std


def rotate(images: torch.Tensor, degrees: float, norm: Normalisation) -> torch.Tensor:
    """Rotate normalised images (bilinear); the corners get the background (pixel 0) value.

    Works on the normalised tensor itself, as fashion-mnist's rotated sets always have, so the
    committed ``rotate-30``/``rotate-60`` results stay bit-for-bit reproducible. A whole turn is
    returned as is (resampling would blur it by ~1e-5), so ``rotate-0`` is the unshifted reference."""
    if degrees % 360 == 0:
        return images.clone()
    from torchvision.transforms.functional import InterpolationMode
    from torchvision.transforms.functional import rotate as tv_rotate

    background = (0.0 - norm.mean) / norm.std
    return tv_rotate(images, degrees, interpolation=InterpolationMode.BILINEAR, fill=background)


def gaussian_noise(pixels: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    return pixels + std * torch.randn(pixels.shape, generator=generator, dtype=pixels.dtype)


def gaussian_blur(pixels: torch.Tensor, sigma: float) -> torch.Tensor:
    """Kernel of ±3 sigma (odd, at least 3 pixels wide), edges reflected."""
    from torchvision.transforms.functional import gaussian_blur as tv_blur

    radius = max(1, int(3 * sigma + 0.5))
    return tv_blur(pixels, kernel_size=2 * radius + 1, sigma=sigma)


def contrast(pixels: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend each image with its own mean grey level (torchvision's adjust_contrast)."""
    from torchvision.transforms.functional import adjust_contrast

    return adjust_contrast(pixels, factor)


def brightness(pixels: torch.Tensor, offset: float) -> torch.Tensor:
    """Additive, so the black background lightens too (a multiplicative factor would leave it black)."""
    return pixels + offset


def pixelate(pixels: torch.Tensor, side: float) -> torch.Tensor:
    """Average over blocks down to ``side``×``side``, then enlarge back with nearest neighbours."""
    size = pixels.shape[-2:]
    small = F.interpolate(pixels, size=(int(side), int(side)), mode="area")
    return F.interpolate(small, size=size, mode="nearest")


def corruption_seed(kind: str, severity: int) -> int:
    """The fixed seed of one (corruption, severity) set, the same for every run and method."""
    return derive_seed(SUITE_SEED, kind, severity)


def corrupt(images: torch.Tensor, kind: str, severity: int, norm: Normalisation) -> torch.Tensor:
    """``kind`` at ``severity`` (1–5) applied in pixel space; normalised in and out, shape and dtype kept."""
    if kind not in CORRUPTIONS or severity not in SEVERITIES:
        raise ValueError(f"unknown corruption {kind!r} at severity {severity!r}")
    value = CORRUPTIONS[kind][severity - 1]
    pixels = norm.to_pixels(images)
    apply: dict[str, Callable[[], torch.Tensor]] = {
        "noise": lambda: gaussian_noise(
            pixels, value, torch.Generator().manual_seed(corruption_seed(kind, severity))),
        "blur": lambda: gaussian_blur(pixels, value),
        "contrast": lambda: contrast(pixels, value),
        "brightness": lambda: brightness(pixels, value),
        "pixelate": lambda: pixelate(pixels, value),
    }
    return norm.from_pixels(apply[kind]().clamp(0.0, 1.0)).to(images.dtype)


def set_name(kind: str, intensity: float) -> str:
    """``rotate-15``, ``noise-3``: the name of a suite set (parsed back by ``parse_set_name``)."""
    return f"{kind}-{intensity:g}"


def parse_set_name(name: str) -> tuple[str, float] | None:
    """(kind, intensity) of a suite set's name: the angle of a rotation, the severity of a
    corruption; None for any other shift set."""
    match = _NAME.match(name)
    if not match:
        return None
    kind, value = match.group(1), float(match.group(2))
    if kind == ROTATE or (kind in CORRUPTIONS and value in SEVERITIES):
        return kind, value
    return None


def suite_sets(images: torch.Tensor, labels: torch.Tensor, norm: Normalisation,
               angles: tuple[float, ...] = ANGLES) -> dict[str, TensorDataset]:
    """Every rotation in ``angles`` and every corruption at every severity of the same images."""
    sets = {set_name(ROTATE, a): TensorDataset(rotate(images, a, norm), labels) for a in angles}
    for kind in CORRUPTIONS:
        for severity in SEVERITIES:
            sets[set_name(kind, severity)] = TensorDataset(corrupt(images, kind, severity, norm), labels)
    return sets


def describe() -> dict[str, object]:
    """The suite's parameters, for a run's data info (what exactly each set name meant)."""
    return {"angles": list(ANGLES), "corruptions": {k: list(v) for k, v in CORRUPTIONS.items()},
            "seed": SUITE_SEED, "space": "pixels in [0, 1], clamped, then normalised"}
