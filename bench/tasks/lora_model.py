"""A pretrained transformer with LoRA adapters (PEFT) and a linear classification head.

The trainable weights are the adapters and the head; the backbone is frozen and *shared*: every
network built from one backbone (the MAP, each ensemble member, each seed) points at the same
frozen tensors, so an ensemble of five holds one backbone and five adapter sets. Inputs are token
ids (N × L, ``torch.long``) with ``PAD`` where a text is shorter than L, so that every method sees
one plain tensor per input, as on the other tasks.
"""

from __future__ import annotations

import copy
import enum
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from bench.data.features import mean_pool, resolve_backbone
from bench.errors import BenchError

PAD = -1
"""The input id that marks padding (the model masks it and feeds the tokenizer's pad id)."""

# Model families read left to right: a sequence is summarised by its last token (as
# transformers' *ForSequenceClassification heads for decoders do).
_DECODER_SUFFIXES = ("ForCausalLM", "LMHeadModel")


class TokenPooling(str, enum.Enum):
    """How the token states become one vector per text for the head."""

    AUTO = "auto"
    """``mean`` for encoders, ``last`` for decoders."""
    MEAN = "mean"
    """Mask-weighted mean of the last hidden states (all-MiniLM-L6-v2's own pooling)."""
    FIRST = "first"
    """The first token's state ([CLS] for BERT-style encoders)."""
    LAST = "last"
    """The last non-padding token's state (what a decoder's classification head reads)."""


@dataclass(frozen=True)
class LoraSpec:
    """Where adapters go and how large they are (PEFT ``LoraConfig`` fields)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.1
    target_modules: tuple[str, ...] = ()  # empty: PEFT's default for the architecture


def is_decoder(config: object) -> bool:
    """A causal (left-to-right) language model, judged by its config."""
    archs = getattr(config, "architectures", None) or []
    return bool(getattr(config, "is_decoder", False)) or any(a.endswith(_DECODER_SUFFIXES) for a in archs)


def resolve_pooling(pooling: TokenPooling, decoder: bool) -> TokenPooling:
    if pooling is TokenPooling.AUTO:
        return TokenPooling.LAST if decoder else TokenPooling.MEAN
    if decoder and pooling is not TokenPooling.LAST:
        raise BenchError(f"pooling={pooling.value} reads tokens a decoder has not seen the whole text at; "
                         "use pooling=last (or auto) for decoder backbones")
    return pooling


class LoraClassifier(nn.Module):
    """backbone(+LoRA) → pooled state → dropout → linear head. ``head`` is the last operation, so
    last-layer methods (laplace-ll, regvar-ll) find it as the model's last ``nn.Linear``."""

    def __init__(self, backbone: nn.Module, num_classes: int, pad_id: int, pooling: TokenPooling,
                 dropout: float, causal: bool) -> None:
        super().__init__()
        self.backbone = backbone
        self.causal = causal
        self.pad_id = pad_id
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.config.hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = x != PAD
        ids = x.masked_fill(~mask, self.pad_id)
        hidden = self.backbone(input_ids=ids, attention_mask=self._additive_mask(mask)).last_hidden_state
        if self.pooling is TokenPooling.MEAN:
            pooled = mean_pool(hidden, mask)
        elif self.pooling is TokenPooling.FIRST:
            pooled = hidden[:, 0]
        else:  # right padding: the last real token sits at length - 1
            last = mask.long().sum(1).clamp(min=1) - 1
            pooled = hidden[torch.arange(len(x), device=x.device), last]
        return self.head(self.dropout(pooled))

    def _additive_mask(self, keys: torch.Tensor) -> torch.Tensor:
        """The (N, 1, L, L) additive attention mask, built here rather than by transformers: its
        mask helpers branch on the mask's values, which vmap (per-input RegVar) cannot trace.
        Padding keys are masked, and for a decoder every later token too (causal attention)."""
        length = keys.shape[1]
        allowed = keys[:, None, None, :].expand(-1, 1, length, -1)
        if self.causal:
            allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=keys.device).tril()
        dtype = self.head.weight.dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=keys.device).masked_fill(~allowed, torch.finfo(dtype).min)


class SharedBackbone:
    """One frozen pretrained backbone per process, from which adapter-carrying networks are made.

    ``build`` deep-copies the module *structure* while reusing every parameter and buffer tensor
    (deepcopy's memo), then lets PEFT inject fresh adapters into the copy: the frozen weights
    exist once however many networks are built.
    """

    def __init__(self, name: str) -> None:
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        source, local_only, self.identity = resolve_backbone(name)
        try:
            config = AutoConfig.from_pretrained(source, local_files_only=local_only)
            self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
            # Eager attention: torch's fused CPU attention has no second derivative, and RegVar's
            # Hessian-vector products need one; every method then sees the same function.
            self.base = AutoModel.from_pretrained(source, local_files_only=local_only, attn_implementation="eager")
        except (OSError, ValueError) as exc:
            raise BenchError(
                f"cannot load backbone {name!r} ({type(exc).__name__}); without a hub connection give a "
                "local model directory (--set backbone=/path) or use the default"
            ) from None
        self.decoder = is_decoder(config)
        self.base.eval().requires_grad_(False)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (self.tokenizer.eos_token_id or 0))

    def build(self, num_classes: int, lora: LoraSpec, pooling: TokenPooling, dropout: float) -> LoraClassifier:
        from peft import LoraConfig, inject_adapter_in_model

        memo = {id(t): t for t in (*self.base.parameters(), *self.base.buffers())}
        body = copy.deepcopy(self.base, memo)
        config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=list(lora.target_modules) or None, bias="none")
        try:
            with warnings.catch_warnings():  # GPT-2's Conv1D: PEFT transposes as it should, and says so
                warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")
                body = inject_adapter_in_model(config, body)
        except ValueError as exc:
            raise BenchError(f"LoRA adapters cannot be placed ({exc}); set target_modules to module names "
                             "of this backbone, e.g. target_modules=query,value") from None
        for name, p in body.named_parameters():
            p.requires_grad_("lora_" in name)
        pooling = resolve_pooling(pooling, self.decoder)
        return LoraClassifier(body, num_classes, self.pad_id, pooling, dropout, causal=self.decoder)


_BACKBONES: dict[str, SharedBackbone] = {}


def shared_backbone(name: str) -> SharedBackbone:
    """The process's backbone for ``name`` (loaded on first use)."""
    if name not in _BACKBONES:
        _BACKBONES[name] = SharedBackbone(name)
    return _BACKBONES[name]


def special_affixes(tokenizer: object) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text ([CLS] and [SEP] for BERT,
    none for GPT-2), read off one tokenized word (transformers 5 has no public call for it)."""
    plain = tokenizer("hello", add_special_tokens=False)["input_ids"]
    full = tokenizer("hello")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    raise BenchError("the backbone's tokenizer changes a word when it adds special tokens; use another backbone")


def tokenize(tokenizer: object, texts: list[str], max_length: int, head_tail: bool) -> torch.Tensor:
    """Token ids (N × L, ``PAD``-padded on the right, L ≤ max_length) with the tokenizer's special
    tokens. A longer text keeps its first tokens, or with ``head_tail`` its first half and last half
    of the budget (head+tail truncation, Sun et al. 2019: reviews end with their verdict)."""
    prefix, suffix = special_affixes(tokenizer)
    budget = max_length - len(prefix) - len(suffix)
    if budget < 2:
        raise BenchError(f"max_length={max_length} leaves no room for text; use max_length >= 8")
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    head = (budget + 1) // 2 if head_tail else budget
    rows = []
    for seq in ids:
        if len(seq) > budget:
            seq = seq[:head] + (seq[len(seq) - (budget - head):] if budget > head else [])
        rows.append(prefix + seq + suffix)
    width = max((len(r) for r in rows), default=1)
    out = torch.full((len(rows), width), PAD, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out
