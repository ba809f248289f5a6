"""The results store: round trip, recomputation from raw predictions, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_record

from bench.errors import BenchError
from bench.metrics import evaluate
from bench.prediction_arrays import PredictionArrays
from bench.record import RunRecord, Status
from bench.results import (
    atomic_write_bytes,
    ensure_writable,
    failure_path,
    iter_failures,
    iter_runs,
    read_json,
    read_npz,
    read_predictions,
    read_record,
    write_failure,
    write_run,
)
from bench.types import Prediction


def _pred(n: int, seed: int) -> Prediction:
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(n, 3, generator=g, dtype=torch.float64), 1)
    return Prediction(probs, {"variance": torch.rand(n, generator=g, dtype=torch.float64)})


def _write(tmp_path: Path, name: str = "seed0", seed: int = 0) -> tuple[dict, PredictionArrays]:
    test = _pred(40, seed)
    labels = torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(seed + 1))
    ood = {"far": _pred(30, seed + 2)}
    shift = {"rot": (_pred(20, seed + 3), labels[:20])}
    metrics = evaluate(test.probs, labels, test.scores, ood={"far": (ood["far"].probs, ood["far"].scores)},
                       shift={"rot": (shift["rot"][0].probs, labels[:20])})
    arrays = PredictionArrays.pack(test, labels, ood, shift)
    record = make_record()
    record.metrics = metrics
    write_run(tmp_path / f"{name}.json", tmp_path / f"{name}.npz", record, arrays)
    return metrics, arrays


def test_metrics_recompute_exactly_from_the_npz(tmp_path: Path) -> None:
    """float64 in, float64 stored: the JSON's metrics come back bit for bit (float32 storage
    changed msp AUROCs by up to 6.5e-5)."""
    metrics, _ = _write(tmp_path)
    record = read_record(tmp_path / "seed0.json")
    args = read_predictions(tmp_path / "seed0.json", record).metric_inputs()
    assert args["test_probs"].dtype == torch.float64
    assert evaluate(**args) == metrics == record.metrics


def test_an_npz_that_is_not_its_jsons_is_refused(tmp_path: Path) -> None:
    _write(tmp_path, "seed0", 0)
    _write(tmp_path, "seed1", 5)
    (tmp_path / "seed0.npz").write_bytes((tmp_path / "seed1.npz").read_bytes())
    record = read_record(tmp_path / "seed0.json")
    assert len(record.predictions_sha256) == 64
    with pytest.raises(BenchError, match="does not belong to its JSON"):
        read_predictions(tmp_path / "seed0.json", record)


@pytest.mark.parametrize("damage", ["truncate", "drop key"])
def test_damaged_npz_is_one_error_naming_the_file(tmp_path: Path, damage: str) -> None:
    _, arrays = _write(tmp_path)
    npz = tmp_path / "seed0.npz"
    if damage == "truncate":
        npz.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])
    else:
        arrays.arrays.pop("shift/rot/labels")
        write_run(tmp_path / "seed0.json", npz, make_record(), arrays)
    unchecked = make_record()
    unchecked.predictions_sha256 = None
    with pytest.raises(BenchError, match=f"predictions file {npz} is (unreadable|damaged)"):
        read_predictions(tmp_path / "seed0.json", unchecked)


def test_json_is_strict_nan_becomes_null(tmp_path: Path) -> None:
    record = make_record()
    record.method_summary = {"grid": [1.0, float("nan"), float("inf")], "t": torch.tensor([0.5]), "n": np.float32(2.0)}
    write_run(tmp_path / "r.json", tmp_path / "r.npz", record, PredictionArrays({"x": np.zeros(1)}))
    text = (tmp_path / "r.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    summary = json.loads(text)["method_summary"]
    assert summary == {"grid": [1.0, None, None], "t": [0.5], "n": 2.0}


def test_failures_are_recorded_beside_and_never_replace_a_result(tmp_path: Path) -> None:
    runs = tmp_path / "runs" / "task" / "method"
    metrics, _ = _write(runs)
    good = (runs / "seed0.json").read_bytes(), (runs / "seed0.npz").read_bytes()
    written = write_failure(runs / "seed0.json", RunRecord("task", "method", 0, Status.FAILED, error="boom"))
    assert written == failure_path(runs / "seed0.json") == runs / "seed0.failed.json"
    assert ((runs / "seed0.json").read_bytes(), (runs / "seed0.npz").read_bytes()) == good
    assert iter_runs(tmp_path) == [runs / "seed0.json"]
    assert iter_failures(tmp_path) == [written]
    _write(runs)  # a later success removes the stale failure record
    assert not written.exists()


def test_unwritable_places_are_one_line_errors(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(BenchError, match=f"cannot write {blocker}/out: .*; choose a writable directory"):
        ensure_writable(blocker / "out")
    with pytest.raises(BenchError, match="cannot write"):
        atomic_write_bytes(blocker / "x.json", b"{}")


def test_atomic_write_leaves_old_file_when_interrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "x.json"
    atomic_write_bytes(target, b"old")

    def boom(*_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temp file left behind


def test_corrupt_files_give_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(BenchError, match="unreadable"):
        read_json(tmp_path / "bad.json")
    with pytest.raises(BenchError, match="unreadable"):
        read_npz(tmp_path / "bad.npz")


def test_prediction_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        Prediction(torch.ones(3))
    with pytest.raises(ValueError):
        Prediction(torch.ones(3, 2) / 2, {"s": torch.ones(2)})
    assert np.allclose(Prediction.concat([_pred(2, 0), _pred(3, 1)]).probs.sum(1), 1)


REPO_RESULTS = Path(__file__).resolve().parent.parent / "results"


def _sklearn_auroc_mismatches(root: Path) -> tuple[int, int, list[str]]:
    """(AUROCs checked, runs of the older format skipped, mismatches) for every run under ``root``:
    each ``ood/<set>/auroc/<score>`` against sklearn's ``roc_auc_score`` on the npz's scores."""
    from sklearn.metrics import roc_auc_score

    from bench.metrics.summary import all_scores

    def scores(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
        own = {k.removeprefix(f"{prefix}/score/"): torch.from_numpy(v) for k, v in arrays.items()
               if k.startswith(f"{prefix}/score/")}
        return {k: v.numpy() for k, v in all_scores(torch.from_numpy(arrays[f"{prefix}/probs"]), own).items()}

    checked, old, wrong = 0, 0, []
    for path in iter_runs(root):
        record = read_record(path)
        if not record.ok:
            continue
        if not record.checkable:
            old += 1  # float32 probabilities: msp/entropy AUROCs cannot be recomputed exactly
            continue
        arrays = read_predictions(path, record).arrays  # read independently of PredictionArrays
        test = scores(arrays, "test")
        for key, value in record.metrics.items():
            if key.startswith("ood/"):
                _, ood, _, score = key.split("/")
                s_in, s_out = test[score], scores(arrays, f"ood/{ood}")[score]
                expected = roc_auc_score(np.r_[np.zeros(len(s_in)), np.ones(len(s_out))], np.r_[s_in, s_out])
                checked += 1
                if not abs(value - expected) <= 1e-9:
                    wrong.append(f"{path} {key}: {value} vs sklearn {expected}")
    return checked, old, wrong


def test_ood_aurocs_of_a_fresh_run_equal_sklearn_on_its_npz(tmp_path: Path) -> None:
    from conftest import TINY_TASK

    from bench.cli import main

    assert main(["--plugin", str(TINY_TASK), "run", "--method", "mc-dropout", "--task", "tiny-digits",
                 "--out", str(tmp_path), "--quiet", "--smoke"]) == 0
    checked, old, wrong = _sklearn_auroc_mismatches(tmp_path)
    assert (checked, old, wrong) == (4, 0, [])  # msp, entropy, mutual_info, expected_entropy


def test_committed_ood_aurocs_equal_sklearn_on_the_npz_scores() -> None:
    """Every committed OOD AUROC is sklearn's ``roc_auc_score`` on the npz's scores (to 1e-9)."""
    checked, old, wrong = _sklearn_auroc_mismatches(REPO_RESULTS)
    assert wrong == []
    if not checked:
        pytest.skip(f"all {old} committed runs use the older result format (schema 1); regenerate results/")
    assert old == 0, f"{old} committed runs still use the older result format (schema 1)"


def test_a_failed_write_into_the_cache_names_bench_cache_dir_not_out(tmp_path: Path, monkeypatch) -> None:
    from bench.results import atomic_write_bytes

    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path / "cache"))
    for name in ("cache", "results"):  # a file where a folder should be: every write below fails
        (tmp_path / name).write_text("not a folder")
    with pytest.raises(BenchError, match="BENCH_CACHE_DIR") as err:
        atomic_write_bytes(tmp_path / "cache" / "checkpoints" / "seed0.pt", b"weights")
    assert "--out" not in str(err.value)
    with pytest.raises(BenchError, match="--out") as err:
        atomic_write_bytes(tmp_path / "results" / "runs" / "seed0.json", b"{}")
    assert "BENCH_CACHE_DIR" not in str(err.value)
