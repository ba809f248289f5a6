"""The ``bench run`` command that writes a run again, made when the run is and kept in its record
(``Provenance.command``): the method and task specs and ``--set`` settings as they were given, with
a ``--plugin PATH/TO/<file>`` for each plugin file that defines the method or the task."""

from __future__ import annotations

import shlex

PLACEHOLDER_DIR = "PATH/TO/"  # where the reader's copy of a plugin file lives


def run_command(method: str, task: str, seed: int, *, smoke: bool = False, device: str = "auto",
                settings: dict[str, str] | None = None, plugins: list[str] | None = None) -> str:
    """The shell command, quoted, that runs ``method`` on ``task`` at ``seed`` with ``settings``."""
    args = ["python", "-m", "bench"]
    for name in dict.fromkeys(plugins or []):
        args += ["--plugin", f"{PLACEHOLDER_DIR}{name}"]
    args += ["run", "--method", method, "--task", task, "--seed", str(seed)]
    args += ["--smoke"] if smoke else []
    args += ["--device", device] if device != "auto" else []
    for key, value in (settings or {}).items():
        args += ["--set", f"{key}={value}"]
    return shlex.join(args)
