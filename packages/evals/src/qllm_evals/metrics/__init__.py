"""Metrics: bits per byte / perplexity, distribution distances and tests, MCMC diagnostics."""

from .bpb import BitsPerByte, BytePerplexity, TokenPerplexity, bits_per_byte
from .distribution import (
    SampleHistogram,
    empirical_distribution,
    g_test,
    kl_divergence,
    total_variation,
    tv_noise_floor,
)
from .mcmc import autocorrelation_time, effective_sample_size, split_rhat

__all__ = [
    "BitsPerByte", "BytePerplexity", "TokenPerplexity", "bits_per_byte", "SampleHistogram",
    "empirical_distribution", "g_test", "kl_divergence", "total_variation", "tv_noise_floor",
    "autocorrelation_time", "effective_sample_size", "split_rhat",
]
