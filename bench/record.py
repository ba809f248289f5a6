"""The run record: the typed, versioned contract between a run and everything that reads it.

A run writes one :class:`RunRecord` as JSON beside its predictions (``bench.results``); the
leaderboard, plots, sweep resume, scheduler and CLI read it back through
:meth:`RunRecord.from_json`, never by string keys into a dict. A failed run is the same type
with ``status="failed"`` and its error.

Schema versions: 1 and 2 (an untyped dict with a ``timings`` section) load through
:func:`_migrate_v2`, which keeps what they can vouch for and marks the rest unknown (``None``):
training seconds of networks they loaded from the cache (charged 0 s then), and memory figures
of kind ``cpu_rss_growth`` (growth inside a reused process, not a peak). 3 lacks
``memory.settled`` and loads with it False (its CPU figures are lower bounds). 4 lacks
``costs.estimate`` (the cost predicted before the run started) and loads without one. 5 lacks
``map_certificate`` (where the MAP stands on its objective) and ``scale_tuning`` and loads
without them. 6 is current.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from bench.errors import BenchError

SCHEMA_VERSION = 7
# Before schema 7 the calibration errors binned a confidence that is 1 in float32 apart from the
# top bin (bench/metrics/calibration.py); their recorded ECE and MCE are checked to this, not exactly.
CALIBRATION_BINNING_SCHEMA = 7
OLD_CALIBRATION_TOL = 1e-6
CHECKSUM_KEY = "predictions_sha256"
# Memory kinds whose figures are not a peak (see the module docstring): read as unknown.
UNMEASURED_MEMORY = frozenset({"cpu_rss_growth"})


class Status(str, Enum):
    """How a run ended."""

    OK = "ok"
    """finished; its predictions are beside it"""
    FAILED = "failed"
    """raised; the record holds the error (a good earlier result, if any, is kept elsewhere)"""


@dataclass
class Config:
    """What was asked for: names, options as parsed, the training recipe."""

    method: str
    method_options: dict[str, Any]
    task: str
    task_options: dict[str, Any]
    smoke: bool
    recipe: dict[str, Any]
    device_requested: str


@dataclass
class Data:
    """The splits' sizes, the subsets a capped method evaluated, and the task's own notes."""

    sizes: dict[str, int]
    evaluated_subsets: dict[str, int] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class NetworkCost:
    """One trained network the run used (0: the MAP, k > 0: ensemble member k), and what it
    cost to train, whether the run trained it or loaded it from the cache."""

    member: int
    cached: bool
    seconds: float | None  # None: loaded by a run recorded before the cache kept costs
    device: str | None = None
    threads: int | None = None
    peak_bytes: int | None = None
    memory_kind: str | None = None
    variant: str = ""  # "": the task's network; else how a method changed it (e.g. "dropout=0.3")


@dataclass
class CostEstimate:
    """Seconds predicted before the run embedded or trained anything (``bench.planning``), per
    phase; None: the method does not estimate that phase. Wall time of this run as it started:
    work found in the cache is predicted at 0 s."""

    embed_s: float
    train_s: float
    fit_s: float | None = None
    predict_s: float | None = None
    load_s: float = 0.0  # reading data and feature stores (timed while planning)

    @property
    def total_s(self) -> float | None:
        parts = (self.load_s, self.embed_s, self.train_s, self.fit_s, self.predict_s)
        return None if any(p is None for p in parts) else float(sum(parts))


@dataclass
class Costs:
    """Seconds, charged the same whatever was cached."""

    data_s: float
    networks: list[NetworkCost]
    fit_posthoc_s: float  # the method's own fitting, after its networks exist
    predict_test_s: float
    predict_per_1k_s: float
    predict_other_s: float
    estimate: CostEstimate | None = None

    def _seconds(self, members: list[NetworkCost]) -> float | None:
        known = [n.seconds for n in members]
        return None if any(s is None for s in known) else float(sum(known))

    @property
    def train_s(self) -> float | None:
        """Training of every network the method needs, summed (None if one is unknown)."""
        return self._seconds(self.networks)

    @property
    def map_train_s(self) -> float | None:
        return self._seconds([n for n in self.networks if n.member == 0 and not n.variant])

    @property
    def member_train_s(self) -> float | None:
        return self._seconds([n for n in self.networks if n.member > 0])

    @property
    def run_s(self) -> float:
        """Wall seconds of the run's own parts: loading, the method's fit and its predictions."""
        return self.data_s + self.fit_posthoc_s + self.predict_test_s + self.predict_other_s

    @property
    def total_s(self) -> float:
        """Wall seconds of the run's parts as recorded (the scheduler's estimate of its length)."""
        return self.run_s + sum(n.seconds or 0.0 for n in self.networks if not n.cached)


@dataclass
class Memory:
    """Peak memory of fitting and predicting, above the RSS after data loading on CPU."""

    kind: str  # cpu_rss_fresh_process, cpu_peak_rss_above_baseline, cuda_peak_allocated
    fit_peak_bytes: int | None
    predict_peak_bytes: int | None
    baseline_bytes: int | None = None
    runs_in_process: int | None = None
    # CPU: the baseline and block starts were read settled (garbage collected, freed heap handed
    # back, bench.profiling). False (records before that): heap freed by data loading could sit
    # in the baseline and be reused by the block unseen, so the figure is a lower bound.
    settled: bool = False
    # CPU: glibc's mmap threshold was fixed for the run (BENCH_FIX_MMAP_THRESHOLD=1,
    # bench.profiling.fix_mmap_threshold). False (the default): the peak also holds heap the
    # allocator kept by chance, which can make identical runs' peaks differ several-fold.
    mmap_threshold_fixed: bool = False

    @property
    def lower_bound(self) -> bool:
        """A CPU figure that may undercount (see ``settled``); a CUDA peak is the allocator's own."""
        return not self.settled and not self.kind.startswith("cuda")

    @property
    def peak_bytes(self) -> int | None:
        if self.fit_peak_bytes is None or self.predict_peak_bytes is None:
            return None
        return max(self.fit_peak_bytes, self.predict_peak_bytes)


@dataclass
class Provenance:
    git: str | None
    versions: dict[str, str]
    machine: dict[str, Any]
    command: str | None = None  # the `bench run` command that writes this run again (bench.reproduce)


@dataclass
class MapCertificate:
    """Where the shared MAP stands on P. ``certified``: ‖∇P‖∞ ≤ ``grad_tol`` and λ_min(∇²P) > 0,
    a strict local minimum where the Laplace variance is defined; otherwise ``note`` says why
    not (and every row on this network is flagged)."""

    objective: float
    grad_inf: float
    grad_tol: float
    lambda_min: float | None  # None: not measured (see note)
    lambda_max: float | None
    newton_steps: int
    products: int
    seconds: float
    note: str = ""

    @property
    def certified(self) -> bool:
        """‖∇P‖∞ within tolerance and λ_min positive beyond its reading accuracy (``note`` empty)."""
        return (self.grad_inf <= self.grad_tol and self.lambda_min is not None and self.lambda_min > 0
                and not self.note)

    def describe(self) -> str:
        eig = (f"λ_min {self.lambda_min:.3g}, λ_max {self.lambda_max:.3g}" if self.lambda_min is not None
               else "eigenvalues not measured")
        head = "certified minimum of P" if self.certified else "NOT a certified minimum of P"
        return f"{head}: ‖∇P‖∞ {self.grad_inf:.2g}, {eig}" + (f" ({self.note})" if self.note else "")


@dataclass
class ScaleTuning:
    """The harness's one variance-scale rule on this run's stored validation Gaussian
    (``bench.derived_rows``): validation NLL at every grid scale, the chosen s, and its flag
    (an edge, or a curve flat within the bootstrap noise)."""

    scales: list[float]
    val_nll: list[float]
    chosen: float
    val_inputs: int
    flag: str | None = None


@dataclass
class RunRecord:
    """One run. ``status`` ok: every section is set; failed: ``error`` (and ``traceback``)."""

    task: str
    method: str
    seed: int
    status: Status
    config: Config | None = None
    data: Data | None = None
    costs: Costs | None = None
    memory: Memory | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    method_summary: dict[str, Any] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)
    provenance: Provenance | None = None
    error: str | None = None
    traceback: str | None = None
    predictions_sha256: str | None = None
    map_certificate: MapCertificate | None = None  # where the shared MAP stands on P (None: not recorded)
    scale_tuning: ScaleTuning | None = None  # methods with a logit Gaussian (None: none, or not recorded)
    schema: int = SCHEMA_VERSION  # as read: an older record is migrated, and says so here

    @property
    def ok(self) -> bool:
        return self.status is Status.OK

    @property
    def checkable(self) -> bool:
        """Its npz holds float64 predictions with a checksum (schema ≥ 2): metrics recompute exactly."""
        return self.predictions_sha256 is not None

    def to_json(self) -> dict[str, Any]:
        """The record as JSON-ready values (``bench.results.dumps_json`` writes it)."""
        out = dataclasses.asdict(self)
        out["status"] = self.status.value
        out["schema"] = SCHEMA_VERSION
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def from_json(cls, raw: Any) -> RunRecord:
        """Parse (and migrate) a record; a ``ValueError`` names what is missing or wrong."""
        if not isinstance(raw, dict):
            raise ValueError(f"it holds a {type(raw).__name__}, not a run record")
        schema = raw.get("schema", 1)
        if not isinstance(schema, int) or isinstance(schema, bool) or schema < 1:
            raise ValueError(f"its schema {schema!r} is not one bench writes (1 to {SCHEMA_VERSION})")
        if schema > SCHEMA_VERSION:
            raise ValueError(f"its schema {schema!r} is newer than this bench reads ({SCHEMA_VERSION}); update bench")
        if schema >= TYPED_SCHEMA and (unknown := sorted(set(raw) - _FIELDS)):
            raise ValueError(f"its field {unknown[0]!r} is not one schema {schema} has")
        if raw.get("status") == "ok" and "costs" not in raw and "timings" in raw:  # schema 1 or 2
            raw = _migrate_v2(raw)
        try:
            return _parse(raw)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(_why(exc)) from None


TYPED_SCHEMA = 3  # from here on every record is written from this dataclass: no other top-level field
_FIELDS = frozenset(f.name for f in dataclasses.fields(RunRecord))


def _why(exc: Exception) -> str:
    if isinstance(exc, KeyError):
        return f"its field {exc.args[0]!r} is missing"
    return str(exc).splitlines()[0]


def _number(value: Any, name: str, *, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"its field {name!r} is missing or not a finite number")
    return value


def _parse(raw: dict[str, Any]) -> RunRecord:
    status = Status(raw["status"]) if raw.get("status") in ("ok", "failed") else None
    if status is None:
        raise ValueError(f"its status is {raw.get('status')!r}, not 'ok' or 'failed'")
    for name, kind in (("task", str), ("method", str), ("seed", int)):
        if not isinstance(raw.get(name), kind) or isinstance(raw.get(name), bool):
            raise ValueError(f"its field {name!r} is missing or not a {kind.__name__}")
    head = {"task": raw["task"], "method": raw["method"], "seed": raw["seed"], "status": status,
            "schema": raw.get("schema", 1)}
    if status is Status.FAILED:
        if not isinstance(raw.get("error"), str):
            raise ValueError("its field 'error' is missing or not a str")
        return RunRecord(**head, error=raw["error"], traceback=raw.get("traceback"))
    metrics = raw["metrics"]
    if not isinstance(metrics, dict):
        raise ValueError("its field 'metrics' is missing or not a dict")
    for key, value in metrics.items():
        _number(value, f"metrics.{key}")
    costs = dict(raw["costs"])
    for name in ("data_s", "fit_posthoc_s", "predict_test_s", "predict_per_1k_s", "predict_other_s"):
        _number(costs.get(name), f"costs.{name}")
    costs["networks"] = [NetworkCost(**n) for n in costs["networks"]]
    if costs.get("estimate") is not None:
        costs["estimate"] = CostEstimate(**costs["estimate"])
    memory = Memory(**raw["memory"])
    for name in ("fit_peak_bytes", "predict_peak_bytes"):
        _number(getattr(memory, name), f"memory.{name}", optional=True)
    config = Config(**raw["config"])
    if not isinstance(config.smoke, bool):
        raise ValueError("its field 'config.smoke' is missing or not a bool")
    provenance = raw.get("provenance")
    return RunRecord(
        **head, config=config, data=Data(**raw.get("data", {"sizes": {}})), costs=Costs(**costs),
        memory=memory, metrics=metrics, method_summary=raw.get("method_summary", {}),
        flags=[str(f) for f in raw.get("flags", [])],
        provenance=Provenance(**provenance) if provenance else None,
        predictions_sha256=raw.get(CHECKSUM_KEY),
        map_certificate=MapCertificate(**raw["map_certificate"]) if raw.get("map_certificate") else None,
        scale_tuning=ScaleTuning(**raw["scale_tuning"]) if raw.get("scale_tuning") else None,
    )


def _migrate_v2(raw: dict[str, Any]) -> dict[str, Any]:
    """Schema 1/2 → 3: ``timings`` becomes ``costs`` with one entry per network; a cached
    network's seconds are unknown unless the record says costs were recorded; memory of an
    unmeasured kind becomes unknown."""
    out = dict(raw)
    timings = raw["timings"]
    recorded = timings.get("train_costs_recorded", False)
    cached = set(timings.get("models_cached", []))
    used = sorted(cached | set(timings.get("models_trained", [])))
    members = [m for m in used if m > 0]
    member_s = timings.get("member_train_s", 0.0)
    known_members = recorded or not cached - {0}

    def seconds(member: int) -> float | None:
        if member == 0:
            return timings.get("map_train_s", 0.0) if recorded or 0 not in cached else None
        return member_s / len(members) if known_members else None  # v2 kept only their sum

    out["costs"] = {
        "data_s": timings.get("data_s", 0.0),
        "networks": [{"member": m, "cached": m in cached, "seconds": seconds(m)} for m in used],
        "fit_posthoc_s": timings.get("fit_posthoc_s", timings["fit_s"] - member_s),
        "predict_test_s": timings.get("predict_test_s", 0.0),
        "predict_per_1k_s": timings["predict_per_1k_s"],
        "predict_other_s": timings.get("predict_other_s", 0.0),
    }
    memory = dict(raw["memory"])
    if memory.get("kind") in UNMEASURED_MEMORY:
        memory["fit_peak_bytes"] = memory["predict_peak_bytes"] = None
    memory.setdefault("kind", "unknown")
    out["memory"] = memory
    data = dict(raw.get("data", {}))
    out["data"] = {"sizes": data.pop("sizes", {}), "evaluated_subsets": data.pop("evaluated_subsets", {}),
                   "info": data}
    config = dict(raw["config"])
    config.setdefault("recipe", {})
    config.setdefault("device_requested", "auto")
    out["config"] = config
    del out["timings"]
    return out


def load_record(raw: Any, where: str) -> RunRecord:
    """:meth:`RunRecord.from_json` with a one-line error naming the file."""
    try:
        return RunRecord.from_json(raw)
    except ValueError as exc:
        raise BenchError(f"result file {where} is damaged: {exc}; delete it and rerun that run") from None
