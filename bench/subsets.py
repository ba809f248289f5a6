"""Which inputs a capped method evaluates: a subset drawn per seed, stratified by label.

A method that refits per input (``eval_limit``) cannot see a whole evaluation set. One fixed
subset for every seed makes every seed's claim rest on the same (possibly easy) inputs, so each
seed draws its own; where labels exist the draw keeps each class's share of the set (largest
remainders), so a subset of an imbalanced set is not accidentally easier or harder by class mix.
"""

from __future__ import annotations

import numpy as np
import torch

from bench.seeding import derive_seed


def draw_subset(size: int, limit: int, seed: int, name: str, labels: torch.Tensor | None = None) -> np.ndarray:
    """Sorted indices of ``min(limit, size)`` inputs of a set of ``size``, fixed by (seed, name)."""
    rng = np.random.default_rng(derive_seed(seed, "eval-subset", name))
    if limit >= size:
        return np.arange(size)
    if labels is None:
        return np.sort(rng.permutation(size)[:limit])
    y = labels.cpu().numpy().reshape(-1)
    classes, counts = np.unique(y, return_counts=True)
    exact = counts * limit / size
    take = np.floor(exact).astype(int)
    short = limit - int(take.sum())
    if short:  # largest remainders first; ties broken by the seeded generator, not class order
        order = np.lexsort((rng.random(len(classes)), -(exact - take)))
        take[order[:short]] += 1
    picks = [rng.permutation(np.flatnonzero(y == c))[:k] for c, k in zip(classes, take, strict=True)]
    return np.sort(np.concatenate(picks))
