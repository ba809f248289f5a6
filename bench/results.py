"""The results store: one JSON per run beside an ``.npz`` of its raw predictions.

Layout: ``<root>/runs/<task>/<label>/seed<S>.json`` and ``seed<S>.npz``. The npz is written
first and the JSON last, both atomically (temp file + rename), so a JSON on disk always has its
predictions beside it and an interrupted run leaves nothing half-written. The JSON records the
npz's SHA-256, so a reader knows the two belong together. The npz holds exactly what the metrics
were computed from (float64 probabilities and scores), so the JSON's metrics recompute exactly.

A run that fails (in a sweep) is recorded in ``seed<S>.failed.json`` beside, never in
``seed<S>.json``: a failed rerun (``sweep --force``) keeps the earlier good result, and the next
successful run of it removes the failure record.

Schema versions (``bench.record``): 1 stored probabilities in float32 and no checksum; from 2 on
float64 and the checksum, so only those results can be checked against their JSON metrics.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.cache import cache_root
from bench.errors import BenchError
from bench.logit_gaussian import diagonal
from bench.record import RunRecord, load_record
from bench.types import Prediction
from bench.validation import arrays_problem

F16_MAX = 6.0e4  # below float16's largest finite value (65504)


def run_paths(root: Path, task: str, label: str, seed: int) -> tuple[Path, Path]:
    directory = root / "runs" / task / label
    return directory / f"seed{seed}.json", directory / f"seed{seed}.npz"


def failure_path(json_path: Path) -> Path:
    """Where a failed attempt at the run of ``json_path`` is recorded (``seed<S>.failed.json``)."""
    return json_path.with_name(f"{json_path.stem}.failed.json")


WRITABLE_HINT = "choose a writable directory (--out, --results)"


def _unwritable(path: Path, exc: OSError, hint: str = WRITABLE_HINT) -> BenchError:
    return BenchError(f"cannot write {path}: {exc.strerror or exc}; {hint}")


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()
"""What ``open`` would give a new file under this process's umask (read once, at import)."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file and a rename; an unwritable place is a BenchError."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, FILE_MODE)  # mkstemp makes 0600; results are for others to read too
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise _unwritable(path, exc, _hint_for(path)) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


CACHE_HINT = "free space in the cache, or point BENCH_CACHE_DIR at a writable disk with room"


def _hint_for(path: Path) -> str:
    """The fix for a failed write: the cache's (checkpoints, features) or the results'."""
    return CACHE_HINT if path.absolute().is_relative_to(cache_root().absolute()) else WRITABLE_HINT


def ensure_writable(directory: Path, hint: str = WRITABLE_HINT) -> None:
    """Prove that files can be written in ``directory`` (or, while it does not exist yet, in its
    nearest existing parent, where it would be created), before any compute is spent. Creates
    nothing: a run that fails later leaves no empty folder behind."""
    probe = directory.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise NotADirectoryError(20, "Not a directory", str(probe))
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise _unwritable(directory, exc, hint) from None


def pack_predictions(
    test: Prediction,
    test_labels: torch.Tensor,
    ood: dict[str, Prediction],
    shift: dict[str, tuple[Prediction, torch.Tensor]],
    val: tuple[Prediction, torch.Tensor] | None = None,
) -> dict[str, np.ndarray]:
    """Flatten predictions into named arrays: ``test/probs``, ``ood/<set>/score/<name>``, and
    for a method with a logit Gaussian ``<set>/logit_mean``, ``<set>/logit_var`` and ``val/...``.

    Everything in float64, as the metrics compute it, so the JSON's metrics recompute exactly."""
    arrays: dict[str, np.ndarray] = {
        "test/probs": test.probs.double().numpy(),
        "test/labels": test_labels.numpy(),
    }
    for name, score in test.scores.items():
        arrays[f"test/score/{name}"] = score.double().numpy()
    for set_name, pred in ood.items():
        arrays[f"ood/{set_name}/probs"] = pred.probs.double().numpy()
        for name, score in pred.scores.items():
            arrays[f"ood/{set_name}/score/{name}"] = score.double().numpy()
    for set_name, (pred, labels) in shift.items():
        arrays[f"shift/{set_name}/probs"] = pred.probs.double().numpy()
        arrays[f"shift/{set_name}/labels"] = labels.numpy()
    sets = {"test": test, **{f"ood/{k}": v for k, v in ood.items()}, **{f"shift/{k}": v for k, (v, _) in shift.items()}}
    if val is not None:
        sets["val"] = val[0]
        arrays["val/labels"] = val[1].numpy()
    for prefix, pred in sets.items():
        arrays.update(pack_gaussian(prefix, pred))
    return arrays


def pack_gaussian(prefix: str, pred: Prediction) -> dict[str, np.ndarray]:
    """A set's logit Gaussian as the table needs it (mean and per-logit variances), in float16:
    the derived rows are computed from exactly these stored values (so they recompute exactly),
    and half precision keeps a Fashion-MNIST run's file at 2.0 MB instead of 2.9 (NLL moves by
    2e-6, ECE by 1e-4 against float32; committed results must also travel to a GPU machine in
    64 MiB). Values beyond float16's range stay float32."""
    if not pred.has_gaussian:
        return {}
    out = {f"{prefix}/logit_mean": pred.logit_mean.numpy(), f"{prefix}/logit_var": diagonal(pred.logit_cov).numpy()}
    return {k: v.astype(np.float16 if np.abs(v).max(initial=0.0) < F16_MAX else np.float32) for k, v in out.items()}


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


def write_run(json_path: Path, npz_path: Path, record: RunRecord, arrays: dict[str, np.ndarray]) -> None:
    """Write a run's npz, then its JSON (with the npz's checksum); then drop a stale failure record."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    data = buffer.getvalue()
    record.predictions_sha256 = hashlib.sha256(data).hexdigest()
    text = dumps_json(record.to_json())
    atomic_write_bytes(npz_path, data)
    atomic_write_bytes(json_path, text.encode())
    failure_path(json_path).unlink(missing_ok=True)


def write_failure(json_path: Path, record: RunRecord) -> Path:
    """Record a failed attempt beside the run's files, leaving any earlier good result in place."""
    path = failure_path(json_path)
    atomic_write_bytes(path, dumps_json(record.to_json()).encode())
    return path


def dumps_json(record: dict[str, Any]) -> str:
    """Strict JSON: tensors and numpy numbers as plain values, NaN and inf as ``null`` (JSON has
    no NaN; Python would write bare ``NaN`` tokens that other readers reject)."""
    loose = json.dumps(record, default=_json_default)
    strict = json.loads(loose, parse_constant=lambda _: None)
    return json.dumps(strict, indent=2, sort_keys=True, allow_nan=False) + "\n"


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BenchError(f"result file {path} is unreadable ({exc}); delete it and rerun that run") from None


def read_record(path: Path) -> RunRecord:
    """A run's JSON as a (migrated) :class:`RunRecord` (else a BenchError naming the file)."""
    return load_record(read_json(path), str(path))


def intact_record(json_path: Path) -> RunRecord | None:
    """A run's record, or None when its JSON is damaged (the caller lists it and goes on)."""
    try:
        return read_record(json_path)
    except BenchError:
        return None


def intact_pair(json_path: Path, npz_path: Path) -> RunRecord | None:
    """The run's record when its JSON reads and its npz is the one the JSON was written with
    (same SHA-256); None when either is missing, damaged or they do not belong together."""
    try:
        record = read_record(json_path)
        if record.checkable and hashlib.sha256(npz_path.read_bytes()).hexdigest() != record.predictions_sha256:
            return None
    except (BenchError, OSError):
        return None
    return record


def read_npz(path: Path, sha256: str | None = None) -> dict[str, np.ndarray]:
    """A run's prediction arrays; with ``sha256``, refused unless the file has that checksum."""
    try:
        data = path.read_bytes()
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise BenchError(f"predictions file {path} does not belong to its JSON (checksum differs); "
                             "delete the run and rerun it")
        with np.load(io.BytesIO(data)) as npz:
            return {k: npz[k] for k in npz.files}
    except BenchError:
        raise
    except Exception as exc:  # noqa: BLE001 - zip, zlib, pickle, EOF errors: all mean "damaged"
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        raise BenchError(f"predictions file {path} is unreadable ({reason}); delete the run and rerun it") from None


def read_predictions(json_path: Path, record: RunRecord) -> dict[str, np.ndarray]:
    """The npz beside a run's JSON, checked against its checksum and for consistent arrays."""
    npz_path = json_path.with_suffix(".npz")
    arrays = read_npz(npz_path, record.predictions_sha256)
    if problem := arrays_problem(arrays):
        raise BenchError(f"predictions file {npz_path} is damaged: {problem}; delete the run and rerun it")
    return arrays


_RUN_FILE = re.compile(r"seed\d+\.json")


def iter_runs(root: Path) -> list[Path]:
    """All run JSON files (``seed<S>.json``) under ``root/runs`` in a stable order."""
    return sorted(p for p in (root / "runs").glob("*/*/seed*.json") if _RUN_FILE.fullmatch(p.name))


def iter_failures(root: Path) -> list[Path]:
    """All failure records (``seed<S>.failed.json``) under ``root/runs``."""
    return sorted((root / "runs").glob("*/*/seed*.failed.json"))
