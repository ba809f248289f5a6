"""The shift-intensity suite: seeded, monotone corruptions, exact names, and fashion-mnist's use of it."""

from __future__ import annotations

import pytest
import torch

from bench.data import mnist_family
from bench.data.shift_suite import (
    ANGLES,
    CORRUPTIONS,
    SEVERITIES,
    Normalisation,
    corrupt,
    parse_set_name,
    rotate,
    set_name,
    suite_sets,
)
from bench.tasks.fashion_mnist import MEAN, STD, FashionMNIST, FashionMNISTOptions

NORM = Normalisation(MEAN, STD)
# The key of the committed fashion-mnist MAP checkpoints (default options), before the suite existed.
COMMITTED_KEY, COMMITTED_SMOKE_KEY = "a68c554da7c5", "1dbac8bc1476"


def garments(n: int = 6) -> torch.Tensor:
    """Normalised stand-ins for Fashion-MNIST: textured bright shapes on a black background."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    pixels = torch.zeros(n, 1, 28, 28)
    for i in range(n):
        h, w = 6 + 2 * i % 7, 5 + 3 * i % 6
        shape = ((yy - 14).abs() < h) & ((xx - 14).abs() < w)
        pixels[i, 0] = shape * (0.5 + 0.5 * torch.rand(28, 28, generator=g))
    return NORM.from_pixels(pixels)


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corruptions_are_seeded_monotone_and_keep_shape(kind: str) -> None:
    images = garments()
    changes = []
    for severity in SEVERITIES:
        torch.manual_seed(severity)  # the global RNG must not matter
        out = corrupt(images, kind, severity, NORM)
        assert torch.equal(out, corrupt(images, kind, severity, NORM))
        assert out.shape == images.shape and out.dtype == images.dtype
        pixels = NORM.to_pixels(out)
        assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6  # a valid image, re-normalised
        changes.append((out - images).abs().mean().item())
    assert changes[0] > 0 and all(a < b for a, b in zip(changes, changes[1:], strict=False)), changes


def test_rotation_zero_is_identity_and_is_the_tasks_rotation() -> None:
    from bench.tasks.fashion_mnist import rotate as task_rotate

    images = garments()
    assert torch.equal(rotate(images, 0.0, NORM), images)
    assert torch.equal(task_rotate(images, 30.0), rotate(images, 30.0, NORM))
    corners = rotate(images, 45.0, NORM)[:, 0, 0, 0]
    assert torch.allclose(corners, torch.full_like(corners, (0.0 - MEAN) / STD))  # background, not zero


def test_set_names_parse_back_and_others_do_not() -> None:
    sets = suite_sets(garments(3), torch.arange(3), NORM)
    assert len(sets) == len(ANGLES) + len(CORRUPTIONS) * len(SEVERITIES)
    for name, data in sets.items():
        kind, intensity = parse_set_name(name)
        assert set_name(kind, intensity) == name and len(data) == 3
    assert parse_set_name("rotate-180") == ("rotate", 180.0) and parse_set_name("noise-5") == ("noise", 5.0)
    for other in ("noisy", "weak", "noise-6", "noise-0", "fog-2", "rotate-", "rotate-3x"):
        assert parse_set_name(other) is None


def test_cache_key_ignores_evaluation_only_options() -> None:
    assert FashionMNIST().cache_key() == COMMITTED_KEY
    assert FashionMNIST(smoke=True).cache_key() == COMMITTED_SMOKE_KEY
    evaluation_only = FashionMNISTOptions(shift_angles=(15.0,), shift_size=50, shift_suite=True, suite_size=40)
    assert FashionMNIST(evaluation_only).cache_key() == COMMITTED_KEY
    assert FashionMNIST(FashionMNISTOptions(dropout=0.1)).cache_key() != COMMITTED_KEY
    assert FashionMNIST(FashionMNISTOptions(dropout=0.1, shift_suite=True)).cache_key() == \
        FashionMNIST(FashionMNISTOptions(dropout=0.1)).cache_key()


@pytest.mark.skipif(not mnist_family.DEBIAN_FASHION_DIR.exists(), reason="Debian package not installed")
def test_smoke_task_builds_the_suite_from_the_same_images() -> None:
    plain = FashionMNIST(FashionMNISTOptions(allow_download=False), smoke=True).load()
    suite = FashionMNIST(FashionMNISTOptions(allow_download=False, shift_suite=True, suite_size=40),
                         smoke=True).load()
    expected = {f"rotate-{a:g}" for a in range(0, 181, 15)}
    expected |= {f"{kind}-{s}" for kind in ("noise", "blur", "contrast", "brightness", "pixelate") for s in range(1, 6)}
    assert set(suite.shift) == expected and all(len(d) == 40 for d in suite.shift.values())
    assert set(plain.shift) == {"rotate-30", "rotate-60"} and "shift_suite" in suite.info
    # The suite's images are the first of the same seeded pick: its rotations equal the plain sets'.
    for name in ("rotate-30", "rotate-60"):
        assert torch.equal(suite.shift[name].tensors[0], plain.shift[name].tensors[0][:40])
        assert torch.equal(suite.shift[name].tensors[1], plain.shift[name].tensors[1][:40])
    clean = suite.shift["rotate-0"].tensors[0]
    assert torch.equal(suite.shift["blur-3"].tensors[1], suite.shift["rotate-0"].tensors[1])
    assert not torch.equal(suite.shift["noise-1"].tensors[0], clean)
