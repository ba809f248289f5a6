"""The command line as a user meets it: listing, runs, bad input, plugins, determinism."""

from __future__ import annotations

import json
import platform
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_TASK, run_cli

from bench import cli
from bench.cli import main
from bench.record import RunRecord


def test_list_names_methods_and_tasks(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "method  map " in out and "task    fashion-mnist" in out


@pytest.mark.slow
def test_unknown_method_exits_2_and_names_valid_ones() -> None:
    proc = run_cli("run", "--method", "nope", "--task", "fashion-mnist")
    assert proc.returncode == 2
    assert "unknown method 'nope'" in proc.stderr and "map" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_task_suggests_closest(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--method", "map", "--task", "fashion-mnst"]) == 2
    assert "Did you mean 'fashion-mnist'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "setting,message",
    [("bogus=1", "unknown --set key 'bogus'"), ("epochs=-3", "must be ≥ 1"),
     ("dropout=abc", "bad value 'abc'"), ("noequals", "write it as key=value")],
)
def test_bad_settings_exit_2_naming_them(setting: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", "--method", "map", "--task", "fashion-mnist", "--set", setting])
    assert code == 2
    assert message in capsys.readouterr().err


def test_bad_device_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--method", "map", "--task", "fashion-mnist", "--device", "cuda:7"]) == 2
    assert "--device" in capsys.readouterr().err


def test_missing_data_dir_says_how_to_get_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", "--method", "map", "--task", "fashion-mnist", "--data-dir", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "apt-get install dataset-fashion-mnist" in err and str(tmp_path) in err


def _run_tiny(tmp_path: Path, *extra: str, method: str = "map", task: str = "tiny-digits") -> dict:
    assert main(["--plugin", str(TINY_TASK), "run", "--method", method, "--task", task,
                 "--out", str(tmp_path), "--quiet", *extra]) == 0
    (path,) = (tmp_path / "runs").glob("*/*/seed0.json")  # one run per folder
    return RunRecord.from_json(json.loads(path.read_text()))


def test_run_writes_json_and_npz_with_everything(tmp_path: Path) -> None:
    record = _run_tiny(tmp_path)
    npz = tmp_path / "runs" / "tiny-digits" / "map" / "seed0.npz"
    assert npz.exists()
    for key in ("cls/acc", "cls/nll", "cls/brier", "cal/ece", "cal/mce", "ood/shuffled/auroc/msp",
                "ood/shuffled/auroc/entropy", "shift/noisy/acc"):
        assert key in record.metrics
    assert record.metrics["cls/acc"] > 0.8
    assert record.provenance.versions["torch"]
    assert record.costs.predict_per_1k_s > 0
    # in a process that ran other tests first the heap may already hold what the run needs: a peak
    # above that baseline can be 0 there, and its kind says it was shared (sweeps give each run its own)
    assert record.memory.kind in ("cpu_rss_fresh_process", "cpu_peak_rss_above_baseline")
    assert not record.memory.mmap_threshold_fixed  # opt-in (BENCH_FIX_MMAP_THRESHOLD=1)
    fresh = record.memory.kind == "cpu_rss_fresh_process"
    assert record.memory.peak_bytes > 0 if fresh else record.memory.peak_bytes >= 0
    with np.load(npz) as data:
        assert data["test/probs"].shape == (497, 10)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator")
def test_a_run_can_fix_the_mmap_threshold_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BENCH_FIX_MMAP_THRESHOLD", "1")
    proc = run_cli("--plugin", str(TINY_TASK), "run", "--method", "map", "--task", "tiny-digits", "--smoke",
                   "--out", str(tmp_path), "--quiet")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(next(tmp_path.rglob("seed0.json")).read_text())
    assert record["memory"]["mmap_threshold_fixed"] is True


def test_same_seed_twice_gives_identical_metrics(tmp_path: Path, isolated_cache: Path) -> None:
    first = _run_tiny(tmp_path / "a", task="tiny-digits(hidden=17)")  # fresh config: trains the MAP
    second = _run_tiny(tmp_path / "b", task="tiny-digits(hidden=17)")  # loads the cached checkpoint
    assert not first.costs.networks[0].cached and second.costs.networks[0].cached
    assert first.metrics == second.metrics


def test_a_network_a_method_retrains_is_cached_and_charged_like_any_other(tmp_path: Path) -> None:
    """mc-dropout at another rate trains its network through the context: cached, costed, same metrics."""
    spec, task = "mc-dropout(rate=0.3)", "tiny-digits(hidden=29)"
    first = _run_tiny(tmp_path / "a", method=spec, task=task)
    second = _run_tiny(tmp_path / "b", method=spec, task=task)
    assert [(n.member, n.variant, n.cached) for n in first.costs.networks] == [(0, "dropout=0.3", False)]
    assert [(n.member, n.variant, n.cached) for n in second.costs.networks] == [(0, "dropout=0.3", True)]
    assert second.costs.train_s == first.costs.train_s > 0 and first.costs.map_train_s == 0
    assert first.metrics == second.metrics


@pytest.mark.slow
def test_a_cached_network_is_charged_what_it_cost_to_train(tmp_path: Path, isolated_cache: Path) -> None:
    """Costs do not depend on the cache: a cached MAP or ensemble member costs what training it did."""
    spec = "ensemble(members=3)"
    first = _run_tiny(tmp_path / "a", method=spec, task="tiny-digits(hidden=23)")
    second = _run_tiny(tmp_path / "b", method=spec, task="tiny-digits(hidden=23)")
    assert [(n.member, n.cached) for n in first.costs.networks] == [(0, False), (1, False), (2, False)]
    assert [(n.member, n.cached) for n in second.costs.networks] == [(0, True), (1, True), (2, True)]
    assert second.costs.networks == [replace(n, cached=True) for n in first.costs.networks]
    assert second.costs.map_train_s == first.costs.map_train_s > 0
    assert second.costs.train_s == first.costs.train_s > 2 * first.costs.map_train_s / 2  # three trainings
    assert all(n.peak_bytes is not None and n.threads for n in second.costs.networks)


SPLIT_TASK = '''
import os
from bench.tasks.base import TASKS, TaskData, register_task
from torch.utils.data import TensorDataset

Tiny = TASKS.get("tiny-digits")

@register_task("tiny-moving-split")
class MovingSplit(Tiny):
    """tiny-digits whose training rows and network width depend on environment variables,
    its options unchanged (as a user's edited plugin would)."""
    def make_model(self, num_classes):
        import torch.nn as nn
        h = int(os.environ.get("TINY_WIDTH", "32"))
        return nn.Sequential(nn.Linear(64, h), nn.ReLU(), nn.Linear(h, num_classes))

    def load(self) -> TaskData:
        data = Tiny.load(self)
        k = int(os.environ.get("TINY_SPLIT_SHIFT", "0"))
        x, y = data.train.tensors
        return TaskData(train=TensorDataset(x[k:], y[k:]), val=data.val, test=data.test,
                        num_classes=10, ood=data.ood, shift=data.shift, info=data.info)
'''


@pytest.mark.slow
def test_a_changed_split_or_network_never_reuses_a_checkpoint(
    tmp_path: Path, isolated_cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    plugin = tmp_path / "moving.py"
    plugin.write_text(SPLIT_TASK)

    def cached(out: str) -> tuple[bool, str]:
        capsys.readouterr()
        assert main(["--plugin", str(TINY_TASK), "--plugin", str(plugin), "run", "--method", "map",
                     "--task", "tiny-moving-split", "--out", str(tmp_path / out)]) == 0
        raw = json.loads((tmp_path / out / "runs" / "tiny-moving-split" / "map" / "seed0.json").read_text())
        log = [line for line in capsys.readouterr().err.splitlines() if "MAP model:" in line]
        return RunRecord.from_json(raw).costs.networks[0].cached, log[0]

    loaded, line = cached("a")
    assert not loaded and "no cached checkpoint; training" in line
    loaded, line = cached("b")
    assert loaded and "loaded cached checkpoint" in line
    monkeypatch.setenv("TINY_SPLIT_SHIFT", "7")  # same task options, different training rows
    loaded, line = cached("c")
    assert not loaded and "the network's training data changed since the cached checkpoint" in line
    monkeypatch.delenv("TINY_SPLIT_SHIFT")
    monkeypatch.setenv("TINY_WIDTH", "20")  # same options and data, another network
    loaded, line = cached("d")
    assert not loaded and "the network's architecture changed since the cached checkpoint" in line
    assert "not reusing it; training" in line


@pytest.mark.slow
def test_untrained_rerun_matches_cached_rerun(tmp_path: Path, isolated_cache: Path) -> None:
    """Determinism does not depend on the cache: delete it and the MAP comes out the same."""
    import shutil

    first = _run_tiny(tmp_path / "a", method="map-ts", task="tiny-digits(hidden=19)")
    shutil.rmtree(isolated_cache / "checkpoints")
    second = _run_tiny(tmp_path / "b", method="map-ts", task="tiny-digits(hidden=19)")
    assert not second.costs.networks[0].cached
    assert first.metrics == second.metrics


@pytest.mark.slow
def test_plugin_method_from_outside_the_repo_runs(tmp_path: Path) -> None:
    plugin = tmp_path / "my_method.py"
    plugin.write_text(textwrap.dedent('''
        import torch
        from bench.method_api import Method, register_method
        from bench.types import Prediction

        @register_method("uniform-guess")
        class Uniform(Method):
            """Predicts the uniform distribution (a user's own method)."""
            uses_map = False
            def fit(self, ctx):
                self.c = ctx.data.num_classes
            def predict(self, x):
                return Prediction(torch.full((len(x), self.c), 1.0 / self.c), {"const": torch.zeros(len(x))})
    '''))
    proc = run_cli("--plugin", str(TINY_TASK), "--plugin", str(plugin), "run", "--method", "uniform-guess",
                   "--task", "tiny-digits", "--out", str(tmp_path / "out"), "--quiet")
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "out/runs/tiny-digits/uniform-guess/seed0.json").read_text())
    assert record["metrics"]["cls/nll"] == pytest.approx(np.log(10))


def test_duplicate_registration_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plugin = tmp_path / "dup.py"
    plugin.write_text("from bench.method_api import register_method\n"
                      "from bench_methods.map import MAP\n"
                      "@register_method('map')\nclass Again(MAP):\n    pass\n")
    assert main(["--plugin", str(plugin), "list"]) == 2
    assert "method 'map' is already registered" in capsys.readouterr().err


def test_interrupted_run_writes_nothing_and_keeps_earlier_results(tmp_path: Path) -> None:
    earlier = _run_tiny(tmp_path)
    plugin = tmp_path / "interrupt.py"
    plugin.write_text(textwrap.dedent('''
        from bench.method_api import register_method
        from bench_methods.map import MAP

        @register_method("interrupted")
        class Interrupted(MAP):
            """Simulates Ctrl-C during prediction."""
            def predict(self, x):
                raise KeyboardInterrupt
    '''))
    code = main(["--plugin", str(TINY_TASK), "--plugin", str(plugin), "run", "--method", "interrupted",
                 "--task", "tiny-digits", "--out", str(tmp_path), "--quiet"])
    assert code == 130
    assert not (tmp_path / "runs" / "tiny-digits" / "interrupted").exists() or not any(
        (tmp_path / "runs" / "tiny-digits" / "interrupted").iterdir()
    )
    again = RunRecord.from_json(json.loads((tmp_path / "runs" / "tiny-digits" / "map" / "seed0.json").read_text()))
    assert again == earlier


def test_spec_string_options_name_the_results_folder(tmp_path: Path) -> None:
    assert main(["--plugin", str(TINY_TASK), "run", "--method", "map", "--task", "tiny-digits(hidden=12)",
                 "--out", str(tmp_path), "--quiet"]) == 0
    assert (tmp_path / "runs" / "tiny-digits@hidden=12" / "map" / "seed0.json").exists()


def test_capped_method_is_evaluated_on_its_own_recorded_subset_per_seed(tmp_path: Path) -> None:
    plugin = tmp_path / "capped.py"
    plugin.write_text(textwrap.dedent('''
        from bench.method_api import register_method
        from bench_methods.map import MAP

        @register_method("capped-map")
        class Capped(MAP):
            """MAP that accepts at most 50 inputs per call, like per-input RegVar."""
            eval_limit = 50
            def predict(self, x):
                assert len(x) <= 50
                return super().predict(x)
    '''))
    for seed in ("0", "1"):
        assert main(["--plugin", str(TINY_TASK), "--plugin", str(plugin), "run", "--method", "capped-map",
                     "--task", "tiny-digits", "--out", str(tmp_path), "--quiet", "--seed", seed]) == 0
    runs = tmp_path / "runs" / "tiny-digits" / "capped-map"
    record = json.loads((runs / "seed0.json").read_text())
    assert record["data"]["evaluated_subsets"] == {"test": 50, "ood/shuffled": 50, "shift/noisy": 50}
    with np.load(runs / "seed0.npz") as a, np.load(runs / "seed1.npz") as b:
        assert a["test/probs"].shape == (50, 10)
        assert not np.array_equal(a["index/test"], b["index/test"])  # each seed draws its own inputs
        for arrays in (a, b):  # the recorded indices are the evaluated inputs
            assert len(set(arrays["index/test"].tolist())) == 50


@pytest.mark.parametrize(
    ("argv", "head", "rest"),
    [
        (["fidelity", "--task", "t", "--json"], ["fidelity"], ["--task", "t", "--json"]),
        (["--plugin", "p.py", "perf", "laplace", "--n", "3"], ["--plugin", "p.py", "perf"], ["laplace", "--n", "3"]),
        (["--plugin=p.py", "fidelity", "--smoke"], ["--plugin=p.py", "fidelity"], ["--smoke"]),
        (["run", "--method", "map"], ["run", "--method", "map"], None),
    ],
)
def test_perf_and_fidelity_get_their_options_verbatim(argv: list[str], head: list[str], rest: list[str] | None) -> None:
    assert cli._split_passthrough(argv) == (head, rest)


def test_fidelity_options_reach_its_parser(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["fidelity", "--task", "nope", "--json"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err


def _benchmark_names() -> list[str]:
    from bench.perf import PERF
    from bench.perf.loader import load_all

    load_all()
    return PERF.names()


@pytest.mark.parametrize("name", _benchmark_names())
def test_every_registered_benchmark_takes_its_options_from_the_cli(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The registered entry is the benchmark's main: it parses the options the CLI hands it."""
    with pytest.raises(SystemExit) as exited:
        cli.main(["perf", name, "--help"])
    assert exited.value.code == 0
    assert f"usage: bench perf {name}" in capsys.readouterr().out


# --- Failures are one line, exit 2, and write nothing ----------------------------------

def _one_line_error(code: int, err: str, *needles: str) -> str:
    """Exit 2 and exactly one line on stderr, ``bench: error: ...``, holding every needle."""
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("bench: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _no_results(out: Path) -> None:
    assert not list(out.rglob("seed*.json")) and not list(out.rglob("*.npz")) and not list(out.rglob("*.tmp"))


@pytest.mark.parametrize("seed", ["-1", str(2**63), str(2**64)])
def test_seed_outside_0_to_2_63_is_one_line(seed: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--plugin", str(TINY_TASK), "run", "--method", "map", "--task", "tiny-digits", "--out",
                 str(tmp_path), "--quiet", "--seed", seed])
    _one_line_error(code, capsys.readouterr().err, f"bad seed {seed}", "2**63 - 1")
    _no_results(tmp_path)


def test_meta_device_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--plugin", str(TINY_TASK), "run", "--method", "map", "--task", "tiny-digits", "--out",
                 str(tmp_path), "--quiet", "--device", "meta"])
    _one_line_error(code, capsys.readouterr().err, "bad --device 'meta'")
    _no_results(tmp_path)


def test_plugin_directory_is_reported_as_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _one_line_error(main(["--plugin", str(tmp_path), "list"]), capsys.readouterr().err, "is a directory")


def test_readme_spec_examples_resolve() -> None:
    """Every ``--method "..."``/``--task "..."`` spec in the README parses (it once said hessian=diag)."""
    import re

    from bench.runner import RunConfig, resolve

    readme = (TINY_TASK.parents[2] / "README.md").read_text()
    methods = re.findall(r'--method "([^"]+)"', readme)
    tasks = re.findall(r'--task "([^"]+)"', readme)
    assert any("structure=diag" in m for m in methods)
    for method in methods:
        resolve(RunConfig(method=method, task="fashion-mnist"))
    for task in tasks:
        resolve(RunConfig(method="map", task=task))


BAD_OUTPUT = '''
import torch
from bench.method_api import register_method
from bench_methods.map import MAP
from bench.types import Prediction

@register_method("bad-{name}")
class Bad(MAP):
    """MAP whose output is broken on purpose."""
    def predict(self, x):
        good = super().predict(x)
        probs, n = good.probs, len(x)
        {body}
'''

BAD_OUTPUTS = {
    "nan-score": ('return Prediction(probs, {"variance": torch.full((n,), float("nan"))})',
                  "score 'variance' is NaN or inf for 497 of 497 inputs"),
    "inf-score": ('return Prediction(probs, {"variance": torch.where(torch.arange(n) == 3, float("inf"), 1.0)})',
                  "score 'variance' is NaN or inf for 1 of 497 inputs"),
    "nan-probs": ("return Prediction(probs * float('nan'))", "probabilities are NaN or inf in 497 of 497 rows"),
    "extra-rows": ("return Prediction(torch.cat([probs, probs[:1]]))", "expected (497, 10) for 497 inputs"),
    "few-classes": ("return Prediction(probs[:, :9] / probs[:, :9].sum(1, keepdim=True))",
                    "9 classes, the task has 10"),
    "unnormalised": ("return Prediction(probs * 2)", "do not sum to 1"),
    "score-shape": ('return Prediction(probs, {"variance": torch.ones(n, 2)})', "score 'variance' must have shape"),
    "not-a-prediction": ("return probs", "returned a Tensor for the test set, not a Prediction"),
    "scores-vanish": ('self.calls = getattr(self, "calls", 0) + 1; '
                      'return Prediction(probs, {"variance": torch.ones(n)} if self.calls == 1 else {})',
                      "returned scores [] for OOD set 'shuffled' but ['variance'] for the test set"),
}


@pytest.mark.parametrize("name", BAD_OUTPUTS)
def test_invalid_method_output_is_one_line_naming_the_method(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Checked before any metric: a NaN score once became AUROC 0.5 and was written with exit 0."""
    body, message = BAD_OUTPUTS[name]
    plugin = tmp_path / f"bad_{name.replace('-', '_')}.py"
    plugin.write_text(BAD_OUTPUT.format(name=name, body=body))
    out = tmp_path / "out"
    code = main(["--plugin", str(TINY_TASK), "--plugin", str(plugin), "run", "--method", f"bad-{name}",
                 "--task", "tiny-digits", "--out", str(out), "--quiet"])
    _one_line_error(code, capsys.readouterr().err, f"method bad-{name} returned", message)
    _no_results(out)


@pytest.mark.slow
def test_nan_score_from_the_command_line_is_one_line(tmp_path: Path) -> None:
    plugin = tmp_path / "bad_nan.py"
    plugin.write_text(BAD_OUTPUT.format(name="nan-cli", body=BAD_OUTPUTS["nan-score"][0]))
    proc = run_cli("--plugin", str(TINY_TASK), "--plugin", str(plugin), "run", "--method", "bad-nan-cli",
                   "--task", "tiny-digits", "--out", str(tmp_path / "out"), "--quiet")
    _one_line_error(proc.returncode, proc.stderr, "method bad-nan-cli returned an invalid prediction for the test set")
    _no_results(tmp_path / "out")


DIVERGING_TASK = '''
from dataclasses import replace
from bench.tasks.base import TASKS, register_task

Tiny = TASKS.get("tiny-digits")

@register_task("tiny-diverging")
class Diverging(Tiny):
    """tiny-digits trained with an absurd learning rate: its MAP training diverges to NaN."""
    def recipe(self):
        return replace(super().recipe(), lr=1e20)
'''


@pytest.fixture(scope="module")
def diverging_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    plugin = tmp_path_factory.mktemp("plugins") / "diverging.py"
    plugin.write_text(DIVERGING_TASK)
    return plugin


def _checkpoints(cache: Path) -> set[Path]:
    return set(cache.rglob("*.pt"))


@pytest.mark.parametrize("method", ["map", "ensemble(members=2)"])
def test_diverged_training_blames_training_and_caches_nothing(
    method: str, diverging_task: Path, tmp_path: Path, isolated_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cached = _checkpoints(isolated_cache)
    code = main(["--plugin", str(TINY_TASK), "--plugin", str(diverging_task), "run", "--method", method,
                 "--task", "tiny-diverging", "--out", str(tmp_path), "--quiet"])
    line = _one_line_error(code, capsys.readouterr().err, "training diverged (MAP model)", "not the method",
                           "nothing was cached")
    assert "invalid prediction" not in line
    assert _checkpoints(isolated_cache) == cached
    _no_results(tmp_path)


def test_nan_checkpoint_in_the_cache_is_moved_aside_and_retrained(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkpoint with NaN weights (from a diverged training that was cached) is never used."""
    import torch

    from bench.plugins import load_plugin
    from bench.tasks import TASKS
    from bench.training import TrainingCost, load_state, map_checkpoint, save_cost

    load_plugin(TINY_TASK)
    task = TASKS.get("tiny-digits")(TASKS.get("tiny-digits").Options(hidden=29))
    model, path = map_checkpoint(task, task.load(), 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: torch.full_like(v, float("nan")) for k, v in model.state_dict().items()}, path)
    save_cost(path, TrainingCost(1.0, "cpu"))
    code = main(["--plugin", str(TINY_TASK), "run", "--method", "map", "--task", "tiny-digits(hidden=29)",
                 "--out", str(tmp_path)])
    assert code == 0
    err = capsys.readouterr().err
    assert f"cached checkpoint {path} holds NaN or inf weights; moved it to seed0.pt.corrupt and retraining" in err
    assert path.with_name("seed0.pt.corrupt").exists() and load_state(model, path)  # retrained, finite


def test_unwritable_out_stops_before_training(
    tmp_path: Path, isolated_cache: Path, read_only, capsys: pytest.CaptureFixture[str]
) -> None:
    cached = _checkpoints(isolated_cache)
    blocked = read_only(tmp_path / "ro")
    code = main(["--plugin", str(TINY_TASK), "run", "--method", "map", "--task", "tiny-digits(hidden=31)",
                 "--out", str(blocked / "results"), "--quiet"])
    _one_line_error(code, capsys.readouterr().err, f"cannot write {blocked}/results/runs", "writable directory")
    a_file = tmp_path / "file"
    a_file.write_text("")
    code = main(["--plugin", str(TINY_TASK), "run", "--method", "map", "--task", "tiny-digits(hidden=31)",
                 "--out", str(a_file), "--quiet"])
    _one_line_error(code, capsys.readouterr().err, f"cannot write {a_file}/runs")
    assert _checkpoints(isolated_cache) == cached  # nothing was trained
