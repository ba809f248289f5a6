"""Paired bootstrap confidence intervals of the difference between two methods' metrics.

Two rows of the leaderboard are compared on the *same* inputs and seeds: each bootstrap
replicate resamples every evaluation set's inputs once, applies the same draw to both runs
(paired) in each seed, and averages the difference over seeds. Percentile intervals. Used for
every row against the MAP (a capped row against the MAP cut to its subset) and for the best
mean of a column against the runner-up.

Hand-written because no field library bootstraps a difference of two metrics on shared
resamples; the metrics are vectorised over replicates here (a loop over ``bench.metrics``
took minutes) and tests/test_paired.py checks that on the full sample they equal
``bench.metrics`` (torchmetrics' ECE, sklearn's AUROC) to round-off.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bench.formulas import nll_per_input
from bench.metrics.calibration import N_BINS
from bench.metrics.scores import max_prob_score, predictive_entropy

N_BOOT = 1000
LEVEL = 0.95
CHUNK_VALUES = 2**21  # replicates × inputs evaluated at once


@dataclass(frozen=True)
class Interval:
    """Mean difference (first − second) over seeds and its bootstrap interval."""

    diff: float
    low: float
    high: float

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


class _Labelled:
    """Per-input quantities of one labelled set (test or a shift set)."""

    def __init__(self, probs: np.ndarray, labels: np.ndarray) -> None:
        p, y = torch.from_numpy(probs).double(), torch.from_numpy(labels)
        self.nll = nll_per_input(p, y).numpy()
        self.brier = ((p - torch.nn.functional.one_hot(y.long(), p.shape[1])) ** 2).sum(1).numpy()
        conf = np.minimum(p.max(1).values.numpy(), np.nextafter(1.0, 0.0))  # as bench.metrics.calibration
        self.correct = (p.argmax(1) == y).double().numpy()
        self.gap = self.correct - conf
        edges = torch.linspace(0, 1, N_BINS + 1, dtype=torch.float64).numpy()  # torchmetrics' bin edges
        self.bin = np.searchsorted(edges, conf, side="right") - 1

    def metric(self, name: str, counts: np.ndarray) -> np.ndarray:
        """The metric on each resample, given as (replicates, inputs) multiplicities."""
        n = counts[0].sum()
        if name == "ece":
            in_bin = np.zeros((len(self.gap), N_BINS))
            in_bin[np.arange(len(self.gap)), self.bin] = self.gap
            return np.abs(counts @ in_bin).sum(1) / n
        return counts @ {"acc": self.correct, "nll": self.nll, "brier": self.brier}[name] / n


def _scores(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    probs = torch.from_numpy(arrays[f"{prefix}/probs"]).double()
    out = {"msp": max_prob_score(probs).numpy(), "entropy": predictive_entropy(probs).numpy()}
    out.update({k.removeprefix(f"{prefix}/score/"): v.astype(np.float64) for k, v in arrays.items()
                if k.startswith(f"{prefix}/score/")})
    return out


class _Run:
    """Every metric of ``bench.metrics.evaluate`` as a statistic of resampled inputs."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.sets = {"test": _Labelled(arrays["test/probs"], arrays["test/labels"])}
        for key in arrays:
            if key.startswith("shift/") and key.endswith("/probs"):
                name = key.removesuffix("/probs")
                self.sets[name] = _Labelled(arrays[key], arrays[f"{name}/labels"])
        self.scores = {"test": _scores(arrays, "test")}
        self.scores.update({k.removesuffix("/probs"): _scores(arrays, k.removesuffix("/probs"))
                            for k in arrays if k.startswith("ood/") and k.endswith("/probs")})
        self.sizes = {name: len(s.nll) for name, s in self.sets.items()}
        self.sizes.update({name: len(s["entropy"]) for name, s in self.scores.items() if name != "test"})

    def keys(self) -> list[str]:
        out = [f"cls/{m}" for m in ("acc", "nll", "brier")] + ["cal/ece"]
        out += [f"{name}/{m}" for name in self.sets if name != "test" for m in ("acc", "nll", "ece")]
        out += [f"{name}/auroc/{score}" for name in self.scores if name != "test"
                for score in self.scores[name] if score in self.scores["test"]]
        return out

    def metrics(self, keys: list[str], counts: dict[str, np.ndarray]) -> np.ndarray:
        """(replicates, keys): the metrics on each resample (``counts[set]``: replicates × inputs)."""
        out = []
        for key in keys:
            parts = key.split("/")
            if parts[0] in ("cls", "cal"):
                out.append(self.sets["test"].metric(parts[1], counts["test"]))
            elif parts[0] == "shift":
                name = "/".join(parts[:2])
                out.append(self.sets[name].metric(parts[2], counts[name]))
            else:
                name, score = "/".join(parts[:2]), parts[3]
                out.append(_auroc(self.scores["test"][score], self.scores[name][score], counts["test"], counts[name]))
        return np.stack(out, 1)


def _auroc(score_in: np.ndarray, score_out: np.ndarray, w_in: np.ndarray, w_out: np.ndarray) -> np.ndarray:
    """Mann–Whitney AUROC of each resample (OOD positive, ties count one half), as sklearn's,
    from multiplicities: an OOD input's count of in-distribution inputs below it is a
    cumulative sum of the resample's counts in sorted order (no sort per replicate)."""
    order = np.argsort(score_in, kind="stable")
    ranked = score_in[order]
    cum = np.concatenate([np.zeros((len(w_in), 1)), np.cumsum(w_in[:, order], axis=1)], axis=1)
    below = cum[:, np.searchsorted(ranked, score_out, side="left")]
    equal = cum[:, np.searchsorted(ranked, score_out, side="right")] - below
    return ((below + 0.5 * equal) * w_out).sum(1) / (w_in[0].sum() * w_out[0].sum())


def _counts(rng: np.random.Generator, replicates: int, n: int) -> np.ndarray:
    """Multiplicities of ``replicates`` bootstrap resamples of n inputs: (replicates, n)."""
    draws = rng.integers(0, n, (replicates, n)) + n * np.arange(replicates)[:, None]
    return np.bincount(draws.ravel(), minlength=replicates * n).reshape(replicates, n).astype(np.float64)


def compared_keys(arrays: dict[str, np.ndarray]) -> list[str]:
    """The metric keys a paired comparison covers (those of ``bench.metrics.evaluate`` but MCE)."""
    return _Run(arrays).keys()


def paired_intervals(
    pairs: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]],
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> dict[str, Interval]:
    """First − second for every key both runs have; ``pairs`` holds the two runs' prediction
    arrays on the same inputs (a capped run and the reference cut to its subset), one pair per seed."""
    runs = [(_Run(a), _Run(b)) for a, b in pairs]
    keys = [k for k in runs[0][0].keys() if all(k in a.keys() and k in b.keys() for a, b in runs)]
    for a, b in runs:
        if a.sizes != b.sizes:
            raise ValueError(f"paired runs must cover the same inputs; got sets of sizes {a.sizes} and {b.sizes}")
    full = [{s: np.ones((1, n)) for s, n in a.sizes.items()} for a, _ in runs]
    point = np.mean([a.metrics(keys, d)[0] - b.metrics(keys, d)[0] for (a, b), d in zip(runs, full, strict=True)], 0)
    rng = np.random.default_rng(seed)
    chunk = max(1, CHUNK_VALUES // max(sum(a.sizes.values()) for a, _ in runs))
    reps = []
    for start in range(0, n_boot, chunk):
        k = min(chunk, n_boot - start)
        diffs = []
        for a, b in runs:
            draw = {s: _counts(rng, k, n) for s, n in a.sizes.items()}
            diffs.append(a.metrics(keys, draw) - b.metrics(keys, draw))
        reps.append(np.mean(diffs, 0))
    tail = (1 - LEVEL) / 2 * 100
    low, high = np.percentile(np.concatenate(reps), [tail, 100 - tail], axis=0)
    return {k: Interval(float(point[i]), float(low[i]), float(high[i])) for i, k in enumerate(keys)}
