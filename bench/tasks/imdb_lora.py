"""``imdb-lora``: IMDB sentiment by a pretrained transformer fine-tuned with LoRA adapters.

The same reviews, 70/10/20 split, Rotten Tomatoes shift set and OOD sets (drug reviews, tweets)
as ``imdb``; the model is the backbone (frozen, bundled all-MiniLM-L6-v2 by default, or any
Hugging Face encoder or decoder id or local directory) with LoRA adapters and a linear head,
trained end to end. Every method then works on the trainable weights, adapters and head.

The defaults are the CPU configuration (a stated subset of the training reviews and of each
evaluation set, 128 tokens, 2 epochs), sized so one seed of every runnable method fits in an
hour on two cores. The full configuration, for a GPU: ``--set train_size=0 --set eval_size=0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from bench.data import text_sources as ts
from bench.data.features import DEFAULT_BACKBONE
from bench.options import as_dict, option
from bench.tasks.base import Task, TaskData, TrainRecipe, register_task
from bench.tasks.lora_model import LoraSpec, TokenPooling, shared_backbone, tokenize
from bench.tasks.text import (
    SMOKE,
    SMOKE_MAX_LENGTH,
    SPLIT_SEED,
    SUBSAMPLE_SEED,
    ImdbSource,
    imdb_source_identity,
    imdb_splits,
    ood_sets,
)


@dataclass
class ImdbLoraOptions:
    backbone: str = option(DEFAULT_BACKBONE, "transformer: the bundled default, a hub id or a local directory")
    max_length: int = option(128, "tokens per review (head+tail truncation)", min=8, max=4096)
    head_tail: bool = option(True, "a longer review keeps its first and last tokens (else the first)")
    pooling: TokenPooling = option(TokenPooling.AUTO, "token states → one vector for the head")
    rank: int = option(8, "LoRA rank r", min=1)
    alpha: float = option(16.0, "LoRA alpha (the adapter output is scaled by alpha / r)", min=0.0)
    lora_dropout: float = option(0.1, "dropout on each adapter's input", min=0.0, max=0.95)
    target_modules: tuple[str, ...] = option((), "modules given adapters, '|'-separated (empty: PEFT's default)")
    head_dropout: float = option(0.1, "dropout before the linear head", min=0.0, max=0.95)
    train_size: int = option(2000, "training reviews used (0: all 17,433); CPU default 2,000", min=0)
    eval_size: int = option(500, "inputs kept per validation, test, shift and OOD set (0: all)", min=0)
    epochs: int = option(2, "fine-tuning epochs", min=1)
    lr: float = option(5e-4, "AdamW learning rate (adapters and head)", min=0.0)
    batch_size: int = option(16, "reviews per training step", min=1)
    ood_size: int = option(2000, "texts per OOD set before eval_size (as imdb)", min=10)
    shift_size: int = option(10000, "Rotten Tomatoes texts before eval_size (as imdb)", min=10)
    source: ImdbSource = option(ImdbSource.AUTO, "where IMDB reviews come from")


EVALUATION_ONLY = ("eval_size", "ood_size", "shift_size")


def _first(data: ts.TextSet, size: int) -> ts.TextSet:
    """The first ``size`` texts (0: all). The splits and subsamples are already seeded shuffles."""
    return data if size == 0 or size >= len(data) else data.subset(range(size))


@register_task("imdb-lora")
class ImdbLora(Task):
    """IMDB sentiment, LoRA fine-tuning of a transformer; shift: Rotten Tomatoes; OOD: drug
    reviews, tweets (as ``imdb``)."""

    Options = ImdbLoraOptions

    def _sizes(self) -> tuple[int, int, int]:
        """(training reviews, inputs per evaluation set, max tokens) in this mode."""
        o = self.options
        if self.smoke:
            return SMOKE["train"], SMOKE["other"], min(o.max_length, SMOKE_MAX_LENGTH)
        return o.train_size, o.eval_size, o.max_length

    def text_sets(self) -> tuple[dict[str, ts.TextSet], dict[str, ts.TextSet], dict[str, ts.TextSet], dict]:
        """(train/val/test, shift sets, OOD sets, info) before subsetting: those of ``imdb``."""
        o = self.options
        splits, info = imdb_splits(ImdbSource(o.source), self.data_dir)
        rt, _ = ts.deduplicate(ts.read_rotten_tomatoes())
        shift = {"rotten-tomatoes": ts.seeded_subsample(rt, o.shift_size, SUBSAMPLE_SEED)}
        return splits, shift, ood_sets(o.ood_size), info

    def load(self) -> TaskData:
        o = self.options
        splits, shift, ood, info = self.text_sets()
        train_size, eval_size, max_length = self._sizes()
        keep = {"train": train_size, "val": eval_size, "test": eval_size}
        splits = {k: _first(v, keep[k]) for k, v in splits.items()}
        shift = {k: _first(v, eval_size) for k, v in shift.items()}
        ood = {k: _first(v, eval_size) for k, v in ood.items()}
        backbone = shared_backbone(o.backbone)

        def ids(s: ts.TextSet) -> torch.Tensor:
            return tokenize(backbone.tokenizer, s.texts, max_length, o.head_tail)

        def labelled(s: ts.TextSet) -> TensorDataset:
            return TensorDataset(ids(s), torch.tensor(s.labels, dtype=torch.long))

        return TaskData(
            train=labelled(splits["train"]), val=labelled(splits["val"]), test=labelled(splits["test"]),
            num_classes=2,
            ood={k: ids(v) for k, v in ood.items()},
            shift={k: labelled(v) for k, v in shift.items()},
            info={**info, "split_seed": SPLIT_SEED, "subsample_seed": SUBSAMPLE_SEED,
                  "split": "70/10/20 of deduplicated texts (as imdb)",
                  "subset": f"first {train_size or 'all'} training reviews, {eval_size or 'all'} per evaluation set",
                  "backbone": backbone.identity, "max_length": max_length, "head_tail": o.head_tail,
                  "ood_source": {k: v.source for k, v in ood.items()},
                  "shift_source": {k: v.source for k, v in shift.items()}},
        )

    def make_model(self, num_classes: int) -> nn.Module:
        o = self.options
        lora = LoraSpec(o.rank, o.alpha, o.lora_dropout, tuple(o.target_modules))
        return shared_backbone(o.backbone).build(num_classes, lora, TokenPooling(o.pooling), o.head_dropout)

    def recipe(self) -> TrainRecipe:
        return TrainRecipe(epochs=self.options.epochs, batch_size=self.options.batch_size, lr=self.options.lr,
                           weight_decay=1e-2, schedule="cosine")

    def cache_key(self) -> str:
        """Also keyed by the backbone's identity (a local directory's fingerprint) and the IMDB source."""
        import hashlib

        backbone = shared_backbone(self.options.backbone).identity
        source = imdb_source_identity(ImdbSource(self.options.source), self.data_dir)
        return hashlib.sha256(f"{super().cache_key()}|{backbone}|{source}".encode()).hexdigest()[:12]

    def trained_options(self) -> dict[str, Any]:
        """The evaluation sets' sizes do not change the weights: one MAP serves every eval_size."""
        return {k: v for k, v in as_dict(self.options).items() if k not in EVALUATION_ONLY}
