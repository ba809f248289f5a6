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


@pytest.fixture
def read_only(monkeypatch: pytest.MonkeyPatch):
    """``read_only(dir)`` makes ``dir`` (and everything below) unwritable for this process.

    chmod does it for an ordinary user; root ignores permissions, so there the writes bench makes
    (mkdir, temp files) below ``dir`` are refused with the same PermissionError instead."""
    import tempfile

    chmodded: list[Path] = []

    def apply(directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        for path in [directory, *directory.rglob("*")]:
            if path.is_dir():
                path.chmod(0o555)
                chmodded.append(path)
        try:
            with tempfile.TemporaryFile(dir=directory):
                pass
        except OSError:
            return directory  # chmod took effect

        def below(path: object) -> bool:
            return path is not None and Path(str(path)).resolve().is_relative_to(directory.resolve())

        def denied(path: object) -> PermissionError:
            return PermissionError(13, "Permission denied", str(path))

        def guard(fn, arg: str):
            def wrapper(*args, **kwargs):
                if below(kwargs.get(arg)):
                    raise denied(kwargs.get(arg))
                return fn(*args, **kwargs)
            return wrapper

        original_mkdir = Path.mkdir

        def mkdir(self: Path, *args, **kwargs) -> None:
            if below(self) and not self.is_dir():
                raise denied(self)
            return original_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", guard(tempfile.mkstemp, "dir"))
        monkeypatch.setattr(tempfile, "TemporaryFile", guard(tempfile.TemporaryFile, "dir"))
        monkeypatch.setattr(Path, "mkdir", mkdir)
        return directory

    yield apply
    for path in chmodded:
        path.chmod(0o755)
