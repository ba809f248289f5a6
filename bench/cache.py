"""The on-disk cache root for checkpoints, features and downloads."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``BENCH_CACHE_DIR`` if set, else ``~/.cache/bench``."""
    return Path(os.environ.get("BENCH_CACHE_DIR", Path.home() / ".cache" / "bench"))
