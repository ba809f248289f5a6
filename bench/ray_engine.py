"""``bench sweep --engine ray``: the grid's runs as Ray tasks, on one machine or a cluster.

Each run is one Ray task that declares its resources (one CPU, and one GPU when the run asks for
``--device cuda``) and is retried by Ray when its worker or node dies (``MAX_RETRIES``); an
exception inside the run is not retried but recorded as the run's failure, as locally. The task
returns the run's record and prediction arrays to the driver, which writes them (one atomic
JSON + npz, exactly as a local run), so the nodes need not share a filesystem for results.

Shared inputs (MAP checkpoints, ensemble members, text features) live in ``BENCH_CACHE_DIR``.
On a cluster, point it at storage every node mounts (an NFS or Lustre home, as on SLURM): a first
wave of one task per (task, seed) makes sure the MAP network exists there before the runs that
need it start, so it is trained once per grid and then loaded by every run (under the cache's file
lock). Without shared storage each node trains its own, identical copy once.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.errors import BenchError
from bench.runner import RunConfig

if TYPE_CHECKING:
    from bench.sweep import Finished  # the sweep imports this module lazily

MAX_RETRIES = 3  # a worker or node that dies: Ray reruns the task elsewhere
HEAD_POLL_S = 5.0  # how often the driver, waiting on runs, checks that the cluster's head still answers


class ClusterLost(RuntimeError):
    """The Ray head stopped answering mid-sweep: the runs still pending cannot finish."""
INSTALL_HINT = 'pip install -e ".[ray]"'
_plugins_loaded: set[str] = set()


def require_ray() -> Any:
    """The ``ray`` module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise BenchError(f"--engine ray needs Ray, which is not installed; install it with {INSTALL_HINT}") from None
    return ray


def _worker_setup(plugins: list[str]) -> None:
    import torch

    from bench.plugins import load_plugins

    torch.set_num_threads(1)  # the task declared one CPU
    if new := [p for p in plugins if p not in _plugins_loaded]:
        load_plugins(new)
        _plugins_loaded.update(new)


def run_task(config: RunConfig, plugins: list[str]) -> tuple[dict[str, Any], dict[str, Any], float]:
    """The body of one Ray task: the run's record (as JSON values), its arrays and its seconds."""
    from bench.runner import execute

    _worker_setup(plugins)
    started = time.perf_counter()
    record, arrays = execute(replace(config, quiet=True), check_output=False)
    return record.to_json(), arrays, time.perf_counter() - started


def warm_task(config: RunConfig, plugins: list[str]) -> None:
    """First wave: load the task's data and get its MAP network into the cache (trained once)."""
    from bench.runner import prepare, resolve

    _worker_setup(plugins)
    resolved = resolve(replace(config, quiet=True))
    if resolved.method_cls.uses_map:
        prepare(replace(config, quiet=True), resolved, check_output=False)


def _warm_groups(todo: list[RunConfig]) -> list[RunConfig]:
    """One run per (task, seed, smoke, data) whose MAP the grid needs: the first wave's work."""
    seen, firsts = set(), []
    for config in todo:
        key = (config.task, config.seed, config.smoke, str(config.data_dir), tuple(sorted(config.settings.items())))
        if key not in seen:
            seen.add(key)
            firsts.append(config)
    return firsts


CONNECT_TIMEOUT_S = 10.0
# Where a running local Ray cluster (``ray start --head``) writes its address.
CURRENT_CLUSTER = Path("/tmp/ray/ray_current_cluster")


def _reachable(host: str, port: int) -> OSError | None:
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        return exc
    return None


def check_address(address: str | None) -> None:
    """One line (exit 2) for an ``--address`` Ray could not join, within seconds: ``ray.init``
    itself retries an unreachable address for minutes and raises tracebacks for the others."""
    if address is None:
        return
    if address == "auto":
        try:
            address = CURRENT_CLUSTER.read_text().strip()
        except OSError:
            raise BenchError("--address auto: no Ray cluster is running on this machine; start one with "
                             "`ray start --head`, or drop --address to start Ray for this sweep") from None
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit() or " " in host:
        raise BenchError(f"bad --address {address!r}; give HOST:PORT of a Ray cluster (e.g. 127.0.0.1:6379) or auto")
    if (exc := _reachable(host, int(port))) is not None:
        raise BenchError(f"cannot reach a Ray cluster at {address} ({exc.strerror or exc}); check the address, "
                         "or drop --address to start Ray for this sweep")


def _failure_of(exc: BaseException) -> BaseException:
    """The run's own exception inside Ray's wrapper (so its record reads like a local one)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


@contextmanager
def in_ray(
    todo: list[RunConfig], address: str | None, plugins: list[str], skip_done: bool = True
) -> Iterator[Iterator[Finished]]:
    """Runs as Ray tasks; yields (index in ``todo``, (error, seconds)) as they finish, after the
    driver has written each finished run.

    The Ray driver is a child process: Ray ends a driver abruptly when its node's raylet or the
    cluster's head dies, and the sweep must outlive that to record the runs the driver left
    unfinished (as failed, ``ClusterLost``) and report them."""
    import multiprocessing

    from bench import lifeline
    from bench.sweep import is_done, record_failure

    require_ray()
    check_address(address)
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    driver = context.Process(target=_driver, args=(todo, address, plugins, skip_done, os.getpid(), send))
    driver.start()
    send.close()

    def finished() -> Iterator[Finished]:
        reported: set[int] = set()
        while (item := _receive(receive)) is not None:
            if isinstance(item[0], str):  # the driver's one-line error (Ray could not start, ...)
                raise BenchError(item[1])
            reported.add(item[0])
            yield item
        driver.join()
        if lost := [i for i in range(len(todo)) if i not in reported]:
            gone = ClusterLost(f"the Ray driver ended mid-sweep with exit code {driver.exitcode}: the cluster's "
                               "head or this node's raylet went away, and Ray stopped the driver")
            for i in lost:  # a run written just before the driver ended is done, not lost
                yield i, ((None, 0.0) if is_done(todo[i]) else (record_failure(todo[i], gone), 0.0))

    try:
        yield finished()
    finally:
        driver.join(lifeline.GRACE_S)  # Ctrl-C reached the driver too: it cancels its tasks itself
        if driver.is_alive():
            driver.terminate()
            driver.join(lifeline.GRACE_S)
        receive.close()


def _receive(receive: Any) -> Any:
    """The driver's next message, or None at its end (or when it died without a word)."""
    try:
        return receive.recv()
    except (EOFError, OSError):
        return None


def _driver(todo: list[RunConfig], address: str | None, plugins: list[str], skip_done: bool, parent: int,
            send: Any) -> None:
    """The Ray driver's process: ends with the sweep, sends each finished run, or one error."""
    from bench import lifeline
    from bench.plugins import load_plugins

    lifeline.install(parent)
    load_plugins(plugins)
    try:
        with _driving(todo, address, plugins, skip_done) as results:
            for item in results:
                send.send(item)
    except BenchError as exc:
        send.send(("error", str(exc)))
    except KeyboardInterrupt:
        pass
    send.close()


def _join(ray: Any, address: str | None) -> None:
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except Exception as exc:  # noqa: BLE001 - whatever Ray raises, the user gets one line
        raise BenchError(f"Ray could not start or join a cluster at {address or 'this machine'} "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None


def _claim_all(todo: list[RunConfig], skip_done: bool, claims: contextlib.ExitStack
               ) -> tuple[dict[int, contextlib.ExitStack], list[Finished]]:
    """Claim every run (``bench.claims``), held in ``claims``; the runs another sweep holds or
    finished before we claimed them are skipped."""
    from bench.claims import CLAIMED, claimed
    from bench.runner import result_paths
    from bench.sweep import is_done

    held: dict[int, contextlib.ExitStack] = {}
    skipped: list[Finished] = []
    for i, config in enumerate(todo):
        stack = contextlib.ExitStack()
        mine = stack.enter_context(claimed(config.out, result_paths(config)[0]))
        if not mine or (skip_done and is_done(config)):  # done: another sweep finished it before we claimed it
            stack.close()
            skipped.append((i, (None if mine else CLAIMED, 0.0)))
        else:
            held[i] = claims.enter_context(stack)
    return held, skipped


def _submit(ray: Any, todo: list[RunConfig], held: dict[int, contextlib.ExitStack], plugins: list[str]
            ) -> dict[Any, int]:
    """Warm each group's MAP networks once, then submit every claimed run: task ref → run index."""
    options = {"num_cpus": 1, "max_retries": MAX_RETRIES, "retry_exceptions": False}
    runs = ray.remote(run_task)
    warm = ray.remote(warm_task).options(**options)
    for ref in [warm.remote(c, plugins) for c in _warm_groups([todo[i] for i in held])]:
        try:
            ray.get(ref)
        except Exception:  # noqa: BLE001, S110 - the runs that need it fail and are recorded themselves
            pass
    return {runs.options(**options, num_gpus=1 if todo[i].device.startswith("cuda") else 0).remote(todo[i], plugins): i
            for i in sorted(held)}


@contextmanager
def _driving(
    todo: list[RunConfig], address: str | None, plugins: list[str], skip_done: bool
) -> Iterator[Iterator[Finished]]:
    """The driver's work: claims every run before submitting it (``bench.claims``), holds the
    claim until the run is written or recorded as failed, and notices a head that stops
    answering (``ClusterLost``) while Ray itself would still be waiting on it."""
    from bench.record import RunRecord
    from bench.runner import write
    from bench.sweep import record_failure

    ray = require_ray()
    _join(ray, address)
    claims = contextlib.ExitStack()
    held, skipped = _claim_all(todo, skip_done, claims)
    refs = _submit(ray, todo, held, plugins)

    head = ray.get_runtime_context().gcs_address
    lost: list[ClusterLost] = []

    def finished() -> Iterator[Finished]:
        yield from skipped
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=HEAD_POLL_S)
            if not ready:
                if (gone := _head_gone(head)) is not None:  # Ray's own wait would hang, then kill the driver
                    lost.append(gone)
                    for ref in pending:
                        i = refs[ref]
                        yield i, (record_failure(todo[i], gone), 0.0)
                        held.pop(i).close()
                    return
                continue
            (ref,) = ready
            i = refs[ref]
            try:
                record_json, arrays, seconds = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - the run failed (or its retries ran out)
                yield i, (record_failure(todo[i], _failure_of(exc)), 0.0)
                held.pop(i).close()
                continue
            write(todo[i], RunRecord.from_json(record_json), arrays)
            held.pop(i).close()
            yield i, (None, seconds)

    try:
        yield finished()
    finally:
        if not lost:  # with the head gone, cancel and shutdown would wait on it
            for ref in refs:
                ray.cancel(ref, force=True)
            ray.shutdown()
        claims.close()


def _head_gone(address: str) -> ClusterLost | None:
    """A ``ClusterLost`` when the head at ``address`` (HOST:PORT) no longer accepts connections."""
    host, _, port = address.rpartition(":")
    if (exc := _reachable(host, int(port))) is None:
        return None
    return ClusterLost(f"the Ray cluster's head at {address} stopped answering mid-sweep ({exc.strerror or exc})")
