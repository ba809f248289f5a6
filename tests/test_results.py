"""The results store: round trip, recomputation from raw predictions, atomic writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bench.errors import BenchError
from bench.metrics import evaluate
from bench.results import (
    atomic_write_bytes,
    pack_predictions,
    read_json,
    read_npz,
    unpack_predictions,
    write_run,
)
from bench.types import Prediction


def _pred(n: int, seed: int) -> Prediction:
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(n, 3, generator=g, dtype=torch.float64), 1)
    return Prediction(probs, {"variance": torch.rand(n, generator=g, dtype=torch.float64)})


def test_metrics_recompute_identically_from_the_npz(tmp_path: Path) -> None:
    test, labels = _pred(40, 0), torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(1))
    ood = {"far": _pred(30, 2)}
    shift = {"rot": (_pred(20, 3), labels[:20])}
    arrays = pack_predictions(test, labels, ood, shift)
    write_run(tmp_path / "r.json", tmp_path / "r.npz", {"metrics": {}}, arrays)
    args = unpack_predictions(read_npz(tmp_path / "r.npz"))
    direct = evaluate(test.probs.float().double(), labels, test.scores,
                      ood={"far": (ood["far"].probs.float().double(), ood["far"].scores)},
                      shift={"rot": (shift["rot"][0].probs.float().double(), labels[:20])})
    assert evaluate(**args) == pytest.approx(direct)


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
