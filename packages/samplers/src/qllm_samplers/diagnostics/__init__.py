"""Diagnostics for samplers, in torch alone: distances to an exact law, goodness of fit, MCMC mixing."""

from .distribution import (
    chi_square_test,
    empirical_distribution,
    g_test,
    kl_divergence,
    total_variation,
    tv_noise_floor,
)
from .mcmc import autocorrelation_time, effective_sample_size, split_rhat

__all__ = [
    "chi_square_test", "empirical_distribution", "g_test", "kl_divergence", "total_variation", "tv_noise_floor",
    "autocorrelation_time", "effective_sample_size", "split_rhat",
]
