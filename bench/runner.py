"""One run: task → (cached MAP) → method → predictions → metrics → results.

This is the only place where the pieces meet, and the only place that writes a run.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import bench_methods  # noqa: F401 - registers the built-in methods
from bench import options as opts
from bench.cache import cache_root
from bench.checked_prediction import check_same_scores, checked_prediction
from bench.derived_rows import tune
from bench.device import select_device
from bench.errors import BenchError
from bench.map_finish import finish_seconds
from bench.method_api import FLAGS_KEY, METHODS, FitContext, Method
from bench.metrics import evaluate
from bench.model_cache import ModelCache, NetworkKey, network_name
from bench.options import format_option
from bench.planning import CostPlan, Estimate, EvaluationPlan, LoadPlan, training_seconds, validation_inputs
from bench.plugins import plugin_file
from bench.prediction_arrays import PredictionArrays, ood_set, shift_set
from bench.profiling import (
    FIX_MMAP_ENV,
    Measurement,
    count_run,
    fix_mmap_threshold,
    measure,
    memory_kind,
    runs_in_this_process,
    settled_rss_bytes,
)
from bench.progress import Reporter
from bench.provenance import git_commit, machine, versions
from bench.record import Config as RecordConfig
from bench.record import CostEstimate, Costs, Data, MapCertificate, Memory, NetworkCost, Provenance, RunRecord, Status
from bench.registry import parse_spec
from bench.reproduce import run_command
from bench.results import ensure_writable, run_paths, write_run
from bench.seeding import check_seed, derive_seed, seed_everything
from bench.subsets import draw_subset
from bench.tasks import TASKS, Task, TaskData
from bench.training import (
    map_checkpoint,
)
from bench.types import Prediction


@dataclass
class RunConfig:
    method: str
    task: str
    seed: int = 0
    device: str = "auto"
    out: Path = Path("results")
    smoke: bool = False
    data_dir: Path | None = None
    settings: dict[str, str] = field(default_factory=dict)
    quiet: bool = False


@dataclass
class Resolved:
    """A run's classes and parsed options; ``label`` names its results folder."""

    method_cls: type[Method]
    method_options: Any
    task_cls: type[Task]
    task_options: Any
    method_label: str
    task_label: str


def _split_settings(settings: dict[str, str], method_fields: set[str], task_fields: set[str],
                    method: str, task: str) -> tuple[dict[str, str], dict[str, str]]:
    """Route ``--set`` keys: ``method.k``/``task.k`` explicitly, else by which declares ``k``."""
    m: dict[str, str] = {}
    t: dict[str, str] = {}
    for key, value in settings.items():
        if key.startswith("method."):
            m[key.removeprefix("method.")] = value
        elif key.startswith("task."):
            t[key.removeprefix("task.")] = value
        elif key in method_fields and key in task_fields:
            raise BenchError(f"--set {key} is ambiguous; write method.{key}= or task.{key}=")
        elif key in method_fields:
            m[key] = value
        elif key in task_fields:
            t[key] = value
        else:
            valid = ", ".join(sorted(method_fields | task_fields)) or "none"
            raise BenchError(f"unknown --set key {key!r} for method {method} / task {task}; valid keys: {valid}")
    return m, t


def _label(name: str, defaults: Any, chosen: Any, extra: list[str] = ()) -> str:
    """``name`` for default options, else ``name@k=v,...`` listing the non-default ones."""
    base, mine = opts.as_dict(defaults), opts.as_dict(chosen)
    changed = [f"{k}={format_option(v)}" for k, v in mine.items() if base[k] != v] + list(extra)
    return name + ("@" + ",".join(changed) if changed else "")


def resolve(config: RunConfig) -> Resolved:
    check_seed(config.seed)
    method_name, method_raw = parse_spec(config.method)
    task_name, task_raw = parse_spec(config.task)
    method_cls = METHODS.get(method_name)
    task_cls = TASKS.get(task_name)
    m_fields = {f.name for f in dataclasses.fields(method_cls.Options)}
    t_fields = {f.name for f in dataclasses.fields(task_cls.Options)}
    m_set, t_set = _split_settings(config.settings, m_fields, t_fields, method_name, task_name)
    for spec, raw, given in ((config.method, method_raw, m_set), (config.task, task_raw, t_set)):
        if clash := sorted(raw.keys() & given.keys()):
            raise BenchError(f"option {clash[0]!r} is set both in {spec!r} and by --set; give it once")
    method_options = opts.build(method_cls.Options, {**method_raw, **m_set}, f"method {method_name}")
    task_options = opts.build(task_cls.Options, {**task_raw, **t_set}, f"task {task_name}")
    return Resolved(
        method_cls, method_options, task_cls, task_options,
        _label(method_name, method_cls.Options(), method_options),
        _label(task_name, task_cls.Options(), task_options, ["smoke"] if config.smoke else []),
    )


def result_paths(config: RunConfig) -> tuple[Path, Path]:
    r = resolve(config)
    return run_paths(config.out, r.task_label, r.method_label, config.seed)


@dataclass
class Prepared:
    """A run's inputs once data is loaded and its MAP network exists (stage 2)."""

    resolved: Resolved
    task: Task
    data: TaskData
    device: torch.device
    reporter: Reporter
    baseline: int | None  # CPU memory figures are above this RSS (after data loading)
    cache: ModelCache
    map_model: torch.nn.Module | None
    data_s: float
    estimate: Estimate | None = None


@dataclass
class Fitted:
    method: Method
    posthoc_s: float  # the method's own fitting, without the networks it trained meanwhile
    peak: Measurement


@dataclass
class Predicted:
    """Predictions on every evaluation set, with the subsets a capped method saw."""

    test: Prediction
    y_test: torch.Tensor
    ood: dict[str, Prediction]
    shift: dict[str, tuple[Prediction, torch.Tensor]]
    subsets: dict[str, int]
    indices: dict[str, np.ndarray]
    test_time: Measurement
    other_s: float
    val: tuple[Prediction, torch.Tensor] | None = None  # with a logit Gaussian: for scale tuning
    flags: list[str] = field(default_factory=list)  # the harness's own warnings about the predictions


def prepare(config: RunConfig, r: Resolved, check_output: bool = True) -> Prepared:
    """Check the outputs are writable, load the data, get (train or load) the MAP network."""
    reporter = Reporter(config.quiet)
    device = select_device(config.device)
    if check_output:
        ensure_writable(run_paths(config.out, r.task_label, r.method_label, config.seed)[0].parent)  # before compute
    ensure_writable(cache_root(), "set BENCH_CACHE_DIR to a writable directory")
    task = r.task_cls(r.task_options, smoke=config.smoke, data_dir=config.data_dir)
    reporter.log(f"run {r.method_label} on {r.task_label}, seed {config.seed}, device {device}")
    seed_everything(config.seed)
    method = r.method_cls(r.method_options)
    task.evaluation = EvaluationPlan(config.seed, getattr(method, "eval_limit", None))
    start = time.perf_counter()
    plan = task.plan()  # before anything is embedded: the estimate may refuse the run
    data = task.load() if plan is None or not plan.embed_texts else None
    load_s = time.perf_counter() - start  # reading texts and stores (load repeats it), or the whole load
    estimate = estimate_run(task, plan or plan_from_data(data), method, device,  # its probes: not data time
                            map_cached=data is not None and is_map_cached(task, data, config.seed))
    estimate.load_s = load_s
    reporter.log(estimate.describe())
    method.check_estimate(estimate)
    start = time.perf_counter()
    if data is None:
        data = task.load()
    data_s = load_s + time.perf_counter() - start
    baseline = None if device.type == "cuda" else settled_rss_bytes()
    cache = ModelCache(task, data, device, config.seed, reporter, baseline)
    map_model = cache.get(0) if r.method_cls.uses_map else None
    return Prepared(r, task, data, device, reporter, baseline, cache, map_model, data_s, estimate)


def plan_from_data(data: TaskData) -> LoadPlan:
    """The load plan of data already loaded: its sizes and first input, nothing to embed."""
    return LoadPlan(data.sizes(), data.train.tensors[0][:1], data.num_classes)


def is_map_cached(task: Task, data: TaskData, seed: int) -> bool:
    _, path = map_checkpoint(task, data, seed)
    return path.exists()


def estimate_run(task: Task, plan: LoadPlan, method: Method, device: torch.device, map_cached: bool) -> Estimate:
    """Embedding (the task's probe), MAP training (a probe of the recipe's steps and of its Newton
    finish, 0 when cached)
    and the method's own fit and prediction estimate."""
    recipe = task.recipe()

    def make_model() -> torch.nn.Module:
        return task.make_model(plan.num_classes)

    train_s = 0.0
    if method.uses_map and not map_cached:
        train_s = training_seconds(make_model, recipe, plan.example, plan.num_classes, plan.sizes["train"], device)
        if recipe.newton_finish:
            train_s += finish_seconds(make_model, plan.example, plan.num_classes, plan.sizes["train"],
                                      recipe.weight_decay, device)
    own = method.estimate(CostPlan(plan, make_model, recipe, device))
    notes = [f"{plan.embed_texts:,} texts to embed"] if plan.embed_texts else []
    return Estimate(plan.embed_s, train_s, *(own or (None, None)), notes=notes)


def fit(config: RunConfig, p: Prepared) -> Fitted:
    method = p.resolved.method_cls(p.resolved.method_options)
    ctx = FitContext(
        data=p.data, make_model=p.cache.make_model, recipe=p.cache.recipe, device=p.device, seed=config.seed,
        map_model=copy.deepcopy(p.map_model) if p.map_model is not None else None,
        train_model=p.cache.get, train_variant=p.cache.get_variant, progress=p.reporter.progress,
        log=p.reporter.log,
        make_small_model=lambda: p.task.make_small_model(p.data.num_classes),
    )
    trained_before = p.cache.trained_now_s
    seed_everything(derive_seed(config.seed, "fit"))
    with measure(p.device, p.baseline) as peak:
        method.fit(ctx)
    return Fitted(method, peak.seconds - (p.cache.trained_now_s - trained_before), peak)


def predict(config: RunConfig, p: Prepared, method: Method) -> Predicted:
    """Predict every evaluation set (a capped method: this seed's subset of each)."""
    seed_everything(derive_seed(config.seed, "predict"))
    limit = getattr(method, "eval_limit", None)
    subsets: dict[str, int] = {}
    indices: dict[str, np.ndarray] = {}

    def subset(name: str, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """This seed's subset (stratified by label where given) when the method caps its inputs;
        a set the task loaded only in part is that subset already."""
        if name in p.data.subsets and limit is not None:
            subsets[name], indices[name] = int(limit), p.data.subsets[name][1]
            return tensors
        if limit is None or len(tensors[0]) <= limit:
            return tensors
        pick = draw_subset(len(tensors[0]), int(limit), config.seed, name, tensors[1] if len(tensors) > 1 else None)
        subsets[name], indices[name] = int(limit), pick
        return tuple(t[torch.from_numpy(pick)] for t in tensors)

    negatives: list[str] = []

    def on(name: str, x: torch.Tensor, where: str) -> Prediction:
        seed = derive_seed(config.seed, "logit-draws", name)
        return checked_prediction(method, x, where, p.data.num_classes, seed, negatives)

    x_test, y_test = subset("test", *p.data.test.tensors)
    with measure(p.device, p.baseline) as test_time:
        test_pred = on("test", x_test, "the test set")
    with measure(p.device) as rest_time:
        ood = {name: on(ood_set(name), subset(ood_set(name), x)[0], f"OOD set {name!r}")
               for name, x in p.data.ood.items()}
        shift = {}
        for name, ds in p.data.shift.items():
            xs, ys = subset(shift_set(name), *ds.tensors)
            shift[name] = (on(shift_set(name), xs, f"shift set {name!r}"), ys)
        val = None
        if test_pred.has_gaussian and len(p.data.val):  # for the harness's one scale-tuning rule
            n_val = validation_inputs(limit, len(p.data.val))
            pick = draw_subset(len(p.data.val), n_val, config.seed, "val", p.data.val.tensors[1])
            if n_val < len(p.data.val):
                subsets["val"], indices["val"] = n_val, pick
            xv, yv = (t[torch.from_numpy(pick)] for t in p.data.val.tensors)
            val = (on("val", xv, "the validation set"), yv)
    check_same_scores(method, test_pred, {**{f"OOD set {k!r}": v for k, v in ood.items()},
                                     **{f"shift set {k!r}": v for k, (v, _) in shift.items()}})
    if val is not None and not val[0].has_gaussian:
        raise BenchError(f"method {method.name} returned a logit Gaussian for the test set but not for validation")
    flags = [f"negative variances clamped at 0 (as its probit does): {'; '.join(negatives)}"] if negatives else []
    return Predicted(test_pred, y_test, ood, shift, subsets, indices, test_time, rest_time.seconds, val, flags)


def score(pred: Predicted) -> dict[str, float]:
    return evaluate(
        pred.test.probs, pred.y_test, pred.test.scores,
        ood={k: (v.probs, v.scores) for k, v in pred.ood.items()},
        shift={k: (v.probs, y) for k, (v, y) in pred.shift.items()},
    )


def certificate_flags(certificates: dict[NetworkKey, MapCertificate]) -> list[str]:
    """One flag per network the run used that is not a certified minimum of its objective."""
    return [f"{network_name(key).replace('MAP model', 'MAP')} is {c.describe()}"
            for key, c in sorted(certificates.items()) if not c.certified]


def make_record(config: RunConfig, p: Prepared, fitted: Fitted, pred: Predicted,
                metrics: dict[str, float]) -> RunRecord:
    r, cache = p.resolved, p.cache
    summary = fitted.method.summary()
    networks = [NetworkCost(member, (member, variant) in cache.loaded, **dataclasses.asdict(cost), variant=variant)
                for (member, variant), cost in sorted(cache.costs.items())]
    n_test = max(len(pred.y_test), 1)
    return RunRecord(
        task=r.task_label, method=r.method_label, seed=config.seed, status=Status.OK,
        config=RecordConfig(
            method=r.method_cls.name, method_options=opts.as_dict(r.method_options), task=r.task_cls.name,
            task_options=opts.as_dict(r.task_options), smoke=config.smoke,
            recipe=dataclasses.asdict(cache.recipe), device_requested=config.device,
        ),
        data=Data(p.data.sizes(), pred.subsets, dict(p.data.info)),
        costs=Costs(
            data_s=p.data_s, networks=networks, fit_posthoc_s=fitted.posthoc_s,
            predict_test_s=pred.test_time.seconds, predict_per_1k_s=pred.test_time.seconds / n_test * 1000.0,
            predict_other_s=pred.other_s,
            estimate=None if p.estimate is None else CostEstimate(
                **{f.name: getattr(p.estimate, f.name) for f in dataclasses.fields(CostEstimate)}),
        ),
        memory=Memory(
            kind=memory_kind(fitted.peak, p.device), fit_peak_bytes=fitted.peak.peak_bytes,
            predict_peak_bytes=pred.test_time.peak_bytes, baseline_bytes=p.baseline,
            runs_in_process=runs_in_this_process(), settled=True,
        ),
        metrics=metrics, method_summary=summary,
        flags=[str(f) for f in summary.get(FLAGS_KEY, [])] + pred.flags + certificate_flags(cache.certificates),
        map_certificate=cache.certificates.get((0, "")),
        provenance=Provenance(git_commit(), versions(), machine(p.device), run_command(
            config.method, config.task, config.seed, smoke=config.smoke, device=config.device,
            settings=config.settings, plugins=[f for f in map(plugin_file, (r.method_cls, r.task_cls)) if f])),
    )


def execute(config: RunConfig, check_output: bool = True) -> tuple[RunRecord, PredictionArrays]:
    """One run's stages without the write: resolve → prepare (data, MAP) → fit → predict →
    evaluate; returns the record and its prediction arrays (a Ray task returns them to the
    driver, which writes). ``check_output``: prove the results folder writable first."""
    count_run()
    # opt-in (it makes peaks repeatable, and predicting slower): before the run loads anything
    fixed_threshold = os.environ.get(FIX_MMAP_ENV) == "1" and fix_mmap_threshold()
    r = resolve(config)
    prepared = prepare(config, r, check_output)
    fitted = fit(config, prepared)
    predicted = predict(config, prepared, fitted.method)
    record = make_record(config, prepared, fitted, predicted, score(predicted))
    memory = dataclasses.replace(record.memory, mmap_threshold_fixed=fixed_threshold)
    record = dataclasses.replace(record, memory=memory)
    for flag in record.flags:
        prepared.reporter.log(f"WARNING {r.method_label}: {flag}")
    predictions = PredictionArrays.pack(predicted.test, predicted.y_test, predicted.ood, predicted.shift,
                                        predicted.val, predicted.indices)  # indices: for paired tables
    if predictions.has_gaussian:  # the curve the [s tuned] row is chosen on, kept with the run
        record.scale_tuning = tune(predictions)
    return record, predictions


def write(config: RunConfig, record: RunRecord, predictions: PredictionArrays) -> Path:
    """Write a run's npz and JSON atomically where ``config`` puts them; returns the JSON path."""
    json_path, npz_path = run_paths(config.out, record.task, record.method, config.seed)
    write_run(json_path, npz_path, record, predictions)
    return json_path


def run(config: RunConfig) -> RunRecord:
    """One run: :func:`execute`, then :func:`write`."""
    record, arrays = execute(config)
    json_path = write(config, record, arrays)
    Reporter(config.quiet).log(f"wrote {json_path} and {json_path.with_suffix('.npz').name}")
    return record
