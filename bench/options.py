"""Typed options for methods and tasks, filled from ``--set key=value`` strings.

Each method or task declares a dataclass of options; a field's type drives parsing
(bool, int, float, str, a ``str`` Enum, or a tuple of floats written ``a|b|c``) and its
metadata may bound it (``{"min": 0, "help": "..."}``). Unknown keys and bad values are
refused with a message that names them.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import typing
from typing import Any

from bench.errors import BenchError


def option(default: Any, help: str, **bounds: float) -> Any:
    """A dataclass field with a help text and optional ``min``/``max`` bounds."""
    return dataclasses.field(default=default, metadata={"help": help, **bounds})


def parse_value(text: str, kind: Any, key: str, owner: str) -> Any:
    """Parse ``text`` as ``kind``; raise a one-line BenchError naming key and owner."""
    try:
        if kind is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            return int(text)
        if kind is float:
            value = float(text)
            if not math.isfinite(value):
                raise BenchError(f"bad value {text!r} for {owner} option {key!r}: must be finite")
            return value
        if kind is str:
            return text
        if isinstance(kind, type) and issubclass(kind, enum.Enum):
            return kind(text)
        if typing.get_origin(kind) is tuple:
            (inner, *_rest) = typing.get_args(kind)
            return tuple(parse_value(p, inner, key, owner) for p in text.split("|") if p)
    except ValueError:
        pass
    raise BenchError(f"bad value {text!r} for {owner} option {key!r}: expected {describe(kind)}")


def describe(kind: Any) -> str:
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return "one of " + ", ".join(m.value for m in kind)
    if typing.get_origin(kind) is tuple:
        return f"values of type {describe(typing.get_args(kind)[0])} separated by '|'"
    return getattr(kind, "__name__", str(kind))


def build(cls: type, raw: dict[str, str], owner: str) -> Any:
    """Instantiate options dataclass ``cls`` from raw strings (unknown keys are errors)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, text in raw.items():
        if key not in fields:
            valid = ", ".join(sorted(fields)) or "none"
            raise BenchError(f"unknown option {key!r} for {owner}; valid options: {valid}")
        value = parse_value(text, hints[key], key, owner)
        meta = fields[key].metadata
        for item in value if isinstance(value, tuple) else (value,):
            if "min" in meta and item < meta["min"]:
                raise BenchError(f"bad value {text!r} for {owner} option {key!r}: must be ≥ {meta['min']}")
            if "max" in meta and item > meta["max"]:
                raise BenchError(f"bad value {text!r} for {owner} option {key!r}: must be ≤ {meta['max']}")
        values[key] = value
    return cls(**values)


def as_dict(options: Any) -> dict[str, Any]:
    """JSON-friendly view of an options dataclass (enums become their values)."""
    out = {}
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if isinstance(value, enum.Enum):
            value = value.value
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def help_lines(cls: type) -> list[str]:
    hints = typing.get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default.value if isinstance(f.default, enum.Enum) else f.default
        lines.append(f"{f.name}={default}  ({describe(hints[f.name])}) {f.metadata.get('help', '')}")
    return lines


def format_option(value: Any) -> str:
    """An option's value as ``--set`` and labels write it (a list as ``a|b``)."""
    return "|".join(map(str, value)) if isinstance(value, list) else str(value)
