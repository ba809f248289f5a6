"""The data flow's import rules, checked on the source: task → MAP → method → predictions →
metrics → results → tables, plots, site. Methods never compute metrics or touch files; tasks
never import methods; metrics import neither; nothing imports the CLI; the harness imports the
methods package only to register it (and to find the methods' own studies by their declared
names), never a method's modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import bench_methods

REPO = Path(__file__).resolve().parent.parent
STUDIES = {*bench_methods.PERF_MODULES, bench_methods.FIDELITY_MODULE}  # commands: they write their reports


def _module(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "methods":
        parts[0] = "bench_methods"
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    package = _module(path).split(".") if path.name == "__init__.py" else _module(path).split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            name = ".".join(p for p in (base, node.module or "") if p)
            out.add(name)
            out.update(f"{name}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return out


SOURCES = {_module(p): _imports(p) for folder in ("bench", "methods") for p in sorted((REPO / folder).rglob("*.py"))}


def _offenders(modules: str, forbidden: tuple[str, ...], allowed: set[str] = frozenset()) -> list[str]:
    return sorted(f"{m} imports {name}" for m, names in SOURCES.items()
                  if (m == modules or m.startswith(modules + ".")) and m not in allowed
                  for name in names if any(name == f or name.startswith(f + ".") for f in forbidden))


def test_the_rules_see_the_sources() -> None:
    assert {"bench.runner", "bench.metrics.summary", "bench_methods.regvar.per_input"} <= set(SOURCES)
    assert "bench_methods" in SOURCES["bench.runner"]  # the registration import is seen


@pytest.mark.parametrize(("modules", "forbidden", "allowed"), [
    ("bench", ("bench.cli",), {"bench.__main__"}),
    ("bench_methods", ("bench.cli",), set()),
    ("bench.metrics", ("bench_methods", "bench.tasks", "bench.data", "bench.runner"), set()),
    ("bench.tasks", ("bench_methods",), set()),
    ("bench.data", ("bench_methods",), set()),
    ("bench_methods", ("bench.metrics", "bench.results", "bench.leaderboard", "bench.tables", "bench.site",
                       "bench.plots", "bench.paired"), STUDIES),
    # networks are trained through the fit context (cached and costed); studies read the cache
    ("bench_methods", ("bench.training",), STUDIES),
])
def test_import_rule(modules: str, forbidden: tuple[str, ...], allowed: set[str]) -> None:
    assert _offenders(modules, forbidden, allowed) == []


def test_the_harness_never_imports_a_methods_module() -> None:
    reaching = sorted(f"{m} imports {name}" for m, names in SOURCES.items() if m.startswith("bench")
                      and not m.startswith("bench_methods") for name in names if name.startswith("bench_methods."))
    assert reaching == []


LAPLACE_PRIVATE = {"_glm_predictive_distribution", "_glm_predictive_samples", "_device", "_last_layer_name"}


def test_laplace_torchs_private_api_is_read_in_one_module() -> None:
    readers = sorted({_module(p) for folder in ("bench", "methods") for p in sorted((REPO / folder).rglob("*.py"))
                      for node in ast.walk(ast.parse(p.read_text()))
                      if (isinstance(node, ast.Attribute) and node.attr in LAPLACE_PRIVATE)
                      or (isinstance(node, ast.Constant) and node.value in LAPLACE_PRIVATE)})
    assert readers == ["bench_methods.laplace_private"]  # by name, through one guarded getattr
    adapter = ast.parse((REPO / "methods" / "laplace_private.py").read_text())
    assert {n.value for n in ast.walk(adapter) if isinstance(n, ast.Constant)} >= LAPLACE_PRIVATE


def test_the_installed_laplace_torch_is_in_the_tested_range() -> None:
    from importlib.metadata import version

    import tomllib
    from packaging.requirements import Requirement

    from bench_methods.laplace_private import TESTED_RANGE

    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = next(Requirement(r) for r in dependencies if r.startswith("laplace-torch"))
    assert str(pinned.specifier) == str(Requirement(f"laplace-torch{TESTED_RANGE}").specifier)
    assert pinned.specifier.contains(version("laplace-torch"))


def test_a_laplace_torch_without_the_private_call_names_the_tested_range() -> None:
    from bench.errors import BenchError
    from bench_methods.laplace_private import glm_functional

    with pytest.raises(BenchError, match=r"laplace-torch>=0\.3,<0\.4"):
        glm_functional(object(), None)

