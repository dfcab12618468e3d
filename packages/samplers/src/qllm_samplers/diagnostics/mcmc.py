"""MCMC diagnostics: integrated autocorrelation time, effective sample size and split R-hat.

- ``autocorrelation_time(x)``: tau = 1 + 2 sum_{t>=1} rho_t, truncated by Geyer's initial monotone
  sequence estimator (Geyer 1992): sums of adjacent autocorrelation pairs are used while positive and forced
  to be non-increasing, which is a consistent, conservative estimate for reversible chains.
- ``effective_sample_size(x)``: (number of draws) / tau.
- ``split_rhat(chains)``: potential scale reduction with each chain split in half (Gelman et al., BDA3), and
  optionally the rank-normalised, folded version of Vehtari, Gelman, Simpson, Carpenter & Buerkner (2021).

``x`` may be one chain [N] or several chains [C, N]. With several chains the autocorrelations are combined as
in Stan (Vehtari et al. 2021, eq. 10): rho_t = 1 - (W - mean_c acov_c(t)) / var_plus, so that chains stuck in
different places (between-chain variance) count as correlation. All arithmetic is float64.
"""

from __future__ import annotations

import math

import torch


def _as_chains(x, name: str, min_length: int) -> torch.Tensor:
    t = torch.as_tensor(x).to(torch.float64)
    if t.dim() == 1:
        t = t[None, :]
    if t.dim() != 2:
        raise ValueError(f"{name} must be [N] or [C, N] (chains, draws), got shape {tuple(t.shape)}")
    if t.shape[1] < min_length:
        raise ValueError(f"{name} needs at least {min_length} draws per chain, got {t.shape[1]}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite (no NaN or inf)")
    return t


def _autocovariance(chains: torch.Tensor) -> torch.Tensor:
    """Biased autocovariance (divided by N) of each chain at lags 0..N-1, via a zero-padded FFT."""
    n = chains.shape[1]
    centred = chains - chains.mean(dim=1, keepdim=True)
    size = 1 << (2 * n - 1).bit_length()
    spectrum = torch.fft.rfft(centred, n=size, dim=1)
    return torch.fft.irfft(spectrum * spectrum.conj(), n=size, dim=1)[:, :n] / n


def _combined_autocorrelation(chains: torch.Tensor) -> torch.Tensor | None:
    """Multi-chain autocorrelation rho_t (Stan's estimator); None when every draw is identical."""
    num_chains, n = chains.shape
    acov = _autocovariance(chains)
    within = (acov[:, 0] * n / max(n - 1, 1)).mean()
    between_over_n = chains.mean(dim=1).var(unbiased=True) if num_chains > 1 else torch.zeros((), dtype=torch.float64)
    var_plus = within * (n - 1) / n + between_over_n
    if var_plus <= 0:
        return None
    return 1.0 - (within - acov.mean(dim=0)) / var_plus


def autocorrelation_time(x) -> float:
    """Integrated autocorrelation time tau (>= about 1 for positively correlated chains) of [N] or [C, N] draws.

    Geyer's initial monotone sequence: with Gamma_k = rho_{2k} + rho_{2k+1}, sum the Gamma_k up to the first
    non-positive one, each replaced by the minimum of those before it; tau = -1 + 2 sum_k Gamma_k. Like Stan,
    tau is floored at 1 / log10(total draws) so that antithetic chains cannot claim unbounded ESS.
    Returns NaN when all draws are identical (a chain that never moves has no defined tau).
    """
    chains = _as_chains(x, "x", min_length=4)
    rho = _combined_autocorrelation(chains)
    if rho is None:
        return math.nan
    num_pairs = rho.numel() // 2
    pairs = rho[: 2 * num_pairs].reshape(num_pairs, 2).sum(dim=1)
    # Initial positive sequence: keep pairs up to (excluding) the first non-positive one.
    positive_prefix = torch.cumprod((pairs > 0).to(torch.int64), dim=0).bool()
    pairs = pairs[positive_prefix]
    if pairs.numel() == 0:
        return 1.0 / math.log10(max(chains.numel(), 10))
    # Initial monotone sequence.
    pairs = torch.cummin(pairs, dim=0).values
    tau = float(-1.0 + 2.0 * pairs.sum())
    return max(tau, 1.0 / math.log10(max(chains.numel(), 10)))


def effective_sample_size(x) -> float:
    """Effective sample size of [N] or [C, N] draws: C * N / tau (Geyer initial monotone sequence)."""
    chains = _as_chains(x, "x", min_length=4)
    tau = autocorrelation_time(chains)
    return chains.numel() / tau if not math.isnan(tau) else math.nan


def _rank_normalise(chains: torch.Tensor) -> torch.Tensor:
    """Replace draws by normal scores of their pooled ranks (average rank for ties), Blom's offset 3/8."""
    flat = chains.reshape(-1)
    values, inverse, counts = torch.unique(flat, return_inverse=True, return_counts=True)
    first_rank = torch.cumsum(counts, dim=0) - counts + 1
    average_rank = first_rank.to(torch.float64) + (counts.to(torch.float64) - 1) / 2
    ranks = average_rank[inverse]
    z = torch.special.ndtri((ranks - 0.375) / (flat.numel() + 0.25))
    return z.reshape(chains.shape)


def _split(chains: torch.Tensor) -> torch.Tensor:
    half = chains.shape[1] // 2
    # With an odd length the middle draw is dropped, as in Stan.
    return torch.cat([chains[:, :half], chains[:, chains.shape[1] - half:]], dim=0)


def _rhat(chains: torch.Tensor) -> float:
    n = chains.shape[1]
    within = chains.var(dim=1, unbiased=True).mean()
    between_over_n = chains.mean(dim=1).var(unbiased=True)
    if within <= 0:
        # Constant chains: equal constants agree (1.0); different constants can never mix (inf).
        return 1.0 if between_over_n == 0 else math.inf
    var_plus = within * (n - 1) / n + between_over_n
    return float(torch.sqrt(var_plus / within))


def split_rhat(chains, rank_normalized: bool = False) -> float:
    """Split R-hat of [C, N] draws (C >= 1 chains, N >= 4): about 1.0 when the chains agree, > 1.01 warns.

    Each chain is split into halves (so a single drifting chain is caught too) and R-hat = sqrt(var_plus / W)
    with W the mean within-chain variance and var_plus = (n-1)/n W + B/n. With ``rank_normalized=True`` it is
    Vehtari et al. (2021)'s version: the maximum of R-hat on rank-normalised draws (bulk) and on rank-normalised
    |draw - median| (tails), robust to heavy tails and to discrete draws such as token ids.
    """
    chains = _as_chains(chains, "chains", min_length=4)
    if not rank_normalized:
        return _rhat(_split(chains))
    bulk = _rhat(_split(_rank_normalise(chains)))
    folded = (chains - chains.reshape(-1).median()).abs()
    tail = _rhat(_split(_rank_normalise(folded)))
    return max(bulk, tail)
