"""Command line: ``python -m bench {list,run,sweep,table,site,cost,plot,perf,fidelity}``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.errors import BenchError


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="run seed (default 0)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N|mps (default auto)")
    p.add_argument("--out", type=Path, default=Path("results"), help="results root (default results/)")
    p.add_argument("--smoke", action="store_true", help="small, fast configuration (CI, tests)")
    p.add_argument("--data-dir", type=Path, default=None, help="directory with the task's data files")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="method or task option (method.KEY= / task.KEY= when ambiguous); repeatable")
    p.add_argument("--quiet", action="store_true", help="no progress bars or log lines")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__)
    parser.add_argument("--plugin", action="append", default=[], metavar="FILE.py",
                        help="a Python file registering extra methods or tasks (also BENCH_PLUGINS)")
    sub = parser.add_subparsers(dest="command", required=True)

    p_list = sub.add_parser("list", help="registered methods and tasks, one per line")
    p_list.add_argument("--options", action="store_true", help="also show each one's options")

    p_run = sub.add_parser("run", help="run one method on one task and write its result")
    p_run.add_argument("--method", required=True, help="method name or spec, e.g. 'laplace(link=mc)'")
    p_run.add_argument("--task", required=True, help="task name or spec")
    _add_run_args(p_run)

    p_sweep = sub.add_parser("sweep", help="run a grid of methods × tasks × seeds, resuming")
    p_sweep.add_argument("--methods", default="all", help="comma-separated names or 'all'")
    p_sweep.add_argument("--tasks", default="all", help="comma-separated names or 'all'")
    p_sweep.add_argument("--engine", choices=["local", "ray"], default="local",
                         help="local: fresh processes on this machine (default); ray: Ray tasks, local or on a cluster")
    p_sweep.add_argument("--address", default=None,
                         help="--engine ray: the cluster to join (auto, or HOST:PORT); default: start Ray here")
    p_sweep.add_argument("--seeds", default="0,1,2,3,4",
                         help="comma-separated seeds (default 0,1,2,3,4: five, for intervals that mean something)")
    p_sweep.add_argument("--force", action="store_true", help="rerun runs whose result exists")
    p_sweep.add_argument("--jobs", type=int, default=1,
                         help="runs executed at once in worker processes, sharing the CPU threads (default 1)")
    _add_run_args(p_sweep)
    p_sweep.set_defaults(seed=None)

    p_table = sub.add_parser("table", help="build results/leaderboard.{md,csv} from the run files")
    p_table.add_argument("--results", type=Path, default=Path("results"))
    p_table.add_argument("--check", action="store_true",
                         help="exit 1 if the committed tables differ from what the run files give, or if "
                              "run files of an older format cannot be checked against their metrics")

    p_site = sub.add_parser("site", help="build a static leaderboard site (HTML) from the run files")
    p_site.add_argument("--results", type=Path, default=Path("results"))
    p_site.add_argument("--out", type=Path, default=None, help="the site's folder (default <results>/site)")
    p_site.add_argument("--check", action="store_true",
                        help="exit 1 if the site's files differ from what the run files give")

    p_cost = sub.add_parser("cost", help="wall time and core-hours of a results folder, summed from its records")
    p_cost.add_argument("--results", type=Path, default=Path("results"))
    p_cost.add_argument("--by", choices=["task", "method"], default="task", help="group rows by (default task)")

    p_plot = sub.add_parser("plot", help="reliability diagrams and OOD histograms into results/plots")
    p_plot.add_argument("--results", type=Path, default=Path("results"))

    for name, helptext in (("perf", "rerunnable speed benchmarks"), ("fidelity", "RegVar vs exact Laplace")):
        p = sub.add_parser(name, help=helptext, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def cmd_list(args: argparse.Namespace) -> int:
    from bench import options as opts
    from bench.method_api import METHODS
    from bench.perf import PERF
    from bench.runner import TASKS

    for kind, registry in (("method", METHODS), ("task", TASKS)):
        for name in registry.names():
            cls = registry.get(name)
            doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
            print(f"{kind:7s} {name:18s} {doc}")
            if args.options:
                for line in opts.help_lines(cls.Options):
                    print(f"{'':27s}{line}")
    for name in PERF.names():
        print(f"{'perf':7s} {name}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from bench.registry import parse_settings
    from bench.runner import RunConfig, run

    settings = parse_settings(args.settings)
    config = RunConfig(
        method=args.method, task=args.task, seed=args.seed, device=args.device, out=args.out,
        smoke=args.smoke, data_dir=args.data_dir, settings=settings, quiet=args.quiet,
    )
    record = run(config)
    m, costs = record.metrics, record.costs
    from bench.metrics.registry import parse_auroc_key, parse_shift_key, set_metrics

    rows = [[metric.test_key, f"{m[metric.test_key]:.4f}"] for metric in set_metrics()]
    rows += [[k, f"{v:.4f}"] for k, v in sorted(m.items()) if parse_auroc_key(k) or parse_shift_key(k)]
    rows += [["costs/train_s", f"{costs.train_s:.2f}"], ["costs/fit_posthoc_s", f"{costs.fit_posthoc_s:.2f}"],
             ["costs/predict_per_1k_s", f"{costs.predict_per_1k_s:.3f}"],
             [f"memory/peak_MiB ({record.memory.kind})", f"{record.memory.peak_bytes / 2**20:.1f}"]]
    print(f"{record.method} on {record.task} (seed {record.seed})")
    print(tabulate(rows, headers=["metric", "value"], tablefmt="github"))
    return 0


def cmd_passthrough(args: argparse.Namespace) -> int:
    if args.command == "perf":
        from bench.perf import PERF
        from bench.perf.loader import load_all

        load_all()
        rest = args.rest
        if not rest or rest[0] in ("-h", "--help"):
            print("usage: bench perf NAME [options]; benchmarks: " + ", ".join(PERF.names()))
            return 0
        return PERF.get(rest[0])(rest[1:])
    import importlib

    import bench_methods

    fidelity_main = importlib.import_module(bench_methods.FIDELITY_MODULE).main

    return fidelity_main(args.rest)


def _split_passthrough(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """Split off the arguments of ``perf``/``fidelity``, which parse their own options:
    argparse's REMAINDER does not capture a tail that starts with an option (``--task``)."""
    i = 0
    while i < len(argv) and argv[i].startswith("--plugin"):
        i += 1 if "=" in argv[i] else 2
    if i < len(argv) and argv[i] in ("perf", "fidelity"):
        return argv[: i + 1], argv[i + 1 :]
    return argv, None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    head, rest = _split_passthrough(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(head)
    if rest is not None:
        args.rest = rest
    try:
        from bench.plugins import load_plugins

        load_plugins(args.plugin)
        if args.command == "list":
            return cmd_list(args)
        if args.command == "run":
            return cmd_run(args)
        if args.command == "sweep":
            from bench.sweep import cmd_sweep

            return cmd_sweep(args)
        if args.command == "table":
            from bench.leaderboard import cmd_table

            return cmd_table(args)
        if args.command == "site":
            from bench.site import cmd_site

            return cmd_site(args)
        if args.command == "cost":
            from bench.sweep_cost import cmd_cost

            return cmd_cost(args)
        if args.command == "plot":
            from bench.plots import cmd_plot

            return cmd_plot(args)
        return cmd_passthrough(args)
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("bench: interrupted; nothing partial was written, finished results are intact",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
