"""A run's raw predictions as stored in its npz; the only code that knows how they are named.

An evaluation set is ``test``, ``ood/<name>`` or ``shift/<name>``; ``val`` holds the validation
inputs a method with a logit Gaussian is tuned on. Per set the npz holds ``<set>/probs``,
``<set>/labels`` (test, shift and val), ``<set>/score/<score>`` (the method's own scores),
``<set>/logit_mean`` and ``<set>/logit_var`` (a method with a logit Gaussian), and for a capped
run ``index/<set>``, the rows of the full set it was evaluated on. Probabilities, labels and
scores are what the metrics were computed from (float64), so the JSON's metrics recompute exactly.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bench.errors import BenchError
from bench.logit_gaussian import diagonal
from bench.types import Prediction
from bench.validation import labels_problem, probs_problem, score_problem

TEST, VAL = "test", "val"
F16_MAX = 6.0e4  # below float16's largest finite value (65504)

_GAUSSIAN_KEY = re.compile(r"^(test|val|ood/[^/]+|shift/[^/]+)/logit_(mean|var)$")
_KEY = re.compile(r"^(test|ood/[^/]+|shift/[^/]+)/(probs|labels|score/[^/]+|logit_mean|logit_var)$"
                  r"|^val/(labels|logit_mean|logit_var)$|^index/(test|val|(ood|shift)/[^/]+)$")


def ood_set(name: str) -> str:
    return f"ood/{name}"


def shift_set(name: str) -> str:
    return f"shift/{name}"


def _set_of(key: str) -> str:
    """The set an array belongs to: ``test``, ``val``, ``ood/<set>`` or ``shift/<set>``."""
    parts = key.removeprefix("index/").split("/")
    return "/".join(parts[:2]) if parts[0] in ("ood", "shift") else parts[0]


def _float64(tensor: torch.Tensor) -> np.ndarray:
    return tensor.double().numpy()


def _gaussian_arrays(where: str, pred: Prediction) -> dict[str, np.ndarray]:
    """A set's logit Gaussian as the derived rows need it (mean and per-logit variances), in
    float16: the derived rows are computed from exactly these stored values (so they recompute
    exactly), and half precision keeps a Fashion-MNIST run's file at 2.0 MB instead of 2.9 (NLL
    moves by 2e-6, ECE by 1e-4 against float32; committed results must also travel to a GPU
    machine in 64 MiB). Values beyond float16's range stay float32."""
    if not pred.has_gaussian:
        return {}
    out = {f"{where}/logit_mean": pred.logit_mean.numpy(), f"{where}/logit_var": diagonal(pred.logit_cov).numpy()}
    return {k: v.astype(np.float16 if np.abs(v).max(initial=0.0) < F16_MAX else np.float32) for k, v in out.items()}


@dataclass(frozen=True)
class PredictionArrays:
    """A run's prediction arrays, keyed as in its npz (``arrays`` is what ``np.savez`` writes)."""

    arrays: dict[str, np.ndarray]

    @classmethod
    def pack(
        cls,
        test: Prediction,
        test_labels: torch.Tensor,
        ood: dict[str, Prediction],
        shift: dict[str, tuple[Prediction, torch.Tensor]],
        val: tuple[Prediction, torch.Tensor] | None = None,
        indices: dict[str, np.ndarray] | None = None,
    ) -> PredictionArrays:
        """A run's predictions of every set (``indices``: set → rows of a capped run's subset)."""
        arrays = {f"{TEST}/probs": _float64(test.probs), f"{TEST}/labels": test_labels.numpy()}
        arrays.update({f"{TEST}/score/{name}": _float64(s) for name, s in test.scores.items()})
        for name, pred in ood.items():
            arrays[f"{ood_set(name)}/probs"] = _float64(pred.probs)
            arrays.update({f"{ood_set(name)}/score/{k}": _float64(s) for k, s in pred.scores.items()})
        for name, (pred, labels) in shift.items():
            arrays[f"{shift_set(name)}/probs"] = _float64(pred.probs)
            arrays[f"{shift_set(name)}/labels"] = labels.numpy()
        sets = {TEST: test, **{ood_set(k): v for k, v in ood.items()},
                **{shift_set(k): v for k, (v, _) in shift.items()}}
        if val is not None:
            sets[VAL] = val[0]
            arrays[f"{VAL}/labels"] = val[1].numpy()
        for where, pred in sets.items():
            arrays.update(_gaussian_arrays(where, pred))
        arrays.update({f"index/{where}": idx for where, idx in (indices or {}).items()})
        return cls(arrays)

    # -- what the sets are -------------------------------------------------------------------

    def sets(self) -> list[str]:
        """The evaluation sets with predictions: test, then the OOD and shift sets in name order."""
        return [TEST, *map(ood_set, self.ood_names()), *map(shift_set, self.shift_names())]

    def ood_names(self) -> list[str]:
        return self._names("ood")

    def shift_names(self) -> list[str]:
        return self._names("shift")

    def _names(self, kind: str) -> list[str]:
        return sorted({k.split("/")[1] for k in self.arrays if k.startswith(f"{kind}/") and k.endswith("/probs")})

    def has(self, where: str) -> bool:
        return f"{where}/probs" in self.arrays

    # -- one set's arrays --------------------------------------------------------------------

    def probs(self, where: str) -> np.ndarray:
        return self.arrays[f"{where}/probs"]

    def labels(self, where: str) -> np.ndarray:
        return self.arrays[f"{where}/labels"]

    def scores(self, where: str) -> dict[str, np.ndarray]:
        """The method's own scores of a set (the harness's are computed from its probabilities)."""
        prefix = f"{where}/score/"
        return {k.removeprefix(prefix): v for k, v in self.arrays.items() if k.startswith(prefix)}

    def gaussian(self, where: str) -> tuple[np.ndarray, np.ndarray]:
        """A set's stored logit Gaussian: mean and per-logit variances, N × C each."""
        return self.arrays[f"{where}/logit_mean"], self.arrays[f"{where}/logit_var"]

    @property
    def has_gaussian(self) -> bool:
        """Whether the run stored the logit Gaussians the derived rows are computed from."""
        return f"{TEST}/logit_mean" in self.arrays and f"{VAL}/logit_mean" in self.arrays

    def subset_indices(self) -> dict[str, np.ndarray]:
        """``{set: rows}`` of a capped run's subsets (empty for a run on the full sets)."""
        return {k.removeprefix("index/"): v for k, v in self.arrays.items() if k.startswith("index/")}

    def metric_inputs(self) -> dict[str, Any]:
        """The arguments of ``bench.metrics.evaluate``."""

        def tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
            return {k: torch.from_numpy(v) for k, v in arrays.items()}

        def tensor(key: str) -> torch.Tensor:
            return torch.from_numpy(self.arrays[key])

        return {
            "test_probs": tensor(f"{TEST}/probs"),
            "test_labels": tensor(f"{TEST}/labels"),
            "test_scores": tensors(self.scores(TEST)),
            "ood": {s: (tensor(f"{ood_set(s)}/probs"), tensors(self.scores(ood_set(s)))) for s in self.ood_names()},
            "shift": {s: (tensor(f"{shift_set(s)}/probs"), tensor(f"{shift_set(s)}/labels"))
                      for s in self.shift_names()},
        }

    # -- new arrays from these ---------------------------------------------------------------

    def restrict(self, indices: dict[str, np.ndarray]) -> PredictionArrays:
        """These arrays (a run on the full sets) cut to another run's evaluated subset
        (``indices``: set → rows, that run's :meth:`subset_indices`)."""
        out = {}
        for key, value in self.arrays.items():
            if key.startswith("index/"):
                continue
            idx = indices.get(_set_of(key))
            if idx is not None and len(value) <= int(idx.max(initial=-1)):
                raise BenchError(f"cannot restrict {key}: the subset indexes past its {len(value)} rows")
            out[key] = value if idx is None else value[idx]
        return PredictionArrays(out)

    def with_probs(self, probs_of: Callable[[str], np.ndarray], drop_scores: tuple[str, ...] = ()) -> PredictionArrays:
        """The evaluation arrays with every set's probabilities replaced by ``probs_of(set)``
        and the scores ``drop_scores`` left out; no logit Gaussians and no validation arrays
        (what a row derived from this run is evaluated on)."""
        out: dict[str, np.ndarray] = {}
        for key, value in self.arrays.items():
            if key.startswith(f"{VAL}/") or _GAUSSIAN_KEY.match(key):
                continue
            if any(key.endswith(f"/score/{name}") for name in drop_scores):
                continue
            out[key] = probs_of(key.removesuffix("/probs")) if key.endswith("/probs") else value
        return PredictionArrays(out)

    # -- validity ----------------------------------------------------------------------------

    def problem(self) -> str | None:
        """Why these arrays are not a self-consistent run's predictions, or None."""
        arrays = self.arrays
        if f"{TEST}/probs" not in arrays or f"{TEST}/labels" not in arrays:
            return "it lacks test/probs or test/labels"
        if unknown := [k for k in arrays if not _KEY.match(k)]:
            return f"it holds an unexpected array {unknown[0]!r}"
        classes = arrays[f"{TEST}/probs"].shape[-1] if arrays[f"{TEST}/probs"].ndim == 2 else 0
        if problem := self._gaussian_problem(classes):
            return problem
        named = {_set_of(k) for k in arrays} - {VAL}
        for where in sorted(named):
            if problem := self._set_problem(where, classes):
                return problem
        return None

    def _set_problem(self, where: str, classes: int) -> str | None:
        """Probabilities, labels, scores and subset rows of one set, consistent with each other."""
        arrays = self.arrays
        if f"{where}/probs" not in arrays:
            return f"it lacks {where}/probs"
        probs = arrays[f"{where}/probs"]
        n = len(probs)
        problem = probs_problem(probs, n, classes)
        if problem is None and (where == TEST or where.startswith("shift/")):
            if f"{where}/labels" not in arrays:
                return f"it lacks {where}/labels"
            problem = labels_problem(f"{where}/labels", arrays[f"{where}/labels"], n, classes)
        for name, score in self.scores(where).items():
            problem = problem or score_problem(f"{where}/score/{name}", score, n)
        index = arrays.get(f"index/{where}")
        if problem is None and index is not None and (index.shape != (n,) or index.dtype.kind not in "iu"):
            problem = f"index/{where} has shape {index.shape} and type {index.dtype}, expected {n} integers"
        return f"{where}: {problem}" if problem else None

    def _gaussian_problem(self, classes: int) -> str | None:
        """The logit Gaussians stored beside a set's probabilities (and for the validation set):
        mean and variance together, N × C like the set, finite, variances non-negative."""
        arrays = self.arrays
        sets = {m.group(1) for k in arrays if (m := _GAUSSIAN_KEY.match(k))}
        for where in sorted(sets):
            mean, var = arrays.get(f"{where}/logit_mean"), arrays.get(f"{where}/logit_var")
            if mean is None or var is None:
                return f"{where}: it has only one of logit_mean and logit_var"
            rows = len(arrays[f"{VAL}/labels"]) if where == VAL and f"{VAL}/labels" in arrays else len(
                arrays.get(f"{where}/probs", mean))
            if mean.shape != (rows, classes) or var.shape != (rows, classes):
                return f"{where}: logit_mean {mean.shape} and logit_var {var.shape} are not {rows} x {classes}"
            if not (np.isfinite(mean).all() and np.isfinite(var).all()) or (var < 0).any():
                return f"{where}: its logit Gaussian has NaN, inf or negative variances"
        if f"{VAL}/labels" in arrays and VAL not in sets:
            return "val: it has labels but no logit Gaussian"
        return None
