"""The repo's top-level ``datasets/`` folder must never shadow Hugging Face ``datasets``."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytest.importorskip("datasets", reason="Hugging Face datasets is a test extra")

PROBE = "import datasets; print(datasets.__file__); print(hasattr(datasets, 'load_dataset'))"


def _site_dirs() -> list[Path]:
    paths = sysconfig.get_paths()
    return [Path(paths["purelib"]).resolve(), Path(paths["platlib"]).resolve()]


def _is_installed(module_file: str) -> bool:
    resolved = Path(module_file).resolve()
    return any(resolved.is_relative_to(site) for site in _site_dirs())


def test_repo_datasets_folder_is_not_a_package():
    assert not (REPO / "datasets" / "__init__.py").exists()


def test_import_in_process_is_hugging_face():
    import datasets

    assert datasets.__file__ is not None and _is_installed(datasets.__file__), datasets.__file__
    assert hasattr(datasets, "load_dataset")


@pytest.mark.parametrize("extra_env", [{}, {"PYTHONPATH": str(REPO)}])
def test_import_from_repo_root_in_subprocess(extra_env):
    """``python -c`` from the repo root puts it (beside ``datasets/``) first on sys.path."""
    import os

    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=REPO,
        env={**os.environ, **extra_env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    module_file, has_loader = out.stdout.split("\n")[:2]
    assert _is_installed(module_file), module_file
    assert has_loader == "True"
