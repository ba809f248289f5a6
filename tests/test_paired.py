"""bench.paired: vectorised resample metrics equal bench.metrics; paired intervals behave."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.metrics import auroc, expected_calibration_error, negative_log_likelihood, predictive_entropy
from bench.paired import _Run, paired_intervals


def fake_run(seed: int, n: int = 300, sharp: float = 3.0) -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    logits = sharp * torch.randn(n, 4, generator=g) + 2.0 * torch.nn.functional.one_hot(labels, 4)
    probs = logits.double().softmax(1)
    probs[:5] = torch.nn.functional.one_hot(labels[:5], 4).double()  # confidence exactly 1
    probs[5:9] = 0.25  # ties: the uniform predictive, entropy log 4
    ood = (0.5 * torch.randn(200, 4, generator=g)).double().softmax(1)
    ood[:3] = 0.25
    return {"test/probs": probs.numpy(), "test/labels": labels.numpy(), "ood/noise/probs": ood.numpy()}


@pytest.mark.parametrize("seed", range(3))
def test_full_sample_metrics_equal_bench_metrics(seed: int) -> None:
    arrays = fake_run(seed)
    run = _Run(arrays)
    n_test, n_ood = len(arrays["test/labels"]), len(arrays["ood/noise/probs"])
    got = run.metrics(["cls/nll", "cal/ece", "ood/noise/auroc/entropy"],
                      {"test": np.arange(n_test)[None], "ood/noise": np.arange(n_ood)[None]})[0]
    probs, labels = torch.from_numpy(arrays["test/probs"]), torch.from_numpy(arrays["test/labels"])
    ood = torch.from_numpy(arrays["ood/noise/probs"])
    expected = [negative_log_likelihood(probs, labels), expected_calibration_error(probs, labels),
                auroc(predictive_entropy(probs), predictive_entropy(ood))]
    np.testing.assert_allclose(got[[0, 2]], [expected[0], expected[2]], rtol=1e-12)
    assert got[1] == pytest.approx(expected[1], rel=1e-6)  # torchmetrics returns its ECE in float32


def test_a_method_against_itself_differs_by_exactly_zero() -> None:
    pairs = [(fake_run(s), fake_run(s)) for s in range(2)]
    for interval in paired_intervals(pairs, n_boot=200).values():
        assert interval.diff == interval.low == interval.high == 0.0 and not interval.excludes_zero()


def test_a_clearly_worse_method_gets_an_interval_that_excludes_zero_and_is_reproducible() -> None:
    pairs = []
    for s in range(2):
        good = fake_run(s)
        bad = dict(good)
        bad["test/probs"] = np.roll(good["test/probs"], 1, axis=1)  # confidently wrong
        pairs.append((bad, good))
    out = paired_intervals(pairs, n_boot=300)
    assert out["cls/nll"].low > 0 and out["cls/nll"].excludes_zero()
    assert out["cls/nll"].low <= out["cls/nll"].diff <= out["cls/nll"].high
    assert out == paired_intervals(pairs, n_boot=300)
