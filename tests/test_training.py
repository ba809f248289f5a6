"""bench.training: the checkpoint fingerprint and the stored training cost."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from bench.errors import BenchError
from bench.training import TrainingCost, fingerprint, read_cost, save_cost


def data(shift: float = 0.0) -> TensorDataset:
    x = torch.arange(40.0).reshape(10, 4) + shift
    return TensorDataset(x, torch.arange(10) % 2)


def test_fingerprint_follows_data_and_architecture_not_weights() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    base = fingerprint(net, data())
    torch.manual_seed(1)
    reinit = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    assert fingerprint(reinit, data()) == base  # weights are what the checkpoint stores, not its key
    assert fingerprint(net, data(1e-3)) != base  # one value of the training data changed
    labels = data()
    flipped = TensorDataset(labels.tensors[0], 1 - labels.tensors[1])
    assert fingerprint(net, flipped) != base
    assert fingerprint(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)), data()) != base
    assert fingerprint(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2)), data()) != base


def test_cost_round_trips_and_a_missing_one_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "seed0.pt"
    save_cost(path, TrainingCost(12.5, "cpu"))
    assert read_cost(path) == TrainingCost(12.5, "cpu")
    with pytest.raises(BenchError, match="no readable training cost.*delete the checkpoint"):
        read_cost(tmp_path / "seed1.pt")


@pytest.mark.slow
def test_a_corrupt_cached_checkpoint_is_moved_aside_and_retrained(tmp_path, monkeypatch, capsys) -> None:
    from conftest import TINY_TASK

    from bench.cli import main

    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path / "cache"))
    argv = ["--plugin", str(TINY_TASK), "run", "--method", "map", "--task", "tiny-digits", "--out",
            str(tmp_path / "out"), "--smoke"]
    assert main(argv) == 0
    [checkpoint] = (tmp_path / "cache").rglob("seed0.pt")
    good = checkpoint.read_bytes()
    checkpoint.write_bytes(b"not a checkpoint")
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "is unreadable (" in err and "moved it to seed0.pt.corrupt and retraining" in err
    assert "Warning" not in err  # torch's own warning does not precede the line
    assert checkpoint.with_name("seed0.pt.corrupt").read_bytes() == b"not a checkpoint"
    assert checkpoint.read_bytes() == good  # retrained to the same weights (seeded)
