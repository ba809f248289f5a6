"""Seed every random number generator the benchmark touches."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from bench.errors import BenchError

MAX_SEED = 2**63 - 1  # torch and numpy take larger ones only partly (int64 state, seed % 2**32)


def check_seed(seed: int) -> int:
    """A run seed must be an integer in 0..2**63 - 1; anything else is a one-line error."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise BenchError(f"bad seed {seed!r}; use an integer from 0 to 2**63 - 1 ({MAX_SEED})")
    return seed


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch (all devices); return a CPU generator for data order."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return torch.Generator().manual_seed(seed)


def derive_seed(seed: int, *salt: str | int) -> int:
    """A stable seed for a sub-purpose (ensemble member, data split) from the run seed."""
    import hashlib

    digest = hashlib.sha256(repr((seed, *salt)).encode()).digest()
    return int.from_bytes(digest[:4], "little")
