"""How far a sampler's draws are from an exact categorical distribution.

One implementation for every sampler test and experiment in the repo. The reference is always the exact
target distribution (e.g. ``softmax(beta * z)``), never a second empirical histogram: comparing two noisy
histograms doubles the noise and hides small biases.

- ``total_variation(p, q)`` and ``kl_divergence(p, q)`` (KL(p || q)) between probability vectors;
- ``empirical_distribution(samples, num_categories)``: the normalised histogram of integer draws;
- ``g_test(counts, expected_probs)``: the likelihood-ratio goodness-of-fit test, ``(statistic, p_value, dof)``;
- ``chi_square_test(counts, expected_probs)``: Pearson's version, same return value;
- ``tv_noise_floor(n, probs)``: the TV an exact sampler is expected to show with n draws;
(``qllm_evals.metrics.SampleHistogram`` is the torchmetrics ``Metric`` that accumulates counts across batches or
processes and reports all of the above; it computes with these functions.)

Everything is computed in float64. p-values use the regularised upper incomplete gamma function
(``torch.special.gammaincc``), the chi-square survival function, so no scipy is needed.
"""

from __future__ import annotations

import math

import torch


def _as_probs(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x).to(torch.float64)
    if t.dim() == 0:
        raise ValueError(f"{name} must have at least one dimension (categories last), got a scalar")
    if torch.isnan(t).any() or (t < 0).any():
        raise ValueError(f"{name} must be non-negative probabilities without NaN")
    return t


def total_variation(p, q) -> torch.Tensor:
    """TV(p, q) = 0.5 * sum_k |p_k - q_k| over the last dimension (leading dimensions are batched).

    Returns a float64 tensor of the leading shape (0-dim for vectors; ``float(tv)`` gives the number).
    """
    p, q = _as_probs(p, "p"), _as_probs(q, "q")
    if p.shape[-1] != q.shape[-1]:
        raise ValueError(f"p and q must have the same number of categories, got {p.shape[-1]} and {q.shape[-1]}")
    return 0.5 * (p - q.to(p.device)).abs().sum(dim=-1)


def kl_divergence(p, q) -> torch.Tensor:
    """KL(p || q) = sum_k p_k log(p_k / q_k) in nats over the last dimension.

    Terms with p_k = 0 contribute 0 and p_k > 0 with q_k = 0 gives +inf. For sampler checks the usual call is
    ``kl_divergence(empirical, exact)``: finite whenever the sampler never draws an impossible token, even if
    some rare tokens were not observed.
    """
    p = _as_probs(p, "p")
    q = _as_probs(q, "q").to(p.device)
    if p.shape[-1] != q.shape[-1]:
        raise ValueError(f"p and q must have the same number of categories, got {p.shape[-1]} and {q.shape[-1]}")
    positive = p > 0
    ratio = torch.where(positive, p / torch.where(positive, q, torch.ones_like(q)), torch.ones_like(p))
    terms = torch.where(positive, p * torch.log(ratio), torch.zeros_like(p))
    return terms.sum(dim=-1)


def empirical_distribution(samples, num_categories: int) -> torch.Tensor:
    """Normalised histogram (float64, length ``num_categories``) of integer draws in [0, num_categories)."""
    if num_categories < 1:
        raise ValueError(f"num_categories must be >= 1, got {num_categories}")
    samples = torch.as_tensor(samples).reshape(-1).long()
    if samples.numel() == 0:
        raise ValueError("samples must hold at least one draw")
    if (samples < 0).any() or (samples >= num_categories).any():
        raise ValueError(f"samples must lie in [0, {num_categories}) (num_categories), got values outside")
    counts = torch.bincount(samples, minlength=num_categories).to(torch.float64)
    return counts / counts.sum()


def _pool_small_bins(counts: torch.Tensor, expected: torch.Tensor, min_expected: float):
    """Merge the categories whose expected count is below ``min_expected`` into one bin.

    The chi-square approximation to G and Pearson's X^2 needs expected counts of about 5 or more; a long tail
    of rare tokens would otherwise dominate the statistic with noise.
    """
    small = expected < min_expected
    if min_expected <= 0 or small.sum() <= 1:
        return counts, expected
    pooled_counts = torch.cat([counts[~small], counts[small].sum().reshape(1)])
    pooled_expected = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    return pooled_counts, pooled_expected


def _goodness_of_fit(counts, expected_probs, min_expected: float, pearson: bool) -> tuple[float, float, int]:
    counts = torch.as_tensor(counts).to(torch.float64).reshape(-1)
    probs = _as_probs(expected_probs, "expected_probs").reshape(-1).to(counts.device)
    if counts.shape != probs.shape:
        raise ValueError(f"counts and expected_probs must have the same length, got {counts.numel()} and "
                         f"{probs.numel()}")
    if (counts < 0).any():
        raise ValueError("counts must be non-negative")
    n = counts.sum()
    if n <= 0:
        raise ValueError("counts must hold at least one observation")
    if min_expected < 0:
        raise ValueError(f"min_expected must be >= 0, got {min_expected}")
    probs = probs / probs.sum()
    # A draw of an impossible category rejects the hypothesis outright.
    if (counts[probs == 0] > 0).any():
        return math.inf, 0.0, int((probs > 0).sum()) - 1
    keep = probs > 0
    observed, expected = _pool_small_bins(counts[keep], n * probs[keep], min_expected)
    dof = observed.numel() - 1
    if dof < 1:
        return 0.0, 1.0, 0
    if pearson:
        statistic = float(((observed - expected) ** 2 / expected).sum())
    else:
        ratio = torch.where(observed > 0, observed / expected, torch.ones_like(observed))
        statistic = float(2.0 * (observed * torch.log(ratio)).sum())
    p_value = float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64),
                                            torch.tensor(max(statistic, 0.0) / 2.0, dtype=torch.float64)))
    return statistic, p_value, dof


def g_test(counts, expected_probs, min_expected: float = 5.0) -> tuple[float, float, int]:
    """G-test of observed ``counts`` against ``expected_probs``: ``(G statistic, p-value, degrees of freedom)``.

    G = 2 sum_k O_k ln(O_k / E_k) with E_k = n p_k, asymptotically chi-square with (categories - 1) degrees of
    freedom. Categories with expected count below ``min_expected`` are pooled into one bin first (set it to 0
    to disable); categories with p_k = 0 are dropped, and any draw of one gives ``(inf, 0.0, dof)``.
    A small p-value (say < 0.01) means the draws are not from ``expected_probs``.
    """
    return _goodness_of_fit(counts, expected_probs, min_expected, pearson=False)


def chi_square_test(counts, expected_probs, min_expected: float = 5.0) -> tuple[float, float, int]:
    """Pearson's chi-square goodness-of-fit test, same conventions and return value as ``g_test``."""
    return _goodness_of_fit(counts, expected_probs, min_expected, pearson=True)


def tv_noise_floor(n: int, probs) -> float:
    """Expected TV between an n-draw histogram of an exact sampler and ``probs`` (the noise floor).

    Each count is approximately normal, so E|p_hat_k - p_k| ~= sqrt(2/pi) * sqrt(p_k (1 - p_k) / n) and
    E[TV] ~= 0.5 * sqrt(2/pi) * sum_k sqrt(p_k (1 - p_k) / n). This is an analytic approximation: it is good
    when n p_k is not tiny; for categories with n p_k << 1 it overestimates their share (E|p_hat - p| -> 2 p
    there), so it errs on the generous side for long tails. A sampler whose TV is within about 1.5x of this
    is indistinguishable from exact at this n; use ``g_test`` for a calibrated decision.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    p = _as_probs(probs, "probs").reshape(-1)
    p = p / p.sum()
    per_category = torch.sqrt(p * (1 - p) / n) * math.sqrt(2 / math.pi)
    # The normal approximation cannot exceed the exact small-count limit E|p_hat - p| <= 2 p.
    per_category = torch.minimum(per_category, 2 * p)
    return float(0.5 * per_category.sum())
