"""Task ``imdb-lora``: IMDB data as token ids, and every registered method on the adapters of a
tiny random encoder (BERT) and decoder (GPT-2), end to end through the harness in smoke mode."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from bench.method_api import METHODS
from bench.options import build
from bench.record import Status
from bench.runner import RunConfig, run
from bench.tasks import TASKS
from bench.tasks.lora_model import PAD

pytestmark = pytest.mark.slow  # every method fine-tunes a small transformer

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FLAVOURS = ["encoder", "decoder"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]
# Each method's cheapest meaningful setting on the smoke data (the defaults are the benchmark's).
QUICK = {
    "ensemble": {"members": "2"},
    "mc-dropout": {"samples": "4"},
    "regvar": {"max_queries": "3"},
    "regvar-ll": {"max_queries": "5"},
    "regvar-amortized": {"steps": "3", "optimizer": "adam"},
}


@pytest.fixture(scope="module")
def backbones(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    spec = importlib.util.spec_from_file_location("tiny_text_backbone", FIXTURES / "tiny_text_backbone.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {"encoder": str(module.build_tiny_backbone(tmp_path_factory.mktemp("tiny-bert"))),
            "decoder": str(module.build_tiny_decoder(tmp_path_factory.mktemp("tiny-gpt2")))}


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _task(backbone: str, smoke: bool, **raw: str):
    cls = TASKS.get("imdb-lora")
    return cls(build(cls.Options, {"backbone": backbone, "max_length": "16", **raw}, "imdb-lora"), smoke=smoke)


def test_cpu_configuration_subsets_every_set_and_feeds_token_ids(backbones):
    data = _task(backbones["encoder"], smoke=False, train_size="30", eval_size="20", ood_size="50").load()
    assert data.sizes() == {"train": 30, "val": 20, "test": 20, "ood/drug-reviews": 20, "ood/tweets": 20,
                            "shift/rotten-tomatoes": 20}
    x = data.train.tensors[0]
    assert x.dtype == torch.long and x.shape[1] == 16  # reviews are longer than 16 tokens
    assert (data.ood["tweets"] == PAD).any()  # shorter texts are padded
    assert data.info["subset"] == "first 30 training reviews, 20 per evaluation set"
    assert data.info["split"].startswith("70/10/20")


def test_the_checkpoint_key_follows_the_backbone(backbones):
    keys = {f: _task(backbones[f], smoke=True).cache_key() for f in FLAVOURS}
    assert keys["encoder"] != keys["decoder"]
    assert _task(backbones["encoder"], smoke=True, rank="4").cache_key() != keys["encoder"]
    assert _task(backbones["encoder"], smoke=True, eval_size="7").cache_key() == keys["encoder"]  # weights unchanged


@pytest.fixture
def tiny_lora() -> str:
    from bench.plugins import load_plugin

    load_plugin(FIXTURES / "tiny_lora_task.py")
    return "tiny-lora"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("method", sorted(METHODS.names()))
def test_every_method_runs_on_the_adapters(backbones, tiny_lora, flavour, method, device, tmp_path):
    """imdb-lora's model and inputs on generated sentences (``tiny-lora``), every method, both
    architectures; the GPU check runs the cuda cases."""
    settings = {"backbone": backbones[flavour], **QUICK.get(method, {})}
    record = run(RunConfig(method=method, task=tiny_lora, out=tmp_path, settings=settings, quiet=True,
                           device=device))
    assert record.status is Status.OK
    metrics = record.metrics
    assert 0.0 <= metrics["cls/acc"] <= 1.0 and math.isfinite(metrics["cls/nll"])
    assert "ood/fillers/auroc/entropy" in metrics and "shift/weak/nll" in metrics
    if method == "map":  # the adapters learn the generated sentiment (a random head stays near 0.5)
        assert metrics["cls/acc"] > 0.8


def test_the_real_task_runs_in_smoke_mode(backbones, tmp_path):
    record = run(RunConfig(method="laplace", task="imdb-lora", smoke=True, out=tmp_path, quiet=True,
                           settings={"backbone": backbones["encoder"], "max_length": "16"}))
    assert record.status is Status.OK and record.data.sizes["train"] == 200
