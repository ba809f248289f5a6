"""Shared fixtures: an isolated cache directory and the tiny real task plugin."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY_TASK = REPO / "tests" / "fixtures" / "tiny_task.py"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path_factory.getbasetemp() / "bench-cache"
    monkeypatch.setenv("BENCH_CACHE_DIR", str(cache))
    return cache


@pytest.fixture
def tiny_task() -> str:
    from bench.plugins import load_plugin

    load_plugin(TINY_TASK)
    return "tiny-digits"


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m bench ...`` in a subprocess, as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True,
                          cwd=REPO, env=full_env, timeout=timeout)
