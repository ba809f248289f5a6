"""``bench sweep``: resume, recorded failures, parallel workers and interruption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO, TINY_TASK, run_cli

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # same threads in both arms, so metrics compare exactly

FAILING_METHOD = '''
from bench.method_api import Method, register_method

@register_method("always-fails")
class AlwaysFails(Method):
    """Raises in fit, to test that a sweep records failures and goes on."""
    def fit(self, ctx):
        raise RuntimeError("broken on purpose")
    def predict(self, x):
        raise AssertionError("unreachable")
'''

SLOW_METHOD = '''
import os, time
from pathlib import Path
from bench.method_api import Method, register_method

@register_method("slow")
class Slow(Method):
    """Sleeps in fit (writes its pid first), to be interrupted."""
    def fit(self, ctx):
        Path(os.environ["SLOW_PID_FILE"]).write_text(str(os.getpid()))
        time.sleep(120)
    def predict(self, x):
        raise AssertionError("unreachable")
'''


def _sweep(out: Path, *args: str, plugins: tuple[Path, ...] = (TINY_TASK,), env: dict | None = None):
    flags = [a for p in plugins for a in ("--plugin", str(p))]
    return run_cli(*flags, "sweep", "--tasks", "tiny-digits", "--out", str(out), "--smoke", *args, env=env)


def _metrics(out: Path) -> dict[str, dict]:
    return {str(p.relative_to(out)): json.loads(p.read_text())["metrics"] for p in sorted(out.rglob("seed*.json"))}


def test_rerun_skips_finished_runs(tmp_path: Path) -> None:
    first = _sweep(tmp_path, "--methods", "map,map-ts", "--seeds", "0,1")
    assert first.returncode == 0, first.stderr
    assert "4 run(s) done" in first.stdout
    files = sorted(tmp_path.rglob("seed*.json"))
    assert len(files) == 4
    stamps = [f.stat().st_mtime_ns for f in files]
    again = _sweep(tmp_path, "--methods", "map,map-ts", "--seeds", "0,1")
    assert again.returncode == 0, again.stderr
    assert "4 already done, 0 to run" in again.stderr
    assert [f.stat().st_mtime_ns for f in files] == stamps  # nothing redone


def test_failed_run_is_recorded_and_the_sweep_goes_on(tmp_path: Path) -> None:
    plugin = tmp_path / "failing.py"
    plugin.write_text(FAILING_METHOD)
    out = tmp_path / "out"
    result = _sweep(out, "--methods", "always-fails,map", "--seeds", "0", plugins=(TINY_TASK, plugin))
    assert result.returncode == 1
    assert "1 run(s) failed" in result.stdout
    assert "always-fails / tiny-digits / seed 0: RuntimeError: broken on purpose" in result.stdout
    failed = json.loads((out / "runs" / "tiny-digits@smoke" / "always-fails" / "seed0.json").read_text())
    assert failed["status"] == "failed" and "broken on purpose" in failed["error"]
    ok = json.loads((out / "runs" / "tiny-digits@smoke" / "map" / "seed0.json").read_text())
    assert ok["status"] == "ok"
    # A failed run is not "done": the next sweep tries it again.
    rerun = _sweep(out, "--methods", "always-fails,map", "--seeds", "0", plugins=(TINY_TASK, plugin))
    assert "1 already done, 1 to run" in rerun.stderr


def test_parallel_workers_give_the_same_results_as_one_process(tmp_path: Path) -> None:
    args = ("--methods", "map,map-ts,mc-dropout", "--seeds", "0,1")
    serial = _sweep(tmp_path / "serial", *args, "--jobs", "1", env=ONE_THREAD)
    parallel = _sweep(tmp_path / "parallel", *args, "--jobs", "2", env=ONE_THREAD)
    assert serial.returncode == 0, serial.stderr
    assert parallel.returncode == 0, parallel.stderr  # the task plugin reached the spawned workers
    assert "6 to run, 2 at a time" in parallel.stderr
    a, b = _metrics(tmp_path / "serial"), _metrics(tmp_path / "parallel")
    assert len(a) == 6 and a == b


def test_bad_jobs_is_a_one_line_error(tmp_path: Path) -> None:
    result = _sweep(tmp_path, "--methods", "map", "--seeds", "0", "--jobs", "0")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "bench: error: bad --jobs 0; give the number of runs to execute at once (1 or more)"
    ]


def test_interrupted_parallel_sweep_keeps_finished_runs_and_stops_its_workers(tmp_path: Path) -> None:
    plugin = tmp_path / "slow.py"
    plugin.write_text(SLOW_METHOD)
    out, pid_file = tmp_path / "out", tmp_path / "slow.pid"
    cmd = [sys.executable, "-m", "bench", "--plugin", str(TINY_TASK), "--plugin", str(plugin), "sweep",
           "--tasks", "tiny-digits", "--methods", "slow,map", "--seeds", "0", "--smoke", "--jobs", "2",
           "--out", str(out)]
    env = {**os.environ, "SLOW_PID_FILE": str(pid_file)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finished = out / "runs" / "tiny-digits@smoke" / "map" / "seed0.json"
    deadline = time.monotonic() + 240
    while not (finished.exists() and pid_file.exists()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert finished.exists() and pid_file.exists(), "the map run did not finish or the slow run did not start"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "interrupted; nothing partial was written" in stderr
    assert "leaked semaphore" not in stderr and "Traceback" not in stderr, stderr
    assert json.loads(finished.read_text())["status"] == "ok"
    assert not (out / "runs" / "tiny-digits@smoke" / "slow").exists()
    assert not list(out.rglob("*.tmp"))
    worker = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"sweep worker {worker} still runs after the sweep was interrupted")
