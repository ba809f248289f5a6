"""Import every benchmark module so that it registers itself: those in bench.perf, and the
methods' own (``bench_methods.PERF_MODULES``: a method's studies live with the method, and this
declared list is how the harness finds them without importing a method's internals)."""

from __future__ import annotations

import importlib
import pkgutil


def load_all() -> None:
    import bench.perf as package
    import bench_methods

    for info in pkgutil.iter_modules(package.__path__):
        if info.name != "loader":
            importlib.import_module(f"bench.perf.{info.name}")
    for name in bench_methods.PERF_MODULES:
        importlib.import_module(name)
