"""SampleHistogram: the torchmetrics wrapper over qllm_samplers.diagnostics, with summed (DDP-mergeable) states."""

from __future__ import annotations

import pytest
import torch

from qllm_evals.metrics.histogram import SampleHistogram
from qllm_samplers.diagnostics import empirical_distribution, g_test, total_variation, tv_noise_floor


def _probs(v: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(v, generator=g, dtype=torch.float64) * 1.5, dim=0)


def test_sample_histogram_metric_accumulates_like_one_batch():
    g = torch.Generator().manual_seed(4)
    probs = _probs(16, seed=5)
    draws = torch.multinomial(probs, 3000, replacement=True, generator=g)
    metric = SampleHistogram(probs)
    for chunk in draws.split(700):
        metric.update(chunk)
    metric.update(torch.tensor([-1, -1, 16]))  # "no one-hot state" sentinels and an out-of-range id
    metric.update(torch.tensor([3, 4]), valid=torch.tensor([False, True]))
    result = metric.compute()
    counts = torch.bincount(torch.cat([draws, torch.tensor([4])]), minlength=16)
    assert int(result["n"]) == 3001
    assert float(result["invalid_rate"]) == pytest.approx(4 / 3005)
    assert float(result["tv"]) == pytest.approx(float(total_variation(counts / counts.sum(), probs)))
    assert float(result["p_value"]) == pytest.approx(g_test(counts, probs)[1])
    assert float(result["noise_floor"]) == pytest.approx(tv_noise_floor(3001, probs))
    # Two metrics merged (what DDP's sum reduction does) equal one metric that saw everything.
    first, second = SampleHistogram(probs), SampleHistogram(probs)
    first.update(draws[:1000])
    second.update(draws[1000:])
    first.merge_state(second)
    assert float(first.compute()["tv"]) == pytest.approx(float(total_variation(empirical_distribution(draws, 16),
                                                                                probs)))
