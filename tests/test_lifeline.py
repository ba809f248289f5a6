"""A process tied to its parent with ``bench.lifeline`` ends when the parent is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

# parent.py starts child.py and sleeps; child.py ties itself to the parent, then "runs":
# it creates a temp file and removes it in a finally block, the way bench's atomic writes do.
PARENT = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, sys.argv[1], sys.argv[2], str(os.getpid())])
time.sleep(600)
"""
CHILD = """
import os, sys, time
from pathlib import Path
from bench import lifeline

work = Path(sys.argv[1])
lifeline.install(int(sys.argv[2]))

def run():
    tmp = work / "partial.tmp"
    tmp.write_text("")
    try:
        (work / "child.pid").write_text(str(os.getpid()))
        time.sleep(600)
    finally:
        tmp.unlink()
        (work / "unwound").write_text("")

lifeline.guarded(run)
"""


def _wait(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
    except OSError:  # no /proc: fall back to a signal probe
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_child_unwinds_and_exits_when_its_parent_is_killed(sig: signal.Signals, tmp_path: Path) -> None:
    (tmp_path / "child.py").write_text(textwrap.dedent(CHILD))
    (tmp_path / "parent.py").write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(tmp_path / "parent.py"), str(tmp_path / "child.py"),
                               str(tmp_path)])
    try:
        assert _wait(lambda: (tmp_path / "child.pid").exists(), 60), "the child did not start"
        child = int((tmp_path / "child.pid").read_text())
        parent.send_signal(sig)
        parent.wait(timeout=10)
        assert _wait(lambda: _gone(child), 15), "the child outlived its parent"
        assert (tmp_path / "unwound").exists()  # its finally blocks ran: no temp file left
        assert not (tmp_path / "partial.tmp").exists()
    finally:
        parent.kill()


def test_guarded_returns_the_value_when_nothing_happens() -> None:
    from bench import lifeline

    assert lifeline.guarded(lambda a, b: a + b, 2, 3) == 5
