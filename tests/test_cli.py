"""The command line as a user meets it: listing, runs, bad input, plugins, determinism."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_TASK, run_cli

from bench import cli
from bench.cli import main


def test_list_names_methods_and_tasks(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "method  map " in out and "task    fashion-mnist" in out


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
    (path,) = (tmp_path / "runs").glob(f"*/{method}/seed0.json")
    return json.loads(path.read_text())


def test_run_writes_json_and_npz_with_everything(tmp_path: Path) -> None:
    record = _run_tiny(tmp_path)
    npz = tmp_path / "runs" / "tiny-digits" / "map" / "seed0.npz"
    assert npz.exists()
    for key in ("cls/acc", "cls/nll", "cls/brier", "cal/ece", "cal/mce", "ood/shuffled/auroc/msp",
                "ood/shuffled/auroc/entropy", "shift/noisy/acc"):
        assert key in record["metrics"]
    assert record["metrics"]["cls/acc"] > 0.8
    assert record["provenance"]["versions"]["torch"]
    assert record["timings"]["predict_per_1k_s"] > 0
    assert {"fit_peak_bytes", "predict_peak_bytes", "kind"} <= record["memory"].keys()
    with np.load(npz) as data:
        assert data["test/probs"].shape == (497, 10)


def test_same_seed_twice_gives_identical_metrics(tmp_path: Path, isolated_cache: Path) -> None:
    first = _run_tiny(tmp_path / "a", task="tiny-digits(hidden=17)")  # fresh config: trains the MAP
    second = _run_tiny(tmp_path / "b", task="tiny-digits(hidden=17)")  # loads the cached checkpoint
    assert first["timings"]["map_cached"] is False and second["timings"]["map_cached"] is True
    assert first["metrics"] == second["metrics"]


def test_untrained_rerun_matches_cached_rerun(tmp_path: Path, isolated_cache: Path) -> None:
    """Determinism does not depend on the cache: delete it and the MAP comes out the same."""
    import shutil

    first = _run_tiny(tmp_path / "a", method="map-ts", task="tiny-digits(hidden=19)")
    shutil.rmtree(isolated_cache / "checkpoints")
    second = _run_tiny(tmp_path / "b", method="map-ts", task="tiny-digits(hidden=19)")
    assert second["timings"]["map_cached"] is False
    assert first["metrics"] == second["metrics"]


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
    again = json.loads((tmp_path / "runs" / "tiny-digits" / "map" / "seed0.json").read_text())
    assert again == earlier


def test_spec_string_options_name_the_results_folder(tmp_path: Path) -> None:
    assert main(["--plugin", str(TINY_TASK), "run", "--method", "map", "--task", "tiny-digits(hidden=12)",
                 "--out", str(tmp_path), "--quiet"]) == 0
    assert (tmp_path / "runs" / "tiny-digits@hidden=12" / "map" / "seed0.json").exists()


def test_capped_method_is_evaluated_on_a_fixed_recorded_subset(tmp_path: Path) -> None:
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
        assert np.array_equal(a["test/labels"], b["test/labels"])  # same subset for every seed


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
    # Used to die in argparse ("unrecognized arguments: --task") before reaching fidelity.
    assert cli.main(["fidelity", "--task", "nope", "--json"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
