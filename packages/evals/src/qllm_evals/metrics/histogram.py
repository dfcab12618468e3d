"""``SampleHistogram``: a torchmetrics ``Metric`` over integer draws, judged against an exact distribution.

The functional core (TV, KL, G-test, noise floor) lives in ``qllm_samplers.diagnostics``; this is the thin,
summed-state wrapper for accumulating across batches and processes.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

from qllm_samplers.diagnostics.distribution import _as_probs, g_test, kl_divergence, total_variation, tv_noise_floor


class SampleHistogram(Metric):
    """Accumulates integer draws and compares their histogram with an exact distribution.

    ``update(samples, valid=None)``: ``samples`` are category ids; a draw is invalid when ``valid`` is False
    for it or when its id is outside [0, V) (a sampler may return -1 for "no one-hot state"). Invalid draws are
    counted, not histogrammed. ``compute()`` returns a dict of float64 scalars: ``tv``, ``kl`` (KL(empirical ||
    exact)), ``g_statistic``, ``p_value``, ``dof``, ``noise_floor``, ``invalid_rate`` and ``n`` (valid draws).
    States sum across processes (``dist_reduce_fx="sum"``), so it works under DDP as is.
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(self, exact_probs, min_expected: float = 5.0, **kwargs):
        super().__init__(**kwargs)
        probs = _as_probs(exact_probs, "exact_probs").reshape(-1)
        if probs.sum() <= 0:
            raise ValueError("exact_probs must have positive total mass")
        self.register_buffer("exact_probs", probs / probs.sum(), persistent=False)
        self.min_expected = min_expected
        self.num_categories = probs.numel()
        self.add_state("counts", default=torch.zeros(self.num_categories, dtype=torch.float64),
                       dist_reduce_fx="sum")
        self.add_state("invalid", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, samples: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        samples = torch.as_tensor(samples, device=self.counts.device).reshape(-1).long()
        ok = (samples >= 0) & (samples < self.num_categories)
        if valid is not None:
            ok = ok & torch.as_tensor(valid, device=samples.device).reshape(-1).bool()
        self.invalid += (~ok).sum().to(torch.float64)
        self.counts += torch.bincount(samples[ok], minlength=self.num_categories).to(torch.float64)

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.counts.sum()
        total = n + self.invalid
        probs = self.exact_probs.to(self.counts.device)
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        if n == 0:
            return {"tv": nan, "kl": nan, "g_statistic": nan, "p_value": nan, "dof": nan,
                    "noise_floor": nan, "invalid_rate": self.invalid / total.clamp(min=1), "n": n}
        empirical = self.counts / n
        statistic, p_value, dof = g_test(self.counts, probs, self.min_expected)
        as_t = lambda v: torch.tensor(float(v), dtype=torch.float64)  # noqa: E731
        return {
            "tv": total_variation(empirical, probs),
            "kl": kl_divergence(empirical, probs),
            "g_statistic": as_t(statistic),
            "p_value": as_t(p_value),
            "dof": as_t(dof),
            "noise_floor": as_t(tv_noise_floor(int(n), probs)),
            "invalid_rate": self.invalid / total,
            "n": n,
        }
