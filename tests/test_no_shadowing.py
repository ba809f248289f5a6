"""No folder or file in a working directory may shadow what bench imports.

The repo's top-level ``datasets/`` folder must never shadow Hugging Face ``datasets``, and the built-in
methods (the ``methods/`` folder, installed as ``bench_methods``) must not be replaced by a user's
``methods.py``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

REPO = Path(__file__).resolve().parent.parent

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
    datasets = pytest.importorskip("datasets", reason="Hugging Face datasets is a test extra")

    assert datasets.__file__ is not None and _is_installed(datasets.__file__), datasets.__file__
    assert hasattr(datasets, "load_dataset")


@pytest.mark.parametrize("extra_env", [{}, {"PYTHONPATH": str(REPO)}])
def test_import_from_repo_root_in_subprocess(extra_env):
    """``python -c`` from the repo root puts it (beside ``datasets/``) first on sys.path."""
    pytest.importorskip("datasets", reason="Hugging Face datasets is a test extra")

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


def _bench_list(cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bench", "list"], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})


@pytest.mark.slow
def test_methods_py_in_working_directory_changes_nothing(tmp_path: Path) -> None:
    """A user's ``methods.py`` (or ``methods/``) is never imported in place of the built-in methods."""
    (tmp_path / "methods.py").write_text("print('SHADOWED')\nraise SystemExit(7)\n")
    here, home = _bench_list(tmp_path), _bench_list(REPO)
    assert home.returncode == 0, home.stderr
    assert here.returncode == 0, here.stderr
    assert "SHADOWED" not in here.stdout + here.stderr
    assert here.stdout == home.stdout
    assert "method  map " in here.stdout and "method  laplace " in here.stdout


def test_nothing_imports_the_bare_methods_name() -> None:
    """Every importer uses ``bench_methods`` (or a relative import inside it); ``methods`` may be shadowed."""
    bare = re.compile(r"^\s*(from\s+methods[\s.]|import\s+methods\b)", re.M)
    offenders = [str(path.relative_to(REPO)) for folder in ("bench", "methods", "tests", "scripts")
                 for path in (REPO / folder).rglob("*.py") if bare.search(path.read_text())]
    assert offenders == []


@pytest.mark.skipif(tomllib is None, reason="tomllib is Python 3.11+")
def test_pyproject_lists_every_package_folder() -> None:
    """``packages`` is an explicit list (it maps ``bench_methods``), so a new sub-package must be added to it."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {".".join(init.parent.relative_to(REPO).parts) for init in (REPO / "bench").rglob("__init__.py")}
    methods = {".".join(("bench_methods", *init.parent.relative_to(REPO / "methods").parts))
               for init in (REPO / "methods").rglob("__init__.py")}
    assert set(config["packages"]) == folders | methods and "bench_methods.regvar" in methods
    assert config["package-dir"] == {"bench_methods": "methods"}
