"""The ``bench run`` command that writes a run again, made when the run is and kept in its record
(``Provenance.command``): the method and task specs and ``--set`` settings as they were given, with
a ``--plugin PATH/TO/<file>`` for each plugin file that defines the method or the task. For a
record without one, :func:`reproduce` rebuilds it from the run's config."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any

from bench import options as opts
from bench.errors import BenchError
from bench.plugins import plugin_file
from bench.record import RunRecord

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


@dataclass(frozen=True)
class Reproduction:
    command: str
    notes: list[str]


def registered_class(name: str, kind: str) -> type | None:
    """The class registered as method or task ``name`` here (None: not registered, a plugin's?)."""
    import bench_methods  # noqa: F401 - registers the built-in methods
    from bench.method_api import METHODS
    from bench.tasks import TASKS

    registry = METHODS if kind == "method" else TASKS
    return registry.get(name) if name in registry else None


def changed_options(options: dict[str, Any], cls: type) -> dict[str, Any]:
    """The options that differ from ``cls``'s defaults today, in declaration order (as
    ``bench.runner._label`` lists them)."""
    defaults = opts.as_dict(cls.Options())
    keys = [*defaults, *sorted(options.keys() - defaults.keys())]
    return {k: options[k] for k in keys if k in options and (k not in defaults or defaults[k] != options[k])}


def _label_settings(label: str, prefix: str) -> dict[str, str]:
    """``k=v`` settings read back from a label ``name@k=v,...`` (for a name not registered here)."""
    items = [s for s in label.partition("@")[2].split(",") if s and s != "smoke"]
    return dict(f"{prefix}.{item}".split("=", 1) for item in items if "=" in item)


def run_settings(record: RunRecord) -> tuple[dict[str, str], list[str]]:
    """``--set`` key → value that give the run's options, and notes on how sure that is."""
    cfg = record.config
    method_cls, task_cls = registered_class(cfg.method, "method"), registered_class(cfg.task, "task")
    if method_cls is None or task_cls is None:
        missing = cfg.method if method_cls is None else cfg.task
        return ({**_label_settings(record.method, "method"), **_label_settings(record.task, "task")},
                [f"{missing} is not registered here (a plugin?): the settings are read from the run's labels"])
    m_fields, t_fields = set(opts.as_dict(method_cls.Options())), set(opts.as_dict(task_cls.Options()))
    settings = {}
    for options, cls, theirs, prefix in ((cfg.method_options, method_cls, t_fields, "method"),
                                         (cfg.task_options, task_cls, m_fields, "task")):
        for key, value in changed_options(options, cls).items():  # a key both declare needs its owner
            settings[f"{prefix}.{key}" if key in theirs else key] = opts.format_option(value)
    notes = [_plugin_note(cls.name, file) for cls in (method_cls, task_cls) if (file := plugin_file(cls))]
    return settings, notes


def _plugin_note(name: str, file: str) -> str:
    return f"{name} is registered by a plugin: {PLACEHOLDER_DIR} is where your copy of {file} lives"


def plugin_files(record: RunRecord) -> list[str]:
    """The plugin files the command needs (``--plugin``): one per file that registers the run's
    method or task (a placeholder for a name not registered here at all)."""
    files = []
    for name, kind in ((record.config.method, "method"), (record.config.task, "task")):
        cls = registered_class(name, kind)
        if cls is None:
            files.append("PLUGIN.py")
        elif file := plugin_file(cls):
            files.append(file)
    return files


def reproduce(record: RunRecord) -> Reproduction:
    """The ``bench run`` command that writes this run again: the one its record keeps (made as it
    ran; its options' defaults are those of the commit it names), or, for a record without one,
    rebuilt from its config and checked by resolving it as ``bench run`` would: a note says when
    today's option defaults give other labels than the run's."""
    if record.provenance.command is not None:
        plugins = shlex.split(record.provenance.command)
        files = [a.removeprefix(PLACEHOLDER_DIR) for a in plugins if a.startswith(PLACEHOLDER_DIR)]
        return Reproduction(record.provenance.command, [_plugin_note("the run's method or task", f) for f in files])
    from bench.runner import RunConfig, resolve

    cfg = record.config
    settings, notes = run_settings(record)
    command = run_command(cfg.method, cfg.task, record.seed, smoke=cfg.smoke, device=cfg.device_requested,
                          settings=settings, plugins=plugin_files(record))
    if registered_class(cfg.method, "method") is None or registered_class(cfg.task, "task") is None:
        return Reproduction(command, notes)  # nothing to check it against here
    try:
        resolved = resolve(RunConfig(method=cfg.method, task=cfg.task, seed=record.seed, smoke=cfg.smoke,
                                     settings=settings))
        if (resolved.method_label, resolved.task_label) != (record.method, record.task):
            notes.append(f"today this command gives {resolved.method_label} on {resolved.task_label}, not "
                         f"{record.method} on {record.task}: option defaults changed since the run")
    except BenchError as exc:
        notes.append(f"today this command is refused: {exc}")
    return Reproduction(command, notes)
