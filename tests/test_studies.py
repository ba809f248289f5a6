"""bench.studies: the task-and-MAP loader and the fit context the methods' studies share."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from bench.errors import BenchError
from bench.studies import context_around, task_with_map
from bench.tasks import TaskData, TrainRecipe


def test_a_context_around_a_trained_network_trains_no_other() -> None:
    net = torch.nn.Linear(3, 2)
    data = TaskData(*(TensorDataset(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)) for _ in range(3)), 2)
    ctx = context_around(net, data, TrainRecipe(1, 4, 1e-3, 0.0))
    assert ctx.train_model(0) is net and ctx.map_model is net and ctx.make_model() is not net
    with pytest.raises(BenchError, match="not ensemble member 1"):
        ctx.train_model(1)


def test_the_map_is_the_cached_checkpoint_when_there_is_one(tiny_task: str, tmp_path) -> None:
    from bench.runner import RunConfig, run

    before = task_with_map(tiny_task, seed=3)
    assert before.checkpoint is None and "initial weights" in before.describe()
    with pytest.raises(BenchError, match="--method map --task tiny-digits --seed 3"):
        before.require_checkpoint(3)
    run(RunConfig(method="map", task=tiny_task, seed=3, out=tmp_path, quiet=True))
    after = task_with_map(tiny_task, seed=3)
    assert after.checkpoint is not None and after.require_checkpoint(3) == after.checkpoint
    assert not all(torch.equal(a, b) for a, b in zip(before.model.state_dict().values(),
                                                      after.model.state_dict().values(), strict=True))
