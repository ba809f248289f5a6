"""What embedding a list of texts will cost, known before any text is embedded.

``missing_texts`` reads the feature store's index (the vectors are already there or not);
``probe_embedding_seconds`` runs the backbone on a few of the missing texts, stores nothing,
and scales their time by the count. A tail store takes the texts that fit in ``max_length``
tokens from the head store (``features._tail_from_head``), so only longer texts count there.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from pathlib import Path

from bench.data.features import EncoderSpec, FeatureStore, Truncation, make_encoder, text_hash, token_lengths

PROBE_TEXTS = 16
PROBE_SEED = 0


def missing_texts(texts: Sequence[str], spec: EncoderSpec, root: Path) -> list[str]:
    """The distinct texts of ``texts`` that embedding under ``spec`` would run the backbone on."""
    index = FeatureStore(spec, root).load_index()
    todo = list({text_hash(t): t for t in texts if text_hash(t) not in index}.values())
    if todo and Truncation(spec.truncation) == Truncation.TAIL:
        todo = _longer_than(todo, spec)
    return todo


def _longer_than(texts: list[str], spec: EncoderSpec) -> list[str]:
    lengths = token_lengths(texts, spec)
    if lengths is None:
        return texts  # the encoder reports the problem when it runs
    return [t for t, n in zip(texts, lengths, strict=True) if n > spec.max_length]


def probe_embedding_seconds(texts: Sequence[str], spec: EncoderSpec, device=None) -> float:
    """Seconds the backbone will take for ``texts``: a seeded sample of ``PROBE_TEXTS`` of them
    embedded once after a warm-up call, scaled by the count (nothing is written)."""
    if not texts:
        return 0.0
    if device is None:
        from bench.device import select_device

        device = select_device("auto")
    sample = random.Random(PROBE_SEED).sample(list(texts), min(PROBE_TEXTS, len(texts)))
    encoder = make_encoder(spec, device)
    encoder(sample[:2])
    start = time.perf_counter()
    encoder(sample)
    return (time.perf_counter() - start) / len(sample) * len(texts)
