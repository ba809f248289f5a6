"""The on-disk cache root for checkpoints, features and downloads, and its lock."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock


def cache_root() -> Path:
    """``BENCH_CACHE_DIR`` if set, else ``~/.cache/bench``."""
    return Path(os.environ.get("BENCH_CACHE_DIR", Path.home() / ".cache" / "bench"))


@contextmanager
def cache_lock(path: Path) -> Iterator[None]:
    """Hold ``<path>.lock`` while filling one cache entry, so that parallel runs (``bench sweep
    --jobs``, two terminals) wait for the entry instead of computing it twice and racing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        yield
