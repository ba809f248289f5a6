"""Sweep workers end when their parent does, however the parent ends (SIGKILL included).

A spawned worker of a killed sweep would otherwise finish its run, write it unseen, then wait
forever for work on a pipe nobody feeds. Two mechanisms, because either alone has a gap:

- Linux: ``prctl(PR_SET_PDEATHSIG, SIGTERM)``, so the kernel signals the worker the moment its
  parent dies;
- everywhere: a daemon thread that polls ``os.getppid()`` once a second (a changed parent means
  the original one is gone) and signals the worker itself.

SIGTERM inside a run raises :class:`ParentGone`, so the run unwinds (temp files removed, file
locks released, nothing half-written) and the worker then exits at once with status 143; outside
a run the worker exits at once. If unwinding takes longer than ``GRACE_S``, the thread exits
the process anyway.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
PR_SET_PDEATHSIG = 1
POLL_S = 1.0
GRACE_S = 20.0
EXIT_CODE = 128 + signal.SIGTERM

_in_run = False


class ParentGone(BaseException):
    """Raised in a worker's run when its sweep has ended; not an ``Exception``, so no run
    records it as a failure."""


def _on_sigterm(signum: int, frame: Any) -> None:
    if _in_run:
        raise ParentGone
    os._exit(EXIT_CODE)


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(POLL_S)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(GRACE_S)
    os._exit(EXIT_CODE)


def install(parent: int) -> None:
    """Tie this process's life to ``parent`` (the sweep's pid, passed from the parent: if it
    has already died, ``os.getppid()`` differs and the worker stops at once)."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the polling thread still covers it
    threading.Thread(target=_watch, args=(parent,), name="bench-lifeline", daemon=True).start()


def guarded(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` as a run that SIGTERM interrupts by unwinding, then ends the process."""
    global _in_run
    _in_run = True
    try:
        return fn(*args)
    except ParentGone:
        os._exit(EXIT_CODE)
    finally:
        _in_run = False
