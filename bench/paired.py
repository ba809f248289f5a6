"""Paired bootstrap confidence intervals of the difference between two methods' metrics.

Two rows of the leaderboard are compared on the *same* inputs and seeds: each bootstrap
replicate resamples every evaluation set's inputs once, applies the same draw to both runs
(paired) in each seed, and averages the difference over seeds. Percentile intervals. Used for
every row against the MAP (a capped row against the MAP cut to its subset) and for the best
mean of a column against the runner-up. The draws depend only on the seed and the set, so a
run's metrics on them (``Replicates``) are computed once and serve every pair it is in.

Hand-written because no field library bootstraps a difference of two metrics on shared
resamples; the metrics are vectorised over replicates here (a loop over ``bench.metrics``
took minutes) and tests/test_paired.py checks that on the full sample they equal
``bench.metrics`` (torchmetrics' ECE, sklearn's AUROC) to round-off.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from bench.metrics.registry import SHIFT, TEST, SetMetric, auroc_key, harness_scores, set_metrics
from bench.prediction_arrays import PredictionArrays, ood_set, shift_set

N_BOOT = 1000
LEVEL = 0.95
BOOT_CHUNK = 50  # replicates drawn and evaluated at once (50 × the largest set's inputs)
BOOT_SEED = 20240601


@dataclass(frozen=True)
class Interval:
    """Mean difference (first − second) over seeds and its bootstrap interval."""

    diff: float
    low: float
    high: float

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


class _Labelled:
    """Per-input terms of every compared metric on one labelled set (test or a shift set)."""

    def __init__(self, probs: np.ndarray, labels: np.ndarray, metrics: list[SetMetric]) -> None:
        probs = probs.astype(np.float64)
        self.n = len(labels)
        self.terms = {m.name: m.terms(probs, labels) for m in metrics}

    def metric(self, metric: SetMetric, counts: np.ndarray) -> np.ndarray:
        """The metric on each resample, given as (replicates, inputs) multiplicities."""
        return metric.from_sums(counts @ self.terms[metric.name], counts[0].sum())


def _scores(predictions: PredictionArrays, where: str) -> dict[str, np.ndarray]:
    probs = torch.from_numpy(predictions.probs(where)).double()
    out = {name: score.numpy() for name, score in harness_scores(probs).items()}
    out.update({name: v.astype(np.float64) for name, v in predictions.scores(where).items()})
    return out


def _compared(on: str) -> list[SetMetric]:
    """The metrics a comparison covers on a set: those the leaderboard shows there."""
    return [m for m in set_metrics() if on in m.shown_on]


class _Run:
    """Every compared metric of ``bench.metrics.evaluate`` as a statistic of resampled inputs."""

    def __init__(self, predictions: PredictionArrays) -> None:
        self.sets = {"test": _Labelled(predictions.probs("test"), predictions.labels("test"), _compared(TEST))}
        self.sets.update({shift_set(name): _Labelled(predictions.probs(shift_set(name)),
                                                     predictions.labels(shift_set(name)), _compared(SHIFT))
                          for name in predictions.shift_names()})
        self.scores = {where: _scores(predictions, where)
                       for where in ["test", *map(ood_set, predictions.ood_names())]}
        self.sizes = {name: s.n for name, s in self.sets.items()}
        self.sizes.update({name: len(s["entropy"]) for name, s in self.scores.items() if name != "test"})
        self._ranks: dict[tuple[str, str], _Ranks] = {}
        self._by_key: dict[str, tuple[str, SetMetric]] = {m.test_key: ("test", m) for m in _compared(TEST)}
        self._by_key.update({m.shift_key(name): (shift_set(name), m) for name in predictions.shift_names()
                             for m in _compared(SHIFT)})
        self._auroc: dict[str, tuple[str, str]] = {
            auroc_key(name, score): (ood_set(name), score) for name in predictions.ood_names()
            for score in self.scores[ood_set(name)] if score in self.scores["test"]}

    def keys(self) -> list[str]:
        return [*self._by_key, *self._auroc]

    def metrics(self, keys: list[str], counts: dict[str, np.ndarray]) -> np.ndarray:
        """(replicates, keys): the metrics on each resample (``counts[set]``: replicates × inputs)."""
        out = []
        for key in keys:
            if key in self._by_key:
                name, metric = self._by_key[key]
                out.append(self.sets[name].metric(metric, counts[name]))
            else:
                name, score = self._auroc[key]
                if (name, score) not in self._ranks:
                    self._ranks[(name, score)] = _Ranks(self.scores["test"][score], self.scores[name][score])
                out.append(self._ranks[(name, score)].auroc(counts["test"], counts[name]))
        return np.stack(out, 1)


class _Ranks:
    """Where each OOD input's score falls among the in-distribution scores, sorted once; the
    AUROC of any resample is then read from cumulative counts (no sort per replicate)."""

    def __init__(self, score_in: np.ndarray, score_out: np.ndarray) -> None:
        self.order = np.argsort(score_in, kind="stable")
        ranked = score_in[self.order]
        self.below = np.searchsorted(ranked, score_out, side="left")
        self.not_above = np.searchsorted(ranked, score_out, side="right")

    def auroc(self, w_in: np.ndarray, w_out: np.ndarray) -> np.ndarray:
        """Mann–Whitney AUROC of each resample (OOD positive, ties count one half), as sklearn's,
        from multiplicities: an OOD input's count of in-distribution inputs below it is a
        cumulative sum of the resample's counts in sorted order."""
        cum = np.zeros((len(w_in), len(self.order) + 1))
        np.cumsum(w_in[:, self.order], axis=1, out=cum[:, 1:])
        below = cum[:, self.below]
        equal = cum[:, self.not_above] - below
        return ((below + 0.5 * equal) * w_out).sum(1) / (w_in[0].sum() * w_out[0].sum())


def _counts(rng: np.random.Generator, replicates: int, n: int) -> np.ndarray:
    """Multiplicities of ``replicates`` bootstrap resamples of n inputs: (replicates, n)."""
    draws = rng.integers(0, n, (replicates, n)) + n * np.arange(replicates)[:, None]
    return np.bincount(draws.ravel(), minlength=replicates * n).reshape(replicates, n).astype(np.float64)


def _draws(seed: int, name: str, n: int, n_boot: int) -> Iterator[np.ndarray]:
    """The resamples of one evaluation set of one seed, BOOT_CHUNK replicates at a time. They
    depend only on the seed and the set's name and size, so every run on those inputs gets the
    same ones: the pairing is by construction, and each run's replicates are computed once."""
    rng = np.random.default_rng([BOOT_SEED, seed, zlib.crc32(name.encode()), n])
    for start in range(0, n_boot, BOOT_CHUNK):
        yield _counts(rng, min(BOOT_CHUNK, n_boot - start), n)


@dataclass(frozen=True)
class Replicates:
    """One run's metrics on its full sample (``point``) and on each of the seed's shared
    bootstrap resamples (``boot``: replicates × keys)."""

    keys: tuple[str, ...]
    point: np.ndarray
    boot: np.ndarray
    sizes: tuple[tuple[str, int], ...]


def replicates(predictions: PredictionArrays, seed: int, n_boot: int = N_BOOT) -> Replicates:
    """Every metric of one run's predictions on the full sample and on the resamples of ``seed``."""
    run = _Run(predictions)
    keys = run.keys()
    point = run.metrics(keys, {s: np.ones((1, n)) for s, n in run.sizes.items()})[0]
    streams = {s: _draws(seed, s, n, n_boot) for s, n in run.sizes.items()}
    chunks = [run.metrics(keys, {s: next(stream) for s, stream in streams.items()})
              for _ in range(0, n_boot, BOOT_CHUNK)]
    return Replicates(tuple(keys), point, np.concatenate(chunks), tuple(sorted(run.sizes.items())))


def intervals(pairs: list[tuple[Replicates, Replicates]]) -> dict[str, Interval]:
    """First − second for every key both runs of every pair have, averaged over the pairs (one
    per seed, each pair's runs on the same inputs and resamples), with percentile intervals."""
    for a, b in pairs:
        if a.sizes != b.sizes or len(a.boot) != len(b.boot):
            raise ValueError(f"paired runs must cover the same inputs; got sets of sizes {dict(a.sizes)} and "
                             f"{dict(b.sizes)}")
    keys = [k for k in pairs[0][0].keys if all(k in a.keys and k in b.keys for a, b in pairs)]

    def columns(r: Replicates) -> list[int]:
        return [r.keys.index(k) for k in keys]

    point = np.mean([a.point[columns(a)] - b.point[columns(b)] for a, b in pairs], 0)
    reps = np.mean([a.boot[:, columns(a)] - b.boot[:, columns(b)] for a, b in pairs], 0)
    tail = (1 - LEVEL) / 2 * 100
    low, high = np.percentile(reps, [tail, 100 - tail], axis=0)
    return {k: Interval(float(point[i]), float(low[i]), float(high[i])) for i, k in enumerate(keys)}


def compared_keys(predictions: PredictionArrays) -> list[str]:
    """The metric keys a paired comparison covers (those of ``bench.metrics.evaluate`` but MCE)."""
    return _Run(predictions).keys()


def paired_intervals(
    pairs: list[tuple[PredictionArrays, PredictionArrays]], n_boot: int = N_BOOT
) -> dict[str, Interval]:
    """First − second for every key both runs have; ``pairs`` holds the two runs' prediction
    arrays on the same inputs (a capped run and the reference cut to its subset), one pair per
    seed (seeds 0, 1, ... in order)."""
    return intervals([(replicates(a, seed, n_boot), replicates(b, seed, n_boot))
                      for seed, (a, b) in enumerate(pairs)])
