"""``bench fidelity``: exact curvature helpers and the smoke run on the tiny task."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.func import hessian

from bench.errors import BenchError
from bench_methods.regvar import fidelity, fidelity_full
from bench_methods.regvar.common import FlatModel

CPU = torch.device("cpu")


def problem(model: nn.Module, n: int = 30):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    torch.manual_seed(0)
    fm = FlatModel(model, torch.float64, CPU)
    return fm, x, y


def test_chunked_hessian_equals_torch_func_hessian() -> None:
    fm, x, y = problem(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)))
    wd = 0.05

    def objective(t: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(fm(t, x), y, reduction="sum") + 0.5 * len(x) * wd * t.pow(2).sum()

    expected = hessian(objective)(fm.theta0)
    got = fidelity.exact_hessian(fm, fm.theta0, x, y, wd, chunk=7)
    torch.testing.assert_close(got, 0.5 * (expected + expected.T))


def test_laplace_ggn_equals_the_hessian_for_a_linear_model() -> None:
    """For f linear in θ the GGN is the Hessian: this pins laplace-torch's scale and prior
    precision (n·wd on the summed loss) to our objective."""
    pytest.importorskip("laplace")
    model = nn.Linear(4, 3).double()
    fm, x, y = problem(model)
    wd = 0.05
    theta = fm.theta0
    h = fidelity.exact_hessian(fm, theta, x, y, wd)
    ggn = fidelity.ggn_precision(model, x, y, len(x) * wd)
    torch.testing.assert_close(ggn, h)


def test_quad_spearman_and_compare() -> None:
    a = torch.tensor([[2.0, 0.3], [0.3, 1.0]], dtype=torch.float64)
    j = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=torch.float64)
    torch.testing.assert_close(fidelity.quad(j, a)[:, 0], torch.linalg.inv(a).diagonal())
    t = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    assert fidelity.spearman(t, t**2) == pytest.approx(1.0)
    assert fidelity.spearman(t, -t) == pytest.approx(-1.0)
    c = fidelity.compare(1.1 * t, t)
    assert c["median_rel_err"] == pytest.approx(0.1)
    assert c["spearman"] == pytest.approx(1.0)


def test_smoke_run_on_the_tiny_task(tiny_task: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = fidelity.main(["--task", tiny_task, "--smoke", "--json", "--n", "4"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 4 and out["n_params"] <= 10_000
    assert out["map_grad_inf"] < 1e-6 and out["hessian_min_eig"] > 0
    for key in ("regvar", "regvar-amortized"):
        assert {"median_rel_err", "spearman"} <= set(out[key])
        assert {"median_rel_err", "spearman"} <= set(out["vs_ggn"][key])
    assert out["regvar"]["median_rel_err"] < 0.05
    assert out["regvar"]["weights"] == "all" and not out["regvar"]["solver_flags"]
    assert set(out["rel_err_vs_lam"]) and set(out["rel_err_vs_cg_iterations"])


def test_bad_prior_is_refused(tiny_task: str) -> None:
    with pytest.raises(BenchError, match="prior-precision"):
        fidelity.main(["--task", tiny_task, "--smoke", "--prior-precision", "0"])


@pytest.mark.slow
def test_full_model_check_on_the_cached_map_network(
    tiny_task: str, tmp_path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--model full reads the checkpoint `bench run` caches; regvar-ll is exact for its last layer."""
    from bench.runner import RunConfig, run

    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path / "cache"))  # no checkpoint until `run` makes one

    with pytest.raises(BenchError, match="bench run --method map"):
        fidelity.main(["--task", tiny_task, "--model", "full", "--n", "3"])
    run(RunConfig(method="map", task=tiny_task, out=tmp_path, quiet=True))
    assert fidelity.main(["--task", tiny_task, "--model", "full", "--n", "5", "--train-size", "300", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "full" and out["n"] == 5 and out["n_train"] == 300
    assert out["regvar"]["weights"] == "all" and out["regvar-ll"]["weights"] == "last-layer"
    for key in ("regvar", "regvar-ll"):
        entry = out[key]
        assert {"median_rel_err", "spearman", "vs_ggn", "target_true_hessian", "target_ggn", "seconds"} <= set(entry)
        assert entry["target_ggn"]["negative_curvature"] == 0  # the GGN is positive definite
        for kind in ("target_true_hessian", "target_ggn"):  # honest count: above tolerance is not converged
            t = entry[kind]
            assert t["not_converged"] >= t["negative_curvature"]
            assert (t["not_converged"] == 0) == (t["rel_residual_max"] <= fidelity_full.TARGET_RTOL
                                                 and t["negative_curvature"] == 0)
    ll = out["regvar-ll"]
    target = ll["target_true_hessian"]
    # the exact target converged: its true residual, recomputed after the solve, is within tolerance
    assert target["not_converged"] == 0 and target["negative_curvature"] == 0
    assert target["rel_residual_max"] <= fidelity_full.TARGET_RTOL
    assert ll["median_rel_err"] < 1e-2
    assert out["raw_checkpoint_curvature"]["probed_inputs"] == 5
