"""ONNX Runtime engine: same vectors as torch (head and tail), its own store, one export per cache."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bench.data import features as F
from bench.data import onnx_encoder as O

CPU = torch.device("cpu")
FIXTURES = Path(__file__).resolve().parent / "fixtures"
LONG = " ".join(["The first act is slow and the acting is wooden."] * 20 + ["But the ending is superb."] * 8)
TEXTS = ["good", "A wonderful film with great acting.", "bad dialogue", LONG, LONG.replace("superb", "awful")]
SHORT = ["a great film", "awful", "the plot was slow and the ending was moving", "i loved it"]


def _tiny_builder():
    spec = importlib.util.spec_from_file_location("tiny_text_backbone", FIXTURES / "tiny_text_backbone.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_tiny_backbone


@pytest.fixture(scope="module")
def minilm() -> F.EncoderSpec:
    pytest.importorskip("onnxruntime")
    try:
        F.bundled_minilm_dir()
    except Exception as exc:  # noqa: BLE001 - without the bundled model there is nothing to compare
        pytest.skip(str(exc))
    return F.EncoderSpec(max_length=128, batch_size=2)


@pytest.mark.parametrize("truncation", list(F.Truncation))
def test_onnx_matches_torch(minilm: F.EncoderSpec, truncation: F.Truncation):
    spec = replace(minilm, truncation=truncation)
    reference = F.make_encoder(spec, CPU)(TEXTS)
    onnx = F.make_encoder(replace(spec, engine=F.Engine.ONNX), CPU)
    assert isinstance(onnx, O.OnnxEncoder)
    cos = torch.nn.functional.cosine_similarity(onnx(TEXTS), reference, dim=1)
    assert cos.min() >= 0.999, cos


def test_int8_stays_close(minilm: F.EncoderSpec):
    """int8 drifts more than fp32 (see results/perf/embed.json) but keeps the vector's direction."""
    reference = F.make_encoder(minilm, CPU)(TEXTS)
    int8 = F.make_encoder(replace(minilm, engine=F.Engine.ONNX_INT8), CPU)(TEXTS)
    assert torch.nn.functional.cosine_similarity(int8, reference, dim=1).min() >= 0.95


def test_store_identity_names_non_torch_engines(tmp_path: Path):
    spec = F.EncoderSpec(backbone="all-MiniLM-L6-v2")
    torch_store = F.FeatureStore(spec, tmp_path)
    _, _, backbone = F.resolve_backbone(spec.backbone)
    old = {"backbone": backbone, "max_length": 128, "pooling": "mean"}
    assert torch_store.identity == old
    assert torch_store.dir.name == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    dirs = {F.FeatureStore(replace(spec, engine=e), tmp_path).dir for e in F.Engine}
    assert len(dirs) == len(F.Engine)


def test_cuda_uses_torch():
    spec = F.EncoderSpec(engine=F.Engine.ONNX_INT8)
    assert F.effective_engine(spec, torch.device("cuda")) == F.Engine.TORCH
    assert F.effective_engine(spec, CPU) == F.Engine.ONNX_INT8


def test_export_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("onnxruntime")
    backbone = str(_tiny_builder()(tmp_path / "tiny-bert"))
    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path / "cache"))
    spec = F.EncoderSpec(backbone=backbone, max_length=32, batch_size=3, engine=F.Engine.ONNX)
    first = O.OnnxEncoder(spec)(SHORT)
    assert O.model_path(backbone, False).is_file()

    def refuse(*_):
        raise AssertionError("exported a second time")

    monkeypatch.setattr(O, "_exported", refuse)
    again = O.OnnxEncoder(replace(spec, max_length=16))  # the export does not depend on max_length
    assert torch.allclose(O.OnnxEncoder(spec)(SHORT), first)
    assert again(SHORT).shape == first.shape
