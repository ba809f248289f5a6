"""bench.paired: vectorised resample metrics equal bench.metrics; paired intervals behave."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.metrics import evaluate
from bench.paired import _Run, paired_intervals
from bench.prediction_arrays import PredictionArrays


def fake_run(seed: int, n: int = 300, sharp: float = 3.0) -> PredictionArrays:
    g = torch.Generator().manual_seed(seed)

    def labelled(m: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, 4, (m,), generator=g)
        logits = sharp * torch.randn(m, 4, generator=g) + 2.0 * torch.nn.functional.one_hot(labels, 4)
        return logits.double().softmax(1), labels

    probs, labels = labelled(n)
    probs[:5] = torch.nn.functional.one_hot(labels[:5], 4).double()  # confidence exactly 1
    probs[5:9] = 0.25  # ties: the uniform predictive, entropy log 4
    ood = (0.5 * torch.randn(200, 4, generator=g)).double().softmax(1)
    ood[:3] = 0.25
    shifted, shift_labels = labelled(150)
    return PredictionArrays({"test/probs": probs.numpy(), "test/labels": labels.numpy(), "ood/noise/probs": ood.numpy(),
            "test/score/variance": 50 + 10 * torch.rand(n, generator=g).double().numpy(),  # outside [0, 1]
            "ood/noise/score/variance": 55 + 10 * torch.rand(200, generator=g).double().numpy(),
            "shift/blur/probs": shifted.numpy(), "shift/blur/labels": shift_labels.numpy()})


@pytest.mark.parametrize("seed", range(3))
def test_full_sample_metrics_equal_bench_metrics(seed: int) -> None:
    arrays = fake_run(seed)
    run = _Run(arrays)
    keys = run.keys()
    expected = evaluate(**arrays.metric_inputs())
    assert set(keys) == set(expected) - {"cal/mce", "shift/blur/mce", "shift/blur/brier"}
    got = run.metrics(keys, {s: np.ones((1, n)) for s, n in run.sizes.items()})[0]
    for key, value in zip(keys, got, strict=True):
        # torchmetrics returns its ECE in float32; everything else agrees to round-off
        assert value == pytest.approx(expected[key], rel=1e-6 if key.endswith("ece") else 1e-12), key


def test_a_method_against_itself_differs_by_exactly_zero() -> None:
    pairs = [(fake_run(s), fake_run(s)) for s in range(2)]
    for interval in paired_intervals(pairs, n_boot=200).values():
        assert interval.diff == interval.low == interval.high == 0.0 and not interval.excludes_zero()


def test_a_clearly_worse_method_gets_an_interval_that_excludes_zero_and_is_reproducible() -> None:
    pairs = []
    for s in range(2):
        good = fake_run(s)
        bad = PredictionArrays({**good.arrays, "test/probs": np.roll(good.probs("test"), 1, axis=1)})  # sure, wrong
        pairs.append((bad, good))
    out = paired_intervals(pairs, n_boot=300)
    assert out["cls/nll"].low > 0 and out["cls/acc"].high < 0
    assert out["cls/nll"].low <= out["cls/nll"].diff <= out["cls/nll"].high
    assert out["shift/blur/nll"].diff == 0.0  # the shift set was left alone
    assert out == paired_intervals(pairs, n_boot=300)


def test_runs_on_different_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="same inputs"):
        paired_intervals([(fake_run(0), fake_run(0, n=299))], n_boot=10)


def test_a_resample_given_by_counts_equals_the_metrics_of_the_resampled_arrays() -> None:
    arrays = fake_run(4)
    run = _Run(arrays)
    rng = np.random.default_rng(0)
    idx = {s: rng.integers(0, n, n) for s, n in run.sizes.items()}
    counts = {s: np.bincount(i, minlength=run.sizes[s]).astype(float)[None] for s, i in idx.items()}
    resampled = {k: v[idx["test" if k.startswith("test") else "/".join(k.split("/")[:2])]]
                 for k, v in arrays.arrays.items()}
    expected = evaluate(**PredictionArrays(resampled).metric_inputs())
    for key, value in zip(run.keys(), run.metrics(run.keys(), counts)[0], strict=True):
        assert value == pytest.approx(expected[key], rel=1e-6 if key.endswith("ece") else 1e-10), key
