"""``bench.record``: the typed run record, its JSON round trip, and the migration of old records."""

from __future__ import annotations

import copy
import json

import pytest
from conftest import make_record

from bench.record import SCHEMA_VERSION, RunRecord, Status


def _v2(record: RunRecord, **timings: object) -> dict:
    """The shape schema 2 wrote (an untyped dict with a ``timings`` section)."""
    raw = record.to_json()
    raw.update(schema=2)
    del raw["costs"]
    raw["data"] = {"sizes": raw["data"]["sizes"], "evaluated_subsets": {}, "source": "x"}
    raw["timings"] = {"data_s": 0.5, "fit_s": 21.0, "fit_posthoc_s": 1.0, "map_train_s": 0.0,
                      "member_train_s": 20.0, "predict_test_s": 2.0, "predict_per_1k_s": 400.0,
                      "predict_other_s": 3.0, **timings}
    return raw


def test_round_trip_through_json_text() -> None:
    record = make_record()
    again = RunRecord.from_json(json.loads(json.dumps(record.to_json())))
    assert again == record
    assert record.to_json()["schema"] == SCHEMA_VERSION and record.to_json()["status"] == "ok"


def test_costs_charge_every_network_cached_or_not() -> None:
    costs = make_record().costs
    assert costs.train_s == 33.0 and costs.map_train_s == 10.0 and costs.member_train_s == 23.0
    assert costs.total_s == pytest.approx(0.5 + 11.0 + 1.0 + 2.0 + 3.0)  # wall time: only what ran now


def test_failed_run_is_the_same_type() -> None:
    failed = RunRecord("t", "m", 0, Status.FAILED, error="boom", traceback="tb")
    again = RunRecord.from_json(failed.to_json())
    assert again == failed and not again.ok and again.costs is None


def test_schema_2_loads_with_unknown_cached_costs_and_unmeasured_memory() -> None:
    old = _v2(make_record(), models_cached=[0, 1, 2], models_trained=[])
    old["memory"]["kind"] = "cpu_rss_growth"
    record = RunRecord.from_json(old)
    assert record.schema == 2 and record.data.info == {"source": "x"}
    assert record.costs.train_s is None  # cached networks were charged 0 s then: unknown, not 0
    assert record.memory.peak_bytes is None  # growth in a reused process is not a peak
    assert record.costs.fit_posthoc_s == 1.0 and record.costs.predict_per_1k_s == 400.0


def test_schema_2_with_recorded_costs_keeps_them() -> None:
    old = _v2(make_record(), models_cached=[0, 1, 2], models_trained=[], train_costs_recorded=True,
              map_train_s=10.0)
    record = RunRecord.from_json(old)
    assert record.costs.map_train_s == 10.0 and record.costs.member_train_s == pytest.approx(20.0)
    assert record.memory.peak_bytes == 7 * 2**20


@pytest.mark.parametrize(("kind", "settled", "lower_bound"), [
    ("cpu_rss_fresh_process", None, True),  # written before baselines were settled
    ("cpu_rss_fresh_process", True, False),
    ("cuda_peak_allocated", None, False),  # the allocator's own peak: never undercounted
])
def test_memory_is_a_lower_bound_only_on_cpu_without_a_settled_baseline(
    kind: str, settled: bool | None, lower_bound: bool
) -> None:
    raw = make_record().to_json()
    raw["memory"]["kind"] = kind
    raw["memory"].pop("settled", None)
    if settled is not None:
        raw["memory"]["settled"] = settled
    assert RunRecord.from_json(raw).memory.lower_bound is lower_bound


def test_schema_1_without_posthoc_split_derives_it() -> None:
    old = _v2(make_record(), models_trained=[0, 1, 2])
    old.update(schema=1)
    del old["timings"]["fit_posthoc_s"]
    record = RunRecord.from_json(old)
    assert record.costs.fit_posthoc_s == pytest.approx(1.0) and record.costs.train_s == pytest.approx(20.0)


@pytest.mark.parametrize("edit,message", [
    (lambda r: r.pop("metrics"), "'metrics' is missing"),
    (lambda r: r.pop("status"), "status is None"),
    (lambda r: r.update(seed="0"), "'seed' is missing or not a int"),
    (lambda r: r["costs"].pop("predict_per_1k_s"), "'costs.predict_per_1k_s' is missing"),
    (lambda r: r["config"].pop("smoke"), "smoke"),
    (lambda r: r["config"].update(smoke="no"), "'config.smoke' is missing or not a bool"),
    (lambda r: r["metrics"].update({"cls/nll": None}), "'metrics.cls/nll' is missing or not a finite number"),
    (lambda r: r.update(schema=SCHEMA_VERSION + 1), "newer than this bench reads"),
    (lambda r: r.update(schema=0), "its schema 0 is not one bench writes"),
    (lambda r: r.update(schema="6"), "its schema '6' is not one bench writes"),
    (lambda r: r.update(comment="hand-edited"), "its field 'comment' is not one schema"),
    (lambda r: r.pop("error"), "'error' is missing"),
])
def test_incomplete_records_are_named(edit, message: str) -> None:
    raw = copy.deepcopy(make_record().to_json())
    if "error" in message:
        raw = RunRecord("t", "m", 0, Status.FAILED, error="boom").to_json()
    edit(raw)
    with pytest.raises(ValueError, match=None) as caught:
        RunRecord.from_json(raw)
    assert message in str(caught.value)
    with pytest.raises(ValueError, match="not a run record"):
        RunRecord.from_json([1, 2])
