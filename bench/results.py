"""The results store: one JSON per run beside an ``.npz`` of its raw predictions.

Layout: ``<root>/runs/<task>/<label>/seed<S>.json`` and ``seed<S>.npz``. The npz is written
first and the JSON last, both atomically (temp file + rename), so a JSON on disk always has its
predictions beside it and an interrupted run leaves nothing half-written.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.errors import BenchError
from bench.types import Prediction

SCHEMA_VERSION = 1


def run_paths(root: Path, task: str, label: str, seed: int) -> tuple[Path, Path]:
    directory = root / "runs" / task / label
    return directory / f"seed{seed}.json", directory / f"seed{seed}.npz"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def pack_predictions(
    test: Prediction,
    test_labels: torch.Tensor,
    ood: dict[str, Prediction],
    shift: dict[str, tuple[Prediction, torch.Tensor]],
) -> dict[str, np.ndarray]:
    """Flatten predictions into named arrays: ``test/probs``, ``ood/<set>/score/<name>``..."""
    arrays: dict[str, np.ndarray] = {
        "test/probs": test.probs.float().numpy(),
        "test/labels": test_labels.numpy(),
    }
    for name, score in test.scores.items():
        arrays[f"test/score/{name}"] = score.double().numpy()
    for set_name, pred in ood.items():
        arrays[f"ood/{set_name}/probs"] = pred.probs.float().numpy()
        for name, score in pred.scores.items():
            arrays[f"ood/{set_name}/score/{name}"] = score.double().numpy()
    for set_name, (pred, labels) in shift.items():
        arrays[f"shift/{set_name}/probs"] = pred.probs.float().numpy()
        arrays[f"shift/{set_name}/labels"] = labels.numpy()
    return arrays


def unpack_predictions(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """Inverse of :func:`pack_predictions`, as the arguments of ``bench.metrics.evaluate``."""

    def scores(prefix: str) -> dict[str, torch.Tensor]:
        return {
            k[len(prefix) :]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith(prefix)
        }

    ood_sets = sorted({k.split("/")[1] for k in arrays if k.startswith("ood/")})
    shift_sets = sorted({k.split("/")[1] for k in arrays if k.startswith("shift/")})
    return {
        "test_probs": torch.from_numpy(arrays["test/probs"]),
        "test_labels": torch.from_numpy(arrays["test/labels"]),
        "test_scores": scores("test/score/"),
        "ood": {
            s: (torch.from_numpy(arrays[f"ood/{s}/probs"]), scores(f"ood/{s}/score/")) for s in ood_sets
        },
        "shift": {
            s: (torch.from_numpy(arrays[f"shift/{s}/probs"]), torch.from_numpy(arrays[f"shift/{s}/labels"]))
            for s in shift_sets
        },
    }


def set_of(key: str) -> str:
    """The evaluation set an array belongs to: ``test``, ``ood/<set>`` or ``shift/<set>``."""
    parts = key.split("/")
    return "test" if parts[0] == "test" else "/".join(parts[:2])


def restrict(arrays: dict[str, np.ndarray], indices: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The prediction arrays of a full-set run cut to another run's evaluated subset
    (``indices``: evaluation set → row indices, the ``index/<set>`` arrays of a capped run)."""
    out = {}
    for key, value in arrays.items():
        if key.startswith("index/"):
            continue
        idx = indices.get(set_of(key))
        if idx is not None and len(value) <= int(idx.max(initial=-1)):
            raise BenchError(f"cannot restrict {key}: the subset indexes past its {len(value)} rows")
        out[key] = value if idx is None else value[idx]
    return out


def subset_indices(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``{set: indices}`` from a capped run's ``index/<set>`` arrays (empty for full-set runs)."""
    return {k.removeprefix("index/"): v for k, v in arrays.items() if k.startswith("index/")}


def write_run(json_path: Path, npz_path: Path, record: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write_bytes(npz_path, buffer.getvalue())
    text = json.dumps(record, indent=2, sort_keys=True, default=_json_default) + "\n"
    atomic_write_bytes(json_path, text.encode())


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BenchError(f"result file {path} is unreadable ({exc}); delete it and rerun that run") from None


def read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise BenchError(f"predictions file {path} is unreadable ({exc}); delete the run and rerun it") from None


def iter_runs(root: Path) -> list[Path]:
    """All run JSON files under ``root/runs`` in a stable order."""
    return sorted((root / "runs").glob("*/*/seed*.json"))
