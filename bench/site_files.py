"""Writing a built site into its folder and checking a folder against a build. ``MANIFEST.txt``
(sha256sum format) marks a folder as a site: only such a folder has stale files removed."""

from __future__ import annotations

import hashlib
from pathlib import Path

from bench.errors import BenchError
from bench.results import atomic_write_bytes

MANIFEST = "MANIFEST.txt"


def manifest(files: dict[str, bytes]) -> bytes:
    """``sha256  path`` per file (``sha256sum -c`` reads it); its presence marks a site folder."""
    return "".join(f"{hashlib.sha256(data).hexdigest()}  {path}\n" for path, data in sorted(files.items())).encode()


SCREENSHOTS = "screenshots"
"""A folder of the site that builds leave alone: pictures of its pages taken in a browser
(``scripts/screenshot_site.py``), which no build can reproduce byte for byte."""


def _present(out: Path) -> set[str]:
    if not out.is_dir():
        return set()
    found = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() or p.is_symlink()}
    return {p for p in found if not p.startswith(f"{SCREENSHOTS}/")}


def ensure_site_folder(out: Path) -> None:
    """Refuse a non-empty folder that an earlier build did not make: writing the site removes
    every file in its folder that the build does not produce."""
    if out.exists() and not out.is_dir():
        raise BenchError(f"{out} is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise BenchError(f"{out} is not empty and holds no {MANIFEST} of an earlier site build; "
                         "choose a new or empty folder (--out)")


def write_site(files: dict[str, bytes], out: Path) -> None:
    """Write the changed files atomically (the manifest last), then remove the files of an
    earlier build that this one no longer produces, and folders left empty."""
    ensure_site_folder(out)
    for path, data in sorted(files.items(), key=lambda item: item[0] == MANIFEST):
        target = out / path
        if not target.is_file() or target.read_bytes() != data:
            atomic_write_bytes(target, data)
    for path in sorted(_present(out) - files.keys()):
        (out / path).unlink()
    for folder in sorted((p for p in out.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        if not any(folder.iterdir()):
            folder.rmdir()


def check_site(files: dict[str, bytes], out: Path) -> list[str]:
    """What differs between ``out`` and a fresh build, by path: missing, different or extra files."""
    problems = {}
    for path, data in files.items():
        target = out / path
        if not target.is_file():
            problems[path] = f"{target} is missing"
        elif target.read_bytes() != data:
            problems[path] = f"{target} differs from what the run files give"
    for path in _present(out) - files.keys():
        problems[path] = f"{out / path} is not part of the site"
    return [problems[p] for p in sorted(problems)]
