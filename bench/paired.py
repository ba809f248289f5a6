"""Paired bootstrap confidence intervals of a capped method's difference from the MAP.

A capped method (per-input refits) sees a few hundred inputs per set, where ECE is partly
binning noise and an AUROC moves by several points between draws. Its difference from the
MAP on the *same* inputs is what can carry a claim: each bootstrap replicate resamples every
evaluation set's inputs once and applies the same draw to both methods (paired), per seed; the
replicate's difference is the mean over seeds. Percentile intervals.

Hand-written because no field library bootstraps a difference of two metrics on shared
resamples; the metrics are vectorised over replicates here (a loop over ``bench.metrics``
took minutes) and tests/test_paired.py checks that on the full sample they equal
``bench.metrics`` (torchmetrics' ECE, sklearn's AUROC) to round-off.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import rankdata

from bench.formulas import entropy, nll_per_input
from bench.metrics.calibration import N_BINS

N_BOOT = 1000
LEVEL = 0.95
CHUNK = 200  # replicates evaluated at once


@dataclass(frozen=True)
class Interval:
    """Mean difference (method − reference) over seeds and its bootstrap interval."""

    diff: float
    low: float
    high: float

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def compared_keys(arrays: dict[str, np.ndarray]) -> list[str]:
    """The metric keys compared: test NLL and ECE, and each OOD set's entropy AUROC."""
    ood = sorted({k.split("/")[1] for k in arrays if k.startswith("ood/")})
    return ["cls/nll", "cal/ece", *[f"ood/{s}/auroc/entropy" for s in ood]]


class _Run:
    """Per-input quantities of one run from which every compared metric is a resample statistic."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        probs, labels = torch.from_numpy(arrays["test/probs"]).double(), torch.from_numpy(arrays["test/labels"])
        self.nll = nll_per_input(probs, labels).numpy()
        below_one = np.nextafter(1.0, 0.0)  # as bench.metrics.calibration: confidence 1 is in the last bin
        conf = np.minimum(probs.max(1).values.numpy(), below_one)
        self.conf, self.correct = conf, (probs.argmax(1) == labels).double().numpy()
        edges = torch.linspace(0, 1, N_BINS + 1, dtype=torch.float64).numpy()  # torchmetrics' bin edges
        self.bin = np.searchsorted(edges, conf, side="right") - 1
        self.entropy_in = entropy(probs).numpy()
        self.entropy_out = {k.split("/")[1]: entropy(torch.from_numpy(v)).numpy()
                            for k, v in arrays.items() if k.startswith("ood/") and k.endswith("/probs")}

    def metrics(self, keys: list[str], draw: dict[str, np.ndarray]) -> np.ndarray:
        """(replicates, keys): the metrics on each row of index draws (``draw[set]``: R × n)."""
        t = draw["test"]
        out = []
        for key in keys:
            if key == "cls/nll":
                out.append(self.nll[t].mean(1))
            elif key == "cal/ece":
                out.append(self._ece(t))
            else:
                name = key.split("/")[1]
                out.append(_auroc(self.entropy_in[t], self.entropy_out[name][draw[f"ood/{name}"]]))
        return np.stack(out, 1)

    def _ece(self, t: np.ndarray) -> np.ndarray:
        rows = np.repeat(np.arange(len(t)), t.shape[1])
        slot = rows * N_BINS + self.bin[t].ravel()
        gap = np.bincount(slot, (self.correct[t] - self.conf[t]).ravel(), len(t) * N_BINS)
        return np.abs(gap.reshape(len(t), N_BINS)).sum(1) / t.shape[1]


def _auroc(score_in: np.ndarray, score_out: np.ndarray) -> np.ndarray:
    """Mann–Whitney AUROC per row (OOD positive, ties count one half), as sklearn's."""
    n_in, n_out = score_in.shape[1], score_out.shape[1]
    ranks = rankdata(np.concatenate([score_in, score_out], 1), axis=1)
    return (ranks[:, n_in:].sum(1) - n_out * (n_out + 1) / 2) / (n_in * n_out)


def _sizes(arrays: dict[str, np.ndarray]) -> dict[str, int]:
    ood = {k.removesuffix("/probs"): len(v) for k, v in arrays.items() if k.startswith("ood/") and k.endswith("/probs")}
    return {"test": len(arrays["test/labels"]), **ood}


def paired_intervals(
    pairs: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]],
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> dict[str, Interval]:
    """Method − reference for each compared key; ``pairs`` holds (method, reference cut to the
    method's inputs) prediction arrays, one pair per seed."""
    keys = compared_keys(pairs[0][0])
    runs = [(_Run(m), _Run(r), _sizes(m)) for m, r in pairs]
    point = np.mean([m.metrics(keys, {s: np.arange(n)[None] for s, n in size.items()})[0]
                     - r.metrics(keys, {s: np.arange(n)[None] for s, n in size.items()})[0]
                     for m, r, size in runs], 0)
    rng = np.random.default_rng(seed)
    reps = []
    for start in range(0, n_boot, CHUNK):
        k = min(CHUNK, n_boot - start)
        diffs = []
        for m, r, size in runs:
            draw = {s: rng.integers(0, n, (k, n)) for s, n in size.items()}
            diffs.append(m.metrics(keys, draw) - r.metrics(keys, draw))
        reps.append(np.mean(diffs, 0))
    tail = (1 - LEVEL) / 2 * 100
    low, high = np.percentile(np.concatenate(reps), [tail, 100 - tail], axis=0)
    return {k: Interval(float(point[i]), float(low[i]), float(high[i])) for i, k in enumerate(keys)}
