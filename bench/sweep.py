"""``bench sweep``: a grid of runs that resumes, survives failures and lists them at the end."""

from __future__ import annotations

import argparse
import os
import re
import time
import traceback
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path

from bench import lifeline
from bench import options as opts
from bench.claims import CLAIMED, claimed
from bench.device import select_device
from bench.errors import BenchError
from bench.method_api import METHODS
from bench.progress import Reporter
from bench.record import RunRecord, Status
from bench.registry import parse_settings
from bench.results import ensure_writable, failure_path, intact_pair, write_failure
from bench.runner import RunConfig, resolve, result_paths, run
from bench.schedule import DEFAULT_HISTORY, TimeLeft, estimate_seconds, fill_unknown, longest_first
from bench.seeding import check_seed
from bench.tasks import TASKS

Finished = tuple[int, tuple[str | None, float]]  # (index in todo, (error or None, seconds))


def _names(text: str, registry, kind: str) -> list[str]:
    if text == "all":
        return registry.names()
    # Commas inside a spec's parentheses separate its options, not names: "a(k=1,j=2),b".
    names = [n.strip() for n in re.split(r",(?![^()]*\))", text) if n.strip()]
    for name in names:
        registry.get(name.split("(")[0])  # unknown names fail before anything runs
    if not names:
        raise BenchError(f"--{kind}s is empty; give names separated by commas, or 'all'")
    return names


def _seeds(text: str) -> list[int]:
    """The seeds of ``--seeds``: at least one, each once, each a valid run seed."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise BenchError(f"bad --seeds {text!r}; write integers separated by commas, e.g. 0,1,2") from None
    if not seeds:
        raise BenchError("--seeds is empty; give seeds separated by commas, e.g. 0,1,2")
    if dups := sorted({s for s in seeds if seeds.count(s) > 1}):
        raise BenchError(f"--seeds lists seed {dups[0]} more than once; give each seed once")
    for seed in seeds:
        check_seed(seed)
    return seeds


def _applicable(settings: dict[str, str], method: str, task: str) -> dict[str, str]:
    """In a sweep, ``--set k=v`` applies to the methods and tasks that declare ``k``."""
    import dataclasses

    from bench.registry import parse_spec

    m_fields = {f.name for f in dataclasses.fields(METHODS.get(parse_spec(method)[0]).Options)}
    t_fields = {f.name for f in dataclasses.fields(TASKS.get(parse_spec(task)[0]).Options)}
    out = {}
    for key, value in settings.items():
        scope, _, name = key.rpartition(".")
        fields = m_fields if scope == "method" else t_fields if scope == "task" else m_fields | t_fields
        if name in fields:
            out[key] = value
    return out


def is_done(config: RunConfig) -> bool:
    """A result exists, succeeded, was made with the same options and smoke flag, and its JSON
    and npz belong together (same checksum): a damaged or mismatched pair is rerun, and so is
    one beside a later failure record."""
    json_path, npz_path = result_paths(config)
    if not (json_path.exists() and npz_path.exists()) or failure_path(json_path).exists():
        return False  # a failure recorded after the result (a failed --force rerun) is retried
    record = intact_pair(json_path, npz_path)
    if record is None:
        return False
    r = resolve(config)
    return (
        record.ok
        and record.config.method_options == opts.as_dict(r.method_options)
        and record.config.task_options == opts.as_dict(r.task_options)
        and record.config.smoke == config.smoke
    )


def is_damaged(config: RunConfig) -> bool:
    """Its result files exist but do not read as one intact run (reported, then rerun)."""
    json_path, npz_path = result_paths(config)
    return json_path.exists() and npz_path.exists() and intact_pair(json_path, npz_path) is None


def record_failure(config: RunConfig, exc: BaseException) -> str:
    """Record a failed run in ``seed<S>.failed.json`` (an earlier good result stays in place);
    returns its one-line error, noting when the record itself could not be written."""
    message = f"{type(exc).__name__}: {exc}".splitlines()[0]
    json_path, _ = result_paths(config)
    r = resolve(config)
    record = RunRecord(task=r.task_label, method=r.method_label, seed=config.seed, status=Status.FAILED,
                       error=message[:300], traceback=traceback.format_exc()[-4000:])
    try:
        write_failure(json_path, record)
    except BenchError as unwritable:
        return f"{message} (and the failure was not recorded: {unwritable})"
    return message


def run_or_record(config: RunConfig, skip_done: bool = True) -> str | None:
    """One run of the grid under its claim: None when it succeeded (or, with ``skip_done``, was
    found done once claimed), ``CLAIMED`` when another sweep holds it, else its one-line error
    (recorded on disk)."""
    with claimed(config.out, result_paths(config)[0]) as mine:
        if not mine:
            return CLAIMED
        if skip_done and is_done(config):  # another sweep finished it before the claim was ours
            return None
        try:
            run(config)
        except Exception as exc:  # noqa: BLE001 - a failed run is recorded, the sweep goes on
            return record_failure(config, exc)
    return None


def _init_worker(plugins: list[str], threads: int, parent: int) -> None:
    """A sweep's run process: ends with its parent, the parent's plugins registered, and its share of
    the CPU threads."""
    import threading

    lifeline.install(parent)

    import torch
    from tqdm import tqdm

    from bench.plugins import load_plugins

    torch.set_num_threads(threads)
    # tqdm's default lock holds a multiprocessing semaphore; a worker stopped by Ctrl-C would
    # leave it behind (reported as leaked at exit). Workers print no bars: a thread lock does.
    tqdm.set_lock(threading.RLock())
    load_plugins(plugins)


def timed_run(config: RunConfig, skip_done: bool = True) -> tuple[str | None, float]:
    """``run_or_record`` and its wall seconds (for the sweep's time-left estimate)."""
    started = time.perf_counter()
    error = run_or_record(config, skip_done)
    return error, time.perf_counter() - started


def _child(config: RunConfig, plugins: list[str], threads: int, parent: int, conn: Connection,
           skip_done: bool) -> None:
    """One run in its own spawned process: sends back (error, seconds); on Ctrl-C or the end of
    the sweep it unwinds and sends nothing."""
    _init_worker(plugins, threads, parent)
    try:
        result = lifeline.guarded(timed_run, config, skip_done)
    except KeyboardInterrupt:
        return
    conn.send(result)
    conn.close()


def _died(config: RunConfig, process: BaseProcess) -> str:
    """The recorded failure of a run whose process ended without a result."""
    return record_failure(config, RuntimeError(
        f"the run's process ended with exit code {process.exitcode} before finishing "
        "(killed, or out of memory?); rerun the same command to retry it"))


def _result(receive: Connection) -> tuple[str | None, float] | None:
    """What a finished run's process sent, or None when it sent nothing: a process killed before
    it could (SIGKILL, the out-of-memory killer, a crash) leaves its pipe at end of file, which
    ``poll`` reports as readable and ``recv`` as EOFError."""
    try:
        return receive.recv() if receive.poll() else None
    except (EOFError, OSError):
        return None


@contextmanager
def _in_fresh_processes(
    todo: list[RunConfig], jobs: int, plugins: list[str], quiet: bool, skip_done: bool = True
) -> Iterator[Iterator[Finished]]:
    """Each run in a fresh spawned process (so its peak memory is its own), ``jobs`` at a time,
    started in ``todo`` order; yields (index in ``todo``, (error, seconds)) as they finish.
    Each run is written atomically by its process, so stopping the sweep (Ctrl-C) loses only
    the unfinished runs, and those processes are stopped before the sweep returns. With
    ``skip_done``, a run that another sweep into the same folder finished meanwhile is skipped.

    Hand-written rather than a ``ProcessPoolExecutor(max_tasks_per_child=1)``: that pool hangs
    on Ctrl-C while it replaces a worker (seen on Python 3.12)."""
    import multiprocessing
    from multiprocessing.connection import wait

    import torch

    context = multiprocessing.get_context("spawn")
    threads = max(1, torch.get_num_threads() // jobs)
    live: dict[int, tuple[BaseProcess, Connection]] = {}
    waiting = iter(range(len(todo)))

    skipped: list[int] = []

    def start_next() -> None:
        i = next(waiting, None)
        while i is not None and skip_done and is_done(todo[i]):  # another sweep finished it meanwhile
            skipped.append(i)
            i = next(waiting, None)
        if i is None:
            return
        receive, send = context.Pipe(duplex=False)
        config = replace(todo[i], quiet=quiet or jobs > 1)  # parallel runs print no bars
        process = context.Process(target=_child, args=(config, plugins, threads, os.getpid(), send, skip_done))
        process.start()
        send.close()
        live[i] = (process, receive)

    def finished() -> Iterator[Finished]:
        for _ in range(jobs):
            start_next()
        while live or skipped:
            while skipped:
                yield skipped.pop(0), (None, 0.0)
            if not live:
                break
            ended = set(wait([process.sentinel for process, _ in live.values()]))
            for i, (process, receive) in list(live.items()):
                if process.sentinel not in ended:
                    continue
                process.join()
                result = _result(receive) or (_died(todo[i], process), 0.0)
                receive.close()
                del live[i]
                start_next()
                yield i, result

    try:
        yield finished()
    finally:
        _stop(process for process, _ in live.values())  # Ctrl-C or an error: stop the runs still going


def _stop(processes: Iterable[BaseProcess]) -> None:
    """Terminate the processes, then kill those still alive after the grace period."""
    processes = list(processes)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(lifeline.GRACE_S)
        if process.is_alive():
            process.kill()


def _expected_seconds(todo: list[RunConfig], out: Path) -> list[float]:
    """Each run's expected length from earlier results (see ``bench.schedule``)."""
    roots = [out] if Path(out).resolve() == DEFAULT_HISTORY.resolve() else [out, DEFAULT_HISTORY]
    estimates = []
    for config in todo:
        r = resolve(config)
        estimates.append(estimate_seconds(r.task_label, r.method_label, config.smoke, roots))
    return fill_unknown(estimates)


def _check_where(args: argparse.Namespace) -> None:
    """The engine, the device and the results folder can take the sweep, before anything runs."""
    if getattr(args, "engine", "local") == "ray":
        from bench.ray_engine import check_address, require_ray

        require_ray()  # a missing Ray stops here, before anything runs
        check_address(args.address)  # so does an address no cluster answers at, within seconds
    elif getattr(args, "address", None):
        raise BenchError("--address is for --engine ray; add --engine ray or drop --address")
    if args.jobs < 1:
        raise BenchError(f"bad --jobs {args.jobs}; give the number of runs to execute at once (1 or more)")
    select_device(args.device)  # an unusable device stops the sweep here, not once per grid cell
    ensure_writable(args.out / "runs")


def _grid(args: argparse.Namespace) -> list[RunConfig]:
    """Every (task, method, seed) of the sweep, each with the ``--set`` settings that apply to it."""
    settings = parse_settings(args.settings)
    methods = _names(args.methods, METHODS, "method")
    tasks = _names(args.tasks, TASKS, "task")
    seeds = _seeds(args.seeds)
    base = RunConfig(method="", task="", device=args.device, out=args.out, smoke=args.smoke,
                     data_dir=args.data_dir, settings=settings, quiet=True)
    grid = [replace(base, method=m, task=t, seed=s, settings=_applicable(settings, m, t))
            for t in tasks for m in methods for s in seeds]
    used = set().union(*(c.settings for c in grid)) if grid else set()
    if unused := sorted(set(settings) - used):
        raise BenchError(f"--set {', '.join(unused)}: no method or task in this sweep has such an option")
    return grid


def _engine(args: argparse.Namespace, todo: list[RunConfig], jobs: int) -> AbstractContextManager[Iterator[Finished]]:
    plugins = list(getattr(args, "plugin", []))
    if getattr(args, "engine", "local") == "ray":
        from bench.ray_engine import in_ray

        return in_ray(todo, args.address, plugins, skip_done=not args.force)
    return _in_fresh_processes(todo, jobs, plugins, args.quiet, skip_done=not args.force)


def _follow(results: Iterator[Finished], todo: list[RunConfig], time_left: TimeLeft, reporter: Reporter,
            started: float) -> list[tuple[RunConfig, str]]:
    """Report each run as it ends (with the time left); returns the failed ones with their causes."""
    failures: list[tuple[RunConfig, str]] = []
    bar = reporter.progress(total=len(todo), desc="sweep", unit="run")
    for count, (i, (error, seconds)) in enumerate(results, start=1):
        config = todo[i]
        label = f"{config.method} on {config.task} seed {config.seed}"
        if error == CLAIMED:
            reporter.log(f"SKIPPED {label}: {error}")
        elif error is not None:
            failures.append((config, error))
            reporter.log(f"FAILED {label}: {error}")
        elapsed = time.perf_counter() - started
        time_left.finished(i, seconds)
        reporter.log(f"[{count}/{len(todo)}] {label} done in {seconds:.0f} s; elapsed {elapsed:.0f} s, "
                     f"about {time_left.seconds():.0f} s left")
        if hasattr(bar, "update"):
            bar.update(1)
    if hasattr(bar, "close"):
        bar.close()
    return failures


def cmd_sweep(args: argparse.Namespace) -> int:
    reporter = Reporter(args.quiet)
    _check_where(args)
    grid = _grid(args)
    for config in grid:
        if is_damaged(config):
            reporter.log(f"damaged result of {config.method} on {config.task} seed {config.seed} "
                         f"({result_paths(config)[0]}): its JSON or npz is unreadable or they do not belong "
                         "together; rerunning it")
    todo = [c for c in grid if args.force or not is_done(c)]
    jobs = min(args.jobs, max(1, len(todo)))
    weights = _expected_seconds(todo, args.out)
    if jobs > 1:  # longest first, so no long run starts while the other workers run out of work
        order = longest_first(weights)
        todo, weights = [todo[i] for i in order], [weights[i] for i in order]
    reporter.log(f"sweep: {len(grid)} runs in the grid, {len(grid) - len(todo)} already done, {len(todo)} to run"
                 + (f", {jobs} at a time, longest first" if jobs > 1 else ""))
    started = time.perf_counter()
    with _engine(args, todo, jobs) as results:
        time_left = TimeLeft([(c.method, c.task) for c in todo], weights, jobs)
        failures = _follow(results, todo, time_left, reporter, started)
    wall = time.perf_counter() - started
    if failures:
        print(f"{len(failures)} run(s) failed:")
        for config, message in failures:
            print(f"  {config.method} / {config.task} / seed {config.seed}: {message}")
        return 1
    print(f"sweep finished: {len(todo)} run(s) done in {wall:.0f} s, {len(grid) - len(todo)} skipped as already done")
    return 0
