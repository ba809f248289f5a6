"""Name → class registries with robustness_metrics-style spec strings.

A spec string is ``name`` or ``name(key=value, key2=value2)``; it can be typed on the command
line (``--method "laplace(hessian=diag)"``) and is what results are keyed by.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from bench.errors import BenchError

T = TypeVar("T")

_SPEC = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(?:\((.*)\))?\s*$")


class Registry(Generic[T]):
    """A named collection of classes filled by a decorator; duplicate names are refused."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise BenchError(
                    f"{self.kind} {name!r} is already registered "
                    f"(by {_where(self._entries[name])}); choose another name"
                )
            self._entries[name] = obj
            obj.name = name  # type: ignore[attr-defined]
            return obj

        return decorator

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise BenchError(self.unknown_message(name))
        return self._entries[name]

    def unknown_message(self, name: str) -> str:
        names = sorted(self._entries)
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.kind} {name!r}.{hint} Valid {self.kind}s: {', '.join(names)}"

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[T]:
        """The registered objects in the order they were registered."""
        return list(self._entries.values())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def _where(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', obj)}"


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """Split ``name(k=v, ...)`` into the name and its raw string options."""
    match = _SPEC.match(spec)
    if not match:
        raise BenchError(f"cannot parse spec {spec!r}; write it as name or name(key=value,...)")
    name, body = match.group(1), match.group(2)
    options: dict[str, str] = {}
    if body:
        for part in body.split(","):
            if not part.strip():
                continue
            pair = parse_assignment(part)
            if twice := pair.keys() & options.keys():
                raise BenchError(f"spec {spec!r} sets {next(iter(twice))!r} twice; give each option once")
            options.update(pair)
    return name, options


def parse_settings(items: list[str]) -> dict[str, str]:
    """``--set`` arguments as one dict; a key given twice is an error, not a silent last-wins."""
    settings: dict[str, str] = {}
    for item in items:
        pair = parse_assignment(item)
        if twice := pair.keys() & settings.keys():
            raise BenchError(f"--set {next(iter(twice))} is given twice; give each option once")
        settings.update(pair)
    return settings


def parse_assignment(text: str) -> dict[str, str]:
    """Parse one ``key=value`` pair (as given to ``--set``)."""
    if "=" not in text:
        raise BenchError(f"bad setting {text!r}; write it as key=value")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key:
        raise BenchError(f"bad setting {text!r}; the key is empty")
    return {key: value.strip()}
