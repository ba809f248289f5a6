"""A run is claimed before it starts, so sweeps into one ``--out`` never run it twice.

The claim is an OS file lock (``filelock``) under ``<out>/.claims/``, held for the run's whole
length by the process that runs it (a local sweep's run process, or a Ray sweep's driver) and
released by the OS if that process dies, so a killed sweep leaves no stale claim. A second sweep
that finds a run claimed skips it and says so; one that gets the claim first checks again that
the run is not already done (another sweep may have finished it in between). Ray drivers on
different machines share claims only where the filesystem of ``--out`` honours POSIX locks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

CLAIMED = "running in another sweep into the same --out (claimed there); not run here"


def claim_path(out: Path, json_path: Path) -> Path:
    """Where the claim of the run written to ``json_path`` (under ``out/runs``) is held."""
    relative = json_path.relative_to(out / "runs") if json_path.is_relative_to(out / "runs") else json_path.name
    return out / ".claims" / Path(relative).with_suffix(".lock")


@contextmanager
def claimed(out: Path, json_path: Path) -> Iterator[bool]:
    """Hold the run's claim for the block; yields False (holding nothing) when another process
    holds it."""
    path = claim_path(out, json_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()
