"""``bench sweep --engine ray``: same results as the local engine, on a real two-node Ray cluster
started here, with a worker node killed mid-sweep."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO, TINY_TASK, run_cli

from bench.cli import main
from bench.errors import BenchError

pytestmark = pytest.mark.slow  # a Ray cluster per test

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install -e '.[ray]'")
RAY = str(Path(sys.executable).with_name("ray"))
ONE_THREAD = {"OMP_NUM_THREADS": "1"}

NAP_METHOD = '''
import os, time
from pathlib import Path
from bench_methods.map import MAP
from bench.method_api import register_method

@register_method("nap-map")
class NapMap(MAP):
    """The MAP, after marking which process runs it and sleeping, so that a node can die meanwhile."""
    def fit(self, ctx):
        Path(os.environ["NAP_DIR"], str(os.getpid())).write_text("")
        time.sleep(float(os.environ.get("NAP_S", "4")))
        super().fit(ctx)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Ray's fixed default ports (the client server's 10001, the dashboard agent's 52365, ...) would make a
# node fail to start while any earlier node's process still holds one: every node gets its own.
NODE_PORT_FLAGS = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                   "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port")


def _node(*args: str, env: dict[str, str]) -> subprocess.Popen:
    """A Ray node in its own session (``--block``: it lives as long as this process group), on free ports;
    its output goes to ``node-<pid>.log`` in the temp dir, for the failure message."""
    ports = [f"{flag}={_free_port()}" for flag in NODE_PORT_FLAGS]
    if "--head" in args:
        ports.append(f"--ray-client-server-port={_free_port()}")
    log = tempfile.NamedTemporaryFile("w", prefix="ray-node-", suffix=".log", dir="/tmp", delete=False)
    node = subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", *args, *ports], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    NODE_LOGS[node.pid] = Path(log.name)
    return node


NODE_LOGS: dict[int, Path] = {}


def _kill(node: subprocess.Popen) -> None:
    """The node's process group, and any process of its session that left the group."""
    import psutil

    for process in psutil.process_iter():
        try:
            if process.pid != node.pid and os.getsid(process.pid) == node.pid:
                process.kill()
        except (psutil.Error, ProcessLookupError, PermissionError):
            pass
    try:
        os.killpg(node.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    node.wait(30)
    log = NODE_LOGS.pop(node.pid, None)
    if log is not None:
        log.unlink(missing_ok=True)


def _metrics(out: Path) -> dict[str, dict]:
    return {str(p.relative_to(out)): json.loads(p.read_text())["metrics"] for p in sorted(out.rglob("seed*.json"))}


def test_without_ray_the_flag_is_one_line_and_exit_2(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails
    code = main(["--plugin", str(TINY_TASK), "sweep", "--engine", "ray", "--methods", "map", "--tasks", "tiny-digits",
                 "--seeds", "0", "--smoke", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and 'pip install -e ".[ray]"' in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups and Ray's node CLI")
def test_cluster_sweep_survives_a_killed_worker_node_and_matches_the_local_engine(tmp_path: Path) -> None:
    plugin = tmp_path / "nap.py"
    plugin.write_text(NAP_METHOD)
    naps = tmp_path / "naps"
    naps.mkdir()
    port = _free_port()
    env = {**os.environ, **ONE_THREAD, "NAP_DIR": str(naps), "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    short = tempfile.mkdtemp(prefix="bray", dir="/tmp")  # Ray's socket paths must stay under 108 characters
    head = _node("--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false", f"--temp-dir={short}",
                 env=env)
    worker = None
    try:
        _wait_for_cpus(port, 1, env)
        worker = _node(f"--address=127.0.0.1:{port}", "--num-cpus=2", env=env)
        _wait_for_cpus(port, 3, env)
        grid = ["--plugin", str(TINY_TASK), "--plugin", str(plugin), "sweep", "--methods", "nap-map,laplace-ll",
                "--tasks", "tiny-digits", "--seeds", "0,1,2", "--smoke", "--quiet"]
        sweep = subprocess.Popen([sys.executable, "-m", "bench", *grid, "--engine", "ray",
                                  "--address", f"127.0.0.1:{port}", "--out", str(tmp_path / "ray-out")],
                                 env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 240
        while time.time() < deadline and sweep.poll() is None:  # a nap running on the worker node
            on_worker = [p for p in naps.iterdir() if _session(int(p.name)) == worker.pid]
            if on_worker:
                _kill(worker)
                break
            time.sleep(0.2)
        else:
            sweep.kill()
            pytest.fail(f"no run reached the worker node: {sweep.communicate()[1][-1000:]}")
        out, err = sweep.communicate(timeout=600)
        assert sweep.returncode == 0, err[-2000:]
        assert "sweep finished: 6 run(s) done" in out
    finally:
        if worker is not None:
            _kill(worker)
        _kill(head)
        shutil.rmtree(short, ignore_errors=True)
    ray_out = tmp_path / "ray-out"
    leftovers = [p for p in ray_out.rglob("*") if ".claims" not in p.parts  # claims: released lock files
                 and (p.name.endswith(".tmp") or p.name.startswith("."))]
    assert not leftovers
    assert len(list(ray_out.rglob("seed*.json"))) == 6 and len(list(ray_out.rglob("seed*.npz"))) == 6
    local = run_cli(*grid, "--out", str(tmp_path / "local-out"), env={**ONE_THREAD, "NAP_DIR": str(naps), "NAP_S": "0"})
    assert local.returncode == 0, local.stderr
    assert _metrics(ray_out) == _metrics(tmp_path / "local-out")  # same metrics as the local engine
    assert main(["table", "--results", str(ray_out)]) == 0  # every JSON's metrics recompute from its npz


def _kill_driver(sweep: subprocess.Popen) -> None:
    """SIGKILL the sweep's Ray driver (its spawned child), as Ray does to a driver whose node died."""
    import psutil

    (driver,) = [p for p in psutil.Process(sweep.pid).children() if "spawn_main" in " ".join(p.cmdline())]
    driver.kill()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups and Ray's node CLI")
@pytest.mark.parametrize("lose", ["head", "driver"])
def test_a_cluster_lost_mid_sweep_keeps_finished_runs_and_records_the_lost_ones(tmp_path: Path, lose: str) -> None:
    """The head killed (the driver notices, or Ray ends it), or the driver ended by Ray outright."""
    plugin = tmp_path / "nap.py"
    plugin.write_text(NAP_METHOD)
    naps = tmp_path / "naps"
    naps.mkdir()
    port = _free_port()
    env = {**os.environ, **ONE_THREAD, "NAP_DIR": str(naps), "NAP_S": "600", "PYTHONPATH": str(REPO),
           "RAY_AUTH_MODE": "disabled"}
    short = tempfile.mkdtemp(prefix="bray", dir="/tmp")
    head = _node("--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false", f"--temp-dir={short}",
                 env=env)
    out = tmp_path / "out"
    grid = ["--plugin", str(TINY_TASK), "--plugin", str(plugin), "sweep", "--methods", "map,nap-map",
            "--tasks", "tiny-digits", "--seeds", "0", "--smoke", "--quiet", "--out", str(out)]
    finished = out / "runs" / "tiny-digits@smoke" / "map" / "seed0.json"
    try:
        _wait_for_cpus(port, 2, env)
        sweep = subprocess.Popen([sys.executable, "-m", "bench", *grid, "--engine", "ray", "--address",
                                  f"127.0.0.1:{port}"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 240
        while time.time() < deadline and sweep.poll() is None and not (finished.exists() and any(naps.iterdir())):
            time.sleep(0.2)
        assert sweep.poll() is None, sweep.communicate()[1][-2000:]
        if lose == "head":
            _kill(head)  # the head and its node's workers, the napping run among them
        else:
            _kill_driver(sweep)
        killed = time.time()
        stdout, stderr = sweep.communicate(timeout=120)
    finally:
        _kill(head)
        shutil.rmtree(short, ignore_errors=True)
    assert time.time() - killed < 60 and sweep.returncode == 1, stderr[-2000:]
    # the driver noticed (its head check) or Ray ended it and the sweep did: either way the run is named
    assert "nap-map / tiny-digits / seed 0: ClusterLost: " in stdout, stdout + stderr[-3000:]
    lost = json.loads((out / "runs" / "tiny-digits@smoke" / "nap-map" / "seed0.failed.json").read_text())
    assert lost["status"] == "failed" and lost["error"].startswith("ClusterLost: ")
    assert main(["table", "--results", str(out)]) == 0  # the finished run is intact
    again = run_cli(*grid, env={**ONE_THREAD, "NAP_DIR": str(naps), "NAP_S": "0"})  # claims were released
    assert again.returncode == 0, again.stderr
    assert "1 skipped as already done" in again.stdout


def _wait_for_cpus(port: int, cpus: int, env: dict[str, str], timeout: float = 180) -> None:
    """Until the cluster at ``port`` counts ``cpus`` CPUs (nodes start slowly on a busy machine)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = subprocess.run([RAY, "status", f"--address=127.0.0.1:{port}"], env=env,
                                capture_output=True, text=True)
        if f"/{cpus}.0 CPU" in status.stdout:
            return
        time.sleep(1)
    logs = "\n".join(f"{path.name}: {path.read_text()[-1500:]}" for path in NODE_LOGS.values() if path.exists())
    pytest.fail(f"the Ray cluster never reached {cpus} CPUs; ray status: {status.stdout[-500:]}"
                f"{status.stderr[-1500:]}\nnode output:\n{logs}")


def _session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except ProcessLookupError:
        return None


@pytest.mark.parametrize(("address", "needle"), [
    ("127.0.0.1:1", "cannot reach a Ray cluster at 127.0.0.1:1"),
    ("not a host", "bad --address 'not a host'"),
    ("auto", "no Ray cluster is running"),
])
def test_an_address_ray_could_not_join_is_one_line_within_seconds(address, needle, monkeypatch, tmp_path) -> None:
    from bench import ray_engine

    monkeypatch.setattr(ray_engine, "CURRENT_CLUSTER", tmp_path / "no-cluster")
    started = time.perf_counter()
    with pytest.raises(BenchError, match=re.escape(needle)) as err:
        ray_engine.check_address(address)
    assert "\n" not in str(err.value) and time.perf_counter() - started < 60


def test_a_sweep_at_an_unreachable_address_ends_in_one_line_and_exit_2(tmp_path, capsys) -> None:
    started = time.perf_counter()
    code = main(["--plugin", str(TINY_TASK), "sweep", "--engine", "ray", "--address", "127.0.0.1:1", "--tasks",
                 "tiny-digits", "--methods", "map", "--seeds", "0", "--out", str(tmp_path), "--smoke"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "cannot reach a Ray cluster at 127.0.0.1:1" in err
    assert time.perf_counter() - started < 60 and not (tmp_path / "runs").exists()
