"""Import every benchmark module in bench.perf so that it registers itself."""

from __future__ import annotations

import importlib
import pkgutil


def load_all() -> None:
    import bench.perf as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.name != "loader":
            importlib.import_module(f"bench.perf.{info.name}")
