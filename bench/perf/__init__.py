"""Rerunnable benchmarks: ``python -m bench perf NAME``. Each module registers one function.

A perf function takes ``(args: list[str])`` (its own argparse) and returns an exit code; it
prints its figures (ratios measured within one run) and may print JSON with ``--json``.
"""

from __future__ import annotations

from collections.abc import Callable

from bench.registry import Registry

PerfFn = Callable[[list[str]], int]
PERF: Registry[PerfFn] = Registry("benchmark")
register_perf = PERF.register
