"""``bench sweep``: resume, recorded failures, parallel workers and interruption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_TASK, run_cli

from bench.cli import main
from bench.method_api import METHODS

pytestmark = pytest.mark.slow  # spawned sweeps

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
    run_dir = out / "runs" / "tiny-digits@smoke" / "always-fails"
    assert not (run_dir / "seed0.json").exists()  # a failure is recorded beside, never as the result
    failed = json.loads((run_dir / "seed0.failed.json").read_text())
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
    # A shell's background job (`pytest ... &`) starts with SIGINT ignored, which children inherit:
    # give the sweep the default handler, as in a terminal, so that Ctrl-C is what is tested.
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.default_int_handler))
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


# --- Failures stop up front, keep good results, and take the workers with them -----------

def _one_line(code: int, err: str, needle: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("bench: error: ") and needle in lines[0], err


@pytest.mark.parametrize("args,needle", [
    (("--seeds", ""), "--seeds is empty"),
    (("--seeds", " , "), "--seeds is empty"),
    (("--seeds", "0,1,0"), "lists seed 0 more than once"),
    (("--seeds", "-2"), "bad seed -2"),
    (("--seeds", str(2**63)), f"bad seed {2**63}"),
    (("--device", "meta"), "bad --device 'meta'"),
])
def test_bad_grid_options_are_one_line_before_any_run(args, needle, tmp_path: Path, capsys) -> None:
    code = main(["--plugin", str(TINY_TASK), "sweep", "--tasks", "tiny-digits", "--methods", "map",
                 "--out", str(tmp_path), "--smoke", "--quiet", *args])
    _one_line(code, capsys.readouterr().err, needle)
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_stops_before_the_grid(tmp_path: Path, capsys) -> None:
    code = main(["--plugin", str(TINY_TASK), "sweep", "--tasks", "tiny-digits", "--methods", "map,map-ts",
                 "--seeds", "0,1", "--out", str(tmp_path), "--smoke", "--quiet", "--device", "cuda"])
    _one_line(code, capsys.readouterr().err, "no CUDA GPU is visible")
    assert not (tmp_path / "runs").exists()  # not one failed record per grid cell


def test_unwritable_out_stops_before_the_grid(tmp_path: Path, read_only, capsys) -> None:
    blocked = read_only(tmp_path / "ro")
    code = main(["--plugin", str(TINY_TASK), "sweep", "--tasks", "tiny-digits", "--methods", "map",
                 "--seeds", "0", "--out", str(blocked), "--smoke", "--quiet"])
    _one_line(code, capsys.readouterr().err, f"cannot write {blocked}/runs")


FLAKY_METHOD = '''
import os
from bench.method_api import register_method
from bench_methods.map import MAP

@register_method("flaky")
class Flaky(MAP):
    """MAP that fails while FLAKY_FAIL is set (a rerun that breaks)."""
    def fit(self, ctx):
        if os.environ.get("FLAKY_FAIL"):
            raise RuntimeError("flaky broke on the rerun")
        super().fit(ctx)
'''


def test_failed_force_rerun_keeps_the_good_result(tmp_path: Path, monkeypatch, capsys) -> None:
    plugin = tmp_path / "flaky.py"
    plugin.write_text(FLAKY_METHOD)
    out = tmp_path / "out"
    argv = ["--plugin", str(TINY_TASK), "--plugin", str(plugin), "sweep", "--tasks", "tiny-digits",
            "--methods", "flaky", "--seeds", "0", "--out", str(out), "--smoke", "--quiet"]
    assert main(argv) == 0
    run_dir = out / "runs" / "tiny-digits@smoke" / "flaky"
    good = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    assert set(good) == {"seed0.json", "seed0.npz"}
    monkeypatch.setenv("FLAKY_FAIL", "1")
    assert main([*argv, "--force"]) == 1
    assert "flaky / tiny-digits / seed 0: RuntimeError: flaky broke on the rerun" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.name != "seed0.failed.json"} == good
    failure = json.loads((run_dir / "seed0.failed.json").read_text())
    assert failure["status"] == "failed" and "flaky broke" in failure["error"]
    assert main(["table", "--results", str(out)]) == 0  # the good result is in the table, the failure listed
    md = (out / "leaderboard.md").read_text()
    assert "| flaky " in md and "flaky broke on the rerun (the earlier result is kept)" in md
    assert main(argv) == 1  # a plain sweep retries a recorded failure (still failing here) ...
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.name != "seed0.failed.json"} == good
    monkeypatch.delenv("FLAKY_FAIL")
    assert main(argv) == 0  # ... and a successful retry replaces the result and clears the failure
    assert sorted(p.name for p in run_dir.iterdir()) == ["seed0.json", "seed0.npz"]
    capsys.readouterr()
    assert main(argv) == 0 and "0 run(s) done in 0 s, 1 skipped as already done" in capsys.readouterr().out


def test_a_failure_that_cannot_be_recorded_is_reported_not_a_crash(tmp_path: Path, capsys) -> None:
    plugin = tmp_path / "failing.py"
    plugin.write_text(FAILING_METHOD)
    out = tmp_path / "out"
    (out / "runs" / "tiny-digits@smoke" / "always-fails" / "seed0.failed.json").mkdir(parents=True)
    code = main(["--plugin", str(TINY_TASK), "--plugin", str(plugin), "sweep", "--tasks", "tiny-digits",
                 "--methods", "always-fails", "--seeds", "0", "--out", str(out), "--smoke", "--quiet"])
    assert code == 1
    captured = capsys.readouterr()
    assert "broken on purpose (and the failure was not recorded: cannot write" in captured.out
    assert "Traceback" not in captured.err


def _slow_sweep(tmp_path: Path, methods: str, seeds: str, jobs: str, **popen: object
                ) -> tuple[subprocess.Popen, Path, Path]:
    """A sweep with the sleeping plugin method, started in the background; returns once a slow
    run's process has written its pid (the process, the results folder, the pid file)."""
    plugin = tmp_path / "slow.py"
    plugin.write_text(SLOW_METHOD)
    out, pid_file = tmp_path / "out", tmp_path / "slow.pid"
    cmd = [sys.executable, "-m", "bench", "--plugin", str(TINY_TASK), "--plugin", str(plugin), "sweep",
           "--tasks", "tiny-digits", "--methods", methods, "--seeds", seeds, "--smoke", "--jobs", jobs,
           "--out", str(out), "--quiet"]
    env = {**os.environ, "SLOW_PID_FILE": str(pid_file)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, **popen)
    deadline = time.monotonic() + 240
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pid_file.exists(), "the slow run did not start"
    return proc, out, pid_file


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and uses pgrep")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killing_the_sweep_alone_ends_its_workers(sig: signal.Signals, tmp_path: Path) -> None:
    """Only the sweep's own PID is signalled (not its process group): its workers must follow it
    instead of finishing runs unseen and then waiting forever on a pipe."""
    proc, out, pid_file = _slow_sweep(tmp_path, "slow", "0,1", "2", stdout=subprocess.DEVNULL,
                                      start_new_session=True)
    workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                              text=True).stdout.split()]
    assert int(pid_file.read_text()) in workers
    proc.send_signal(sig)
    proc.wait(timeout=30)
    assert proc.returncode == -sig
    deadline = time.monotonic() + 15
    alive = set(workers)
    while alive and time.monotonic() < deadline:
        alive = {w for w in alive if _alive(w)}
        time.sleep(0.2)
    assert not alive, f"sweep workers {sorted(alive)} still run after the sweep was killed with {sig.name}"
    assert not (out / "runs" / "tiny-digits@smoke" / "slow").exists()
    assert not list(out.rglob("*.tmp"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")
def test_a_killed_run_is_recorded_as_failed_and_the_sweep_goes_on(tmp_path: Path) -> None:
    """SIGKILL of one run's process (what the out-of-memory killer does): the sweep records that
    run as failed with its cause and still runs the next one."""
    proc, out, pid_file = _slow_sweep(tmp_path, "slow,map", "0", "1", stdout=subprocess.PIPE, text=True)
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    assert "Traceback" not in stderr and "EOFError" not in stderr, stderr
    failed = json.loads((out / "runs" / "tiny-digits@smoke" / "slow" / "seed0.failed.json").read_text())
    assert failed["status"] == "failed" and "exit code -9" in failed["error"]
    assert (out / "runs" / "tiny-digits@smoke" / "map" / "seed0.json").exists(), "the sweep stopped at the killed run"
    assert proc.returncode == 1


def _alive(pid: int) -> bool:
    """Running (a zombie, reaped by init once its parent is gone, counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_runs_another_sweep_finished_meanwhile_are_skipped_not_rerun(monkeypatch, tmp_path: Path) -> None:
    """Two sweeps into one folder share the work: a run is checked again just before it starts."""
    from bench import sweep
    from bench.runner import RunConfig

    todo = [RunConfig(method="map", task="tiny-digits", seed=s, out=tmp_path) for s in range(3)]
    monkeypatch.setattr(sweep, "is_done", lambda config: config.seed != 1)
    started = []
    monkeypatch.setattr(sweep, "_child", lambda config, *rest: started.append(config.seed))

    class FakeProcess:  # runs the (patched) child inline and reports it ended with a result
        def __init__(self, target, args):
            target(*args)
            self.sentinel, self.exitcode = None, 0
            args[4].send((None, 1.0))  # (config, plugins, threads, parent, conn, skip_done)

        def start(self):
            pass

        def join(self, timeout=None):
            pass

        def is_alive(self):
            return False

        def terminate(self):
            pass

    import multiprocessing

    context = multiprocessing.get_context("spawn")
    monkeypatch.setattr(context, "Process", FakeProcess, raising=False)
    monkeypatch.setattr(multiprocessing, "get_context", lambda kind: context)
    monkeypatch.setattr("multiprocessing.connection.wait", lambda objects, timeout=None: objects)
    with sweep._in_fresh_processes(todo, 1, [], quiet=True) as results:
        finished = list(results)
    assert started == [1]
    assert sorted(finished) == [(0, (None, 0.0)), (1, (None, 1.0)), (2, (None, 0.0))]
    with sweep._in_fresh_processes(todo, 1, [], quiet=True, skip_done=False) as results:
        assert len(list(results)) == 3 and started == [1, 0, 1, 2]


def test_a_spec_with_several_options_is_one_name_in_the_grid() -> None:
    from bench.sweep import _names

    text = "map, regvar-amortized(optimizer=adam,steps=25,batch_size=16),mc-dropout(samples=8)"
    assert _names(text, METHODS, "method") == [
        "map", "regvar-amortized(optimizer=adam,steps=25,batch_size=16)", "mc-dropout(samples=8)"]


def test_a_run_claimed_by_another_sweep_is_skipped_and_said_so(tmp_path: Path) -> None:
    """Sweeps into one folder never run a run twice: one that another process holds is skipped."""
    from bench.claims import claimed
    from bench.plugins import load_plugins
    from bench.runner import RunConfig, result_paths

    load_plugins([str(TINY_TASK)])

    json_path, _ = result_paths(RunConfig(method="map", task="tiny-digits", seed=0, out=tmp_path, smoke=True))
    with claimed(tmp_path, json_path) as mine:
        assert mine
        busy = _sweep(tmp_path, "--methods", "map", "--seeds", "0")
    assert busy.returncode == 0, busy.stderr
    assert "SKIPPED map on tiny-digits seed 0: running in another sweep" in busy.stderr
    assert not json_path.exists()
    free = _sweep(tmp_path, "--methods", "map", "--seeds", "0")
    assert free.returncode == 0 and json_path.exists()


def test_a_json_and_npz_that_do_not_belong_together_are_rerun_not_counted_done(tmp_path: Path) -> None:
    first = _sweep(tmp_path, "--methods", "map", "--seeds", "0,1")
    assert first.returncode == 0, first.stderr
    npz0, npz1 = sorted(tmp_path.rglob("seed*.npz"))
    npz0.write_bytes(npz1.read_bytes())  # a readable npz, but not the one seed 0's JSON was written with
    again = _sweep(tmp_path, "--methods", "map", "--seeds", "0,1")
    assert again.returncode == 0, again.stderr
    assert "damaged result of map on tiny-digits seed 0" in again.stderr
    assert "1 already done, 1 to run" in again.stderr
    from bench.results import intact_pair

    assert intact_pair(npz0.with_suffix(".json"), npz0) is not None
