"""Distribution metrics (TV, KL, G-test, noise floor) and MCMC diagnostics (tau, ESS, R-hat)."""

from __future__ import annotations

import math

import pytest
import torch

from qllm_samplers.diagnostics.distribution import (
    chi_square_test,
    empirical_distribution,
    g_test,
    kl_divergence,
    total_variation,
    tv_noise_floor,
)
from qllm_samplers.diagnostics.mcmc import autocorrelation_time, effective_sample_size, split_rhat


def _probs(v: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(v, generator=g, dtype=torch.float64) * 1.5, dim=0)


# ----------------------------------------------------------------------------------------- distances
def test_total_variation_and_kl_known_values():
    p = torch.tensor([0.5, 0.5, 0.0])
    q = torch.tensor([0.25, 0.25, 0.5])
    assert float(total_variation(p, q)) == pytest.approx(0.5)
    assert float(total_variation(q, p)) == pytest.approx(0.5)
    assert float(kl_divergence(p, q)) == pytest.approx(math.log(2.0))
    assert float(kl_divergence(q, p)) == math.inf  # q puts mass where p has none
    assert float(kl_divergence(q, q)) == 0.0
    batched = total_variation(torch.stack([p, q]), torch.stack([q, q]))
    assert batched.shape == (2,) and batched.tolist() == pytest.approx([0.5, 0.0])


def test_distances_reject_bad_input():
    with pytest.raises(ValueError, match="same number of categories"):
        total_variation(torch.ones(3) / 3, torch.ones(4) / 4)
    with pytest.raises(ValueError, match="p must be non-negative"):
        kl_divergence(torch.tensor([float("nan"), 1.0]), torch.tensor([0.5, 0.5]))


def test_empirical_distribution():
    samples = torch.tensor([0, 2, 2, 3])
    assert empirical_distribution(samples, 5).tolist() == [0.25, 0.0, 0.5, 0.25, 0.0]
    with pytest.raises(ValueError, match="num_categories"):
        empirical_distribution(torch.tensor([0, 5]), 5)
    with pytest.raises(ValueError, match="at least one draw"):
        empirical_distribution(torch.tensor([], dtype=torch.long), 5)


# ----------------------------------------------------------------------------------------- tests of fit
def test_g_test_p_value_matches_closed_form_chi_square():
    # With two degrees of freedom the chi-square survival function is exp(-x / 2).
    counts = torch.tensor([30.0, 50.0, 20.0], dtype=torch.float64)
    probs = torch.tensor([0.3, 0.4, 0.3], dtype=torch.float64)
    statistic, p_value, dof = g_test(counts, probs)
    expected = 100 * probs
    assert dof == 2
    assert statistic == pytest.approx(float(2 * (counts * torch.log(counts / expected)).sum()))
    assert p_value == pytest.approx(math.exp(-statistic / 2), rel=1e-10)
    pearson, p_pearson, _ = chi_square_test(counts, probs)
    assert pearson == pytest.approx(float(((counts - expected) ** 2 / expected).sum()))
    assert p_pearson == pytest.approx(math.exp(-pearson / 2), rel=1e-10)


def test_g_test_is_calibrated_under_the_null_and_rejects_a_biased_sampler():
    g = torch.Generator().manual_seed(0)
    probs = _probs(32, seed=1)
    draws = torch.multinomial(probs.expand(300, -1), 2000, replacement=True, generator=g)
    p_values = torch.tensor([g_test(torch.bincount(row, minlength=32), probs)[1] for row in draws])
    # Under the null, p-values are uniform: about 5% below 0.05 (binomial sd over 300 runs: 1.3%).
    assert 0.01 < float((p_values < 0.05).float().mean()) < 0.10
    assert 0.4 < float(p_values.mean()) < 0.6
    # A sampler at temperature 1.1 instead of 1 is rejected decisively with 10,000 draws.
    biased = torch.softmax(torch.log(probs) / 1.1, dim=0)
    counts = torch.bincount(torch.multinomial(biased, 10_000, replacement=True, generator=g), minlength=32)
    assert g_test(counts, probs)[1] < 1e-6


def test_g_test_pools_rare_categories_and_flags_impossible_draws():
    probs = torch.tensor([0.5, 0.49, 0.004, 0.003, 0.003])
    counts = torch.tensor([50.0, 49.0, 1.0, 0.0, 0.0])
    _, _, dof = g_test(counts, probs)  # the three rare bins (expected < 5) become one: 3 bins, dof 2
    assert dof == 2
    assert g_test(counts, probs, min_expected=0)[2] == 4
    statistic, p_value, _ = g_test(torch.tensor([5.0, 4.0, 1.0]), torch.tensor([0.5, 0.5, 0.0]))
    assert statistic == math.inf and p_value == 0.0
    with pytest.raises(ValueError, match="same length"):
        g_test(torch.ones(3), torch.ones(4) / 4)


def test_tv_noise_floor_matches_simulated_exact_sampler():
    g = torch.Generator().manual_seed(2)
    probs = _probs(32, seed=3)
    n = 10_000
    draws = torch.multinomial(probs.expand(400, -1), n, replacement=True, generator=g)
    tvs = torch.stack([total_variation(empirical_distribution(row, 32), probs) for row in draws])
    floor = tv_noise_floor(n, probs)
    assert float(tvs.mean()) == pytest.approx(floor, rel=0.08)
    # It scales as 1 / sqrt(n).
    assert tv_noise_floor(4 * n, probs) == pytest.approx(floor / 2, rel=1e-12)
    with pytest.raises(ValueError, match="n must be >= 1"):
        tv_noise_floor(0, probs)


# ----------------------------------------------------------------------------------------- MCMC
def _ar1(rho: float, num_chains: int, n: int, seed: int, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """AR(1) chains x_t = rho x_{t-1} + sqrt(1 - rho^2) e_t started in stationarity: tau = (1+rho)/(1-rho)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(num_chains, n, generator=g, dtype=torch.float64)
    x = torch.empty_like(noise)
    x[:, 0] = noise[:, 0]
    scale = math.sqrt(1 - rho * rho)
    for t in range(1, n):
        x[:, t] = rho * x[:, t - 1] + scale * noise[:, t]
    return x if offsets is None else x + offsets[:, None]


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9, -0.5])
def test_autocorrelation_time_of_ar1(rho):
    chains = _ar1(rho, num_chains=8, n=20_000, seed=6)
    tau = (1 + rho) / (1 - rho)
    assert autocorrelation_time(chains) == pytest.approx(tau, rel=0.1)
    assert effective_sample_size(chains) == pytest.approx(chains.numel() / tau, rel=0.1)
    # One chain works too.
    assert autocorrelation_time(chains[0]) == pytest.approx(tau, rel=0.25)


def test_autocorrelation_time_counts_chains_stuck_apart_and_constant_chains():
    # Chains that each look iid but sit at different levels are not independent draws of the pooled target.
    stuck = _ar1(0.0, 4, 2000, seed=7, offsets=torch.tensor([0.0, 3.0, 6.0, 9.0]))
    assert autocorrelation_time(stuck) > 50
    assert math.isnan(autocorrelation_time(torch.ones(100)))
    assert math.isnan(effective_sample_size(torch.ones(3, 100)))
    with pytest.raises(ValueError, match="at least 4 draws"):
        autocorrelation_time(torch.ones(3))
    with pytest.raises(ValueError, match=r"\[N\] or \[C, N\]"):
        effective_sample_size(torch.ones(2, 3, 4))


def test_split_rhat():
    iid = _ar1(0.0, 4, 4000, seed=8)
    assert abs(split_rhat(iid) - 1) < 0.01
    assert abs(split_rhat(iid, rank_normalized=True) - 1) < 0.01
    shifted = _ar1(0.5, 4, 4000, seed=9, offsets=torch.tensor([0.0, 0.0, 0.0, 2.0]))
    assert split_rhat(shifted) > 1.2
    assert split_rhat(shifted, rank_normalized=True) > 1.2
    # A single drifting chain is caught by the split.
    drifting = torch.linspace(0, 5, 2000, dtype=torch.float64)[None] + _ar1(0.0, 1, 2000, seed=10)
    assert split_rhat(drifting) > 1.5
    # Same mean, different scale: only the folded (tail) R-hat sees it.
    scaled = _ar1(0.0, 4, 4000, seed=11) * torch.tensor([1.0, 1.0, 1.0, 5.0], dtype=torch.float64)[:, None]
    assert split_rhat(scaled) < 1.05 < split_rhat(scaled, rank_normalized=True)
    # Discrete draws (token ids) work with the rank version.
    g = torch.Generator().manual_seed(12)
    tokens = torch.randint(0, 5, (4, 1000), generator=g)
    assert abs(split_rhat(tokens, rank_normalized=True) - 1) < 0.02
    assert split_rhat(torch.ones(2, 10)) == 1.0
    assert split_rhat(torch.stack([torch.ones(10), 2 * torch.ones(10)])) == math.inf
