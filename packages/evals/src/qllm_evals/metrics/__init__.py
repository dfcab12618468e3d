"""Metrics: bits per byte / perplexity and the sample histogram.

Distribution distances, goodness-of-fit tests and MCMC diagnostics have one home, ``qllm_samplers.diagnostics``
(torch only, so the sampler library can judge itself); they are re-exported here for convenience.
"""

from qllm_samplers.diagnostics import (
    autocorrelation_time,
    chi_square_test,
    effective_sample_size,
    empirical_distribution,
    g_test,
    kl_divergence,
    split_rhat,
    total_variation,
    tv_noise_floor,
)

from .bpb import BitsPerByte, BytePerplexity, TokenPerplexity, bits_per_byte
from .histogram import SampleHistogram

__all__ = [
    "BitsPerByte", "BytePerplexity", "TokenPerplexity", "bits_per_byte", "SampleHistogram",
    "chi_square_test", "empirical_distribution", "g_test", "kl_divergence", "total_variation", "tv_noise_floor",
    "autocorrelation_time", "effective_sample_size", "split_rhat",
]
