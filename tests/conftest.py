"""Shared fixtures: an isolated cache directory and the tiny real task plugin."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.record import Config, Costs, Data, Memory, NetworkCost, Provenance, RunRecord, Status

REPO = Path(__file__).resolve().parent.parent
TINY_TASK = REPO / "tests" / "fixtures" / "tiny_task.py"
TINY_TEXT_BACKBONE = REPO / "tests" / "fixtures" / "tiny_text_backbone.py"


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random BERT built offline (for the text tasks without MiniLM): its directory."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_text_backbone", TINY_TEXT_BACKBONE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.build_tiny_backbone(tmp_path_factory.mktemp("tiny-bert")))


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


def make_record(networks: list[NetworkCost] | None = None) -> RunRecord:
    """A complete run record of an ensemble of 3 (members 0 and 2 loaded from the cache)."""
    return RunRecord(
        task="t", method="ensemble", seed=1, status=Status.OK,
        config=Config("ensemble", {"members": 3}, "t", {}, False, {"epochs": 2}, "auto"),
        data=Data({"train": 10, "test": 5}, {"test": 3}, {"source": "x"}),
        costs=Costs(data_s=0.5, networks=networks if networks is not None else [
            NetworkCost(0, True, 10.0, "cpu", 1, 2**20, "cpu_rss_fresh_process"),
            NetworkCost(1, False, 11.0, "cpu", 1, 2**20, "cpu_rss_fresh_process"),
            NetworkCost(2, True, 12.0, "cpu", 1, 2**20, "cpu_rss_fresh_process"),
        ], fit_posthoc_s=1.0, predict_test_s=2.0, predict_per_1k_s=400.0, predict_other_s=3.0),
        memory=Memory("cpu_rss_fresh_process", 5 * 2**20, 7 * 2**20, 2**30, 1),
        metrics={"cls/acc": 0.5, "cls/nll": 0.7},
        method_summary={"members": 3}, flags=["a flag"],
        provenance=Provenance("abc", {"torch": "2"}, {"device": "cpu"}),
        predictions_sha256="0" * 64,
    )
