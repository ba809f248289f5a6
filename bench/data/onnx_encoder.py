"""The text backbone on ONNX Runtime: exported once into the cache, optionally int8-quantised.

The export holds only the transformer (inputs: the tokenizer's tensors, output
``last_hidden_state``, batch and sequence axes dynamic), so one file serves every
``max_length``, truncation side and pooling; tokenising and pooling stay in Python, exactly as in
:class:`bench.data.features.Encoder`, which is the reference the engine is measured against
(``python -m bench perf embed``).
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from bench.cache import cache_lock, cache_root
from bench.data.features import EncoderSpec, Pooling, Truncation, mean_pool, resolve_backbone
from bench.errors import BenchError
from bench.results import atomic_write_bytes

OPSET = 17
# int8: weights of the dense layers per output channel, activations per tensor at run time; the
# embedding tables and the attention products stay fp32 (quantising them costs accuracy, no speed).
INT8 = "dynamic-int8-matmul-per-channel"


def model_path(backbone: str, int8: bool) -> Path:
    """Where the export of ``backbone`` lives: keyed by its identity, the opset and quantisation."""
    _, _, identity = resolve_backbone(backbone)
    key = {"backbone": identity, "opset": OPSET, "quantisation": INT8 if int8 else "none"}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / "onnx" / digest / "model.onnx"


def ensure_model(backbone: str, int8: bool) -> Path:
    """The exported (and, if asked, quantised) model, written once; parallel runs wait for it."""
    path = model_path(backbone, int8)
    with cache_lock(path):
        if not path.is_file():
            data = _quantised(ensure_model(backbone, False)) if int8 else _exported(backbone)
            atomic_write_bytes(path, data)
    return path


class _LastHidden(torch.nn.Module):
    """Positional inputs named like the tokenizer's outputs, one output: the token states."""

    def __init__(self, model: torch.nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, inputs, strict=True))).last_hidden_state


def _exported(backbone: str) -> bytes:
    """fp32 ONNX bytes of the backbone (TorchScript exporter: needs ``onnx``, not ``onnxscript``)."""
    from transformers import AutoModel, AutoTokenizer

    source, local_only, _ = resolve_backbone(backbone)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        model = AutoModel.from_pretrained(source, local_files_only=local_only).eval()
    except (OSError, ValueError) as exc:
        raise BenchError(f"cannot load backbone {backbone!r} for export ({type(exc).__name__})") from None
    sample = tokenizer(["a short sample text", "a"], padding=True, return_tensors="pt")
    names = [n for n in tokenizer.model_input_names if n in sample]
    axes = {n: {0: "batch", 1: "sequence"} for n in [*names, "last_hidden_state"]}
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer's notes on shape-dependent branches: the export is checked against torch
        # on padded and unpadded batches (tests/test_onnx_encoder.py, bench perf embed).
        warnings.simplefilter("ignore")
        torch.onnx.export(_LastHidden(model, names), tuple(sample[n] for n in names), buffer,
                          input_names=names, output_names=["last_hidden_state"], dynamic_axes=axes,
                          opset_version=OPSET, dynamo=False)
    return buffer.getvalue()


def _quantised(fp32: Path) -> bytes:
    """int8 dynamic quantisation (see ``INT8``) of an fp32 export, via a temporary file."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(dir=fp32.parent.parent) as tmp:
        out = Path(tmp) / "model.onnx"
        quantize_dynamic(fp32, out, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"])
        return out.read_bytes()


def session(path: Path, threads: int):
    """A CPU session: full graph optimisation, ``threads`` for one op, ops run one at a time."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # the exporter's unused-initializer notes are not the user's concern
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxEncoder:
    """Same calls and results as :class:`bench.data.features.Encoder`, on ONNX Runtime (CPU)."""

    def __init__(self, spec: EncoderSpec, int8: bool = False):
        from transformers import AutoTokenizer

        source, local_only, _ = resolve_backbone(spec.backbone)
        self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        if Truncation(spec.truncation) == Truncation.TAIL:
            self.tokenizer.truncation_side = "left"
        self.session = session(ensure_model(spec.backbone, int8), torch.get_num_threads())
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.spec = spec

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        # Length-sorted batches waste less compute on padding; the order is restored below.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out: torch.Tensor | None = None
        for start in range(0, len(order), self.spec.batch_size):
            idx = order[start : start + self.spec.batch_size]
            pooled = self._batch([texts[i] for i in idx])
            if out is None:
                out = torch.empty(len(texts), pooled.shape[1])
            out[idx] = pooled
        return out if out is not None else torch.empty(0, 0)

    def _batch(self, texts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.spec.max_length,
                               return_tensors="np")
        feed = {n: batch[n].astype(np.int64) for n in self.inputs}
        hidden = torch.from_numpy(self.session.run(None, feed)[0])
        if Pooling(self.spec.pooling) == Pooling.MEAN:
            return mean_pool(hidden, torch.from_numpy(batch["attention_mask"]))
        return hidden[:, 0]
