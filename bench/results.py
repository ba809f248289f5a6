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
from bench.prediction_arrays import PredictionArrays
from bench.record import RunRecord, load_record


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


def write_run(json_path: Path, npz_path: Path, record: RunRecord, predictions: PredictionArrays) -> None:
    """Write a run's npz, then its JSON (with the npz's checksum); then drop a stale failure record."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **predictions.arrays)
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


def read_predictions(json_path: Path, record: RunRecord) -> PredictionArrays:
    """The npz beside a run's JSON, checked against its checksum and for consistent arrays."""
    npz_path = json_path.with_suffix(".npz")
    predictions = PredictionArrays(read_npz(npz_path, record.predictions_sha256))
    if problem := predictions.problem():
        raise BenchError(f"predictions file {npz_path} is damaged: {problem}; delete the run and rerun it")
    return predictions


_RUN_FILE = re.compile(r"seed\d+\.json")


def iter_runs(root: Path) -> list[Path]:
    """All run JSON files (``seed<S>.json``) under ``root/runs`` in a stable order."""
    return sorted(p for p in (root / "runs").glob("*/*/seed*.json") if _RUN_FILE.fullmatch(p.name))


def iter_failures(root: Path) -> list[Path]:
    """All failure records (``seed<S>.failed.json``) under ``root/runs``."""
    return sorted((root / "runs").glob("*/*/seed*.failed.json"))
