"""Load user files that register their own methods or tasks (``--plugin``, ``BENCH_PLUGINS``)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path

from bench.errors import BenchError

PLUGIN_MODULE = "bench_plugin_"  # the prefix of the module name a plugin file is imported under


def plugin_paths(cli_paths: list[str]) -> list[Path]:
    env = [p for p in os.environ.get("BENCH_PLUGINS", "").split(os.pathsep) if p]
    return [Path(p) for p in [*env, *cli_paths]]


def load_plugin(path: Path) -> None:
    """Import a Python file once; its ``@register_method``/``@register_task`` calls do the rest."""
    path = path.expanduser().resolve()
    if path.is_dir():
        raise BenchError(f"plugin {path} is a directory; pass the path of a .py file inside it")
    if not path.is_file():
        raise BenchError(f"plugin file {path} does not exist; pass the path of a .py file")
    name = PLUGIN_MODULE + hashlib.sha256(str(path).encode()).hexdigest()[:12]
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise BenchError(f"plugin {path} cannot be imported; it must be a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BenchError:
        del sys.modules[name]
        raise
    except Exception as exc:  # noqa: BLE001 - the user's file: name it, in one line
        del sys.modules[name]
        raise BenchError(f"plugin {path} failed to import: {type(exc).__name__}: {exc}") from None


def load_plugins(cli_paths: list[str]) -> None:
    for path in plugin_paths(cli_paths):
        load_plugin(path)


def plugin_file(cls: type) -> str | None:
    """The file name (not the path: commands must not depend on where they were made) of the
    plugin file that defines ``cls``; None for a class bench itself defines."""
    if not cls.__module__.startswith(PLUGIN_MODULE):
        return None
    return Path(getattr(sys.modules.get(cls.__module__), "__file__", None) or "PLUGIN.py").name
