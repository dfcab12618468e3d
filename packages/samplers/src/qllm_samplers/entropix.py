"""EntropixSampler: the entropy / varentropy quadrant policy of xjdr-alt/entropix, batched.

Each row's next-token distribution is placed on two axes, its entropy H (bits) and varentropy V (bits^2, the
variance of the surprisal), and the quadrant picks the action:

- low H, low V (the model knows): argmax;
- high H, low V (uniformly unsure): optionally emit a "clarifying" token (entropix inserted a
  model-specific token; here any token id you configure, or none), else sample hotter;
- low H, high V (a few strong but different options: a fork): explore with a higher temperature and a
  wider top-k;
- high H, high V (lost): resample at a high temperature with the argmax excluded;
- anything else: adaptive parameters from the signals, drawing a few samples and keeping the most likely.

The original reads every metric with ``.item()`` and branches in Python, so it only works at batch size 1.
Here each row gets its quadrant as a code and its own temperature / top-k / top-p / min-p as tensors; one
warp and a fixed number of draws serve the whole batch, and every row consumes the same random numbers
whatever its quadrant, so a seeded row gives the same tokens alone or in any batch.

Simplification: entropix also used attention "agreement" and "interaction strength"; here the only attention
signal is the last layer's normalised attention entropy of the newest position (``qllm_samplers.signals``),
which takes the place of those terms (0 when ``use_attention=False``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from enum import IntEnum

import torch

from .chain import SamplingChain
from .rng import RowRNG
from .signals import AttentionProbe, token_signals


class Quadrant(IntEnum):
    ARGMAX = 0  # low entropy, low varentropy
    CLARIFY = 1  # high entropy, low varentropy
    EXPLORE = 2  # low entropy, high varentropy
    RESAMPLE = 3  # high entropy, high varentropy
    ADAPTIVE = 4  # everything else


@dataclass
class EntropixConfig:
    """Thresholds in bits (entropy) and bits^2 (varentropy) of the raw next-token distribution."""

    temperature: float = 0.666
    top_p: float = 0.90
    top_k: int = 27
    min_p: float = 0.03
    low_entropy: float = 0.1
    low_varentropy: float = 0.1
    medium_entropy: float = 3.0
    high_entropy: float = 5.0
    high_varentropy: float = 5.0
    use_attention: bool = True
    clarifying_token_id: int | None = None
    # high entropy, low varentropy: temperature * (offset + coef * attention entropy), at most max
    clarify_temperature_offset: float = 1.3
    clarify_temperature_coef: float = 0.2
    clarify_max_temperature: float = 1.5
    # low entropy, high varentropy: temperature * (offset + coef * attention entropy), top-k * scale
    explore_temperature_offset: float = 1.2
    explore_temperature_coef: float = 0.3
    explore_max_temperature: float = 1.5
    explore_top_k_scale: float = 1.5
    # high entropy, high varentropy: at least this temperature; top-p lowered by coef * attention entropy
    resample_min_temperature: float = 2.0
    resample_temperature_offset: float = 2.0
    resample_temperature_coef: float = 0.5
    resample_top_p_coef: float = 0.2
    resample_min_top_p: float = 0.5
    # adaptive: uncertainty u = normalised entropy + normalised varentropy, a = attention entropy
    adaptive_temperature_logits: float = 0.3
    adaptive_temperature_attention: float = 0.2
    adaptive_top_p_attention: float = 0.1
    adaptive_top_k_attention: float = 0.3
    adaptive_max_top_k: int = 100
    adaptive_min_p_logits: float = 0.5
    adaptive_samples: int = 5

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"EntropixConfig.{f.name} must be finite, got {value}")
        checks = [
            ("temperature", self.temperature > 0, "> 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 1, "an int >= 1"),
            ("min_p", 0 <= self.min_p < 1, "in [0, 1)"),
            ("low_entropy", 0 <= self.low_entropy <= self.medium_entropy <= self.high_entropy,
             "0 <= low_entropy <= medium_entropy <= high_entropy"),
            ("low_varentropy", 0 <= self.low_varentropy <= self.high_varentropy,
             "0 <= low_varentropy <= high_varentropy"),
            ("clarifying_token_id", self.clarifying_token_id is None
             or (isinstance(self.clarifying_token_id, int) and self.clarifying_token_id >= 0), "None or an int >= 0"),
            ("explore_top_k_scale", self.explore_top_k_scale >= 1, ">= 1"),
            ("resample_min_top_p", 0 < self.resample_min_top_p <= 1, "in (0, 1]"),
            ("adaptive_max_top_k", isinstance(self.adaptive_max_top_k, int) and self.adaptive_max_top_k >= 1,
             "an int >= 1"),
            ("adaptive_samples", isinstance(self.adaptive_samples, int) and self.adaptive_samples >= 1,
             "an int >= 1"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"EntropixConfig.{name} must be {allowed}, got {getattr(self, name)!r}")
        for name in ("clarify_max_temperature", "explore_max_temperature", "resample_min_temperature"):
            if getattr(self, name) <= 0:
                raise ValueError(f"EntropixConfig.{name} must be > 0, got {getattr(self, name)}")


def quadrants(entropy: torch.Tensor, varentropy: torch.Tensor, config: EntropixConfig) -> torch.Tensor:
    """Quadrant code [B] per row, with entropix's precedence (the first matching rule wins)."""
    c = config
    code = torch.full_like(entropy, int(Quadrant.ADAPTIVE), dtype=torch.long)
    rules = [  # applied last-to-first so that earlier rules overwrite later ones
        (Quadrant.ARGMAX, (entropy < c.low_entropy) & (varentropy < c.low_varentropy)),
        (Quadrant.CLARIFY, (entropy > c.high_entropy) & (varentropy < c.low_varentropy)),
        (Quadrant.EXPLORE, (entropy < c.high_entropy) & (varentropy > c.high_varentropy)),
        (Quadrant.RESAMPLE, (entropy > c.medium_entropy) & (varentropy > c.high_varentropy)),
    ]
    for quadrant, hit in reversed(rules):
        code = torch.where(hit, int(quadrant), code)
    return code


class EntropixSampler:
    """The entropix quadrant policy as a batched TokenSampler (see module docstring)."""

    def __init__(self, config: EntropixConfig | None = None):
        self.config = config or EntropixConfig()
        self.probe = AttentionProbe() if self.config.use_attention else None
        self.counts = torch.zeros(len(Quadrant), dtype=torch.long)
        self.clarifications = 0

    def begin(self, model: torch.nn.Module, batch_size: int) -> None:
        self.counts.zero_()
        self.clarifications = 0
        if self.probe is not None:
            self.probe.attach(model)

    def end(self) -> None:
        if self.probe is not None:
            self.probe.detach()

    def _attention(self, batch: int, device) -> torch.Tensor:
        if self.probe is None:
            return torch.zeros(batch, device=device)
        if not self.probe.attached:
            raise ValueError("EntropixSampler needs begin(model, batch_size) before select() to read attention "
                             "(generate() calls it), or EntropixConfig(use_attention=False)")
        return self.probe.read(batch).to(device)

    def parameters(self, scores: torch.Tensor, attention: torch.Tensor) -> dict[str, torch.Tensor]:
        """Quadrant and per-row temperature / top-k / top-p / min-p for a batch of raw logits."""
        c = self.config
        signals = token_signals(scores)
        code = quadrants(signals.entropy, signals.varentropy, c)
        ones = torch.ones_like(signals.entropy)
        uncertainty = signals.entropy_normalised + signals.varentropy_normalised
        temperature = c.temperature * ones
        top_k = torch.full_like(code, c.top_k)
        top_p = c.top_p * ones
        min_p = c.min_p * ones

        def put(quadrant, target, value):
            return torch.where(code == quadrant, value, target)

        temperature = put(Quadrant.CLARIFY, temperature, torch.clamp(
            c.temperature * (c.clarify_temperature_offset + c.clarify_temperature_coef * attention),
            max=c.clarify_max_temperature))
        temperature = put(Quadrant.EXPLORE, temperature, torch.clamp(
            c.temperature * (c.explore_temperature_offset + c.explore_temperature_coef * attention),
            max=c.explore_max_temperature))
        top_k = put(Quadrant.EXPLORE, top_k, torch.full_like(code, math.ceil(c.top_k * c.explore_top_k_scale)))
        temperature = put(Quadrant.RESAMPLE, temperature, torch.clamp(
            c.temperature * (c.resample_temperature_offset + c.resample_temperature_coef * attention),
            min=c.resample_min_temperature))
        top_p = put(Quadrant.RESAMPLE, top_p, torch.clamp(c.top_p - c.resample_top_p_coef * attention,
                                                          min=c.resample_min_top_p))
        adaptive_temperature = c.temperature * (1 + c.adaptive_temperature_logits * uncertainty
                                                + c.adaptive_temperature_attention * attention)
        temperature = put(Quadrant.ADAPTIVE, temperature, adaptive_temperature)
        top_p = put(Quadrant.ADAPTIVE, top_p, torch.clamp(c.top_p * (1 + c.adaptive_top_p_attention * attention),
                                                          0.1, 1.0))
        adaptive_top_k = torch.clamp(torch.round(c.top_k * (1 + c.adaptive_top_k_attention * attention)),
                                     1, c.adaptive_max_top_k).long()
        top_k = put(Quadrant.ADAPTIVE, top_k, adaptive_top_k)
        min_p = put(Quadrant.ADAPTIVE, min_p, torch.clamp(c.min_p * (1 - c.adaptive_min_p_logits * uncertainty),
                                                          0.01, 0.5))
        return {"quadrant": code, "temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p}

    def select(self, scores: torch.Tensor, state, rng: RowRNG) -> torch.Tensor:
        batch = scores.shape[0]
        params = self.parameters(scores, self._attention(batch, scores.device))
        code = params["quadrant"]
        argmax = scores.argmax(dim=-1)
        chain = SamplingChain(temperature=params["temperature"], top_k=params["top_k"], top_p=params["top_p"],
                              min_p=params["min_p"])
        warped = chain(state.input_ids, scores)
        # "Resample without the argmax": drop the top token where anything else survived the truncations.
        resample = code == Quadrant.RESAMPLE
        without_top = warped.scatter(1, argmax[:, None], float("-inf"))
        has_other = torch.isfinite(without_top).any(dim=-1)
        warped = torch.where((resample & has_other)[:, None], without_top, warped)
        # Every row draws the same number of times, whatever its quadrant, so rows never shift each other's
        # random streams. Adaptive rows keep the most likely of their draws.
        draws = torch.stack([rng.categorical(warped) for _ in range(self.config.adaptive_samples)], dim=1)
        draw_logprob = torch.log_softmax(warped, dim=-1).gather(1, draws)
        best = draws.gather(1, draw_logprob.argmax(dim=1, keepdim=True)).squeeze(1)
        tokens = torch.where(code == Quadrant.ADAPTIVE, best, draws[:, 0])
        tokens = torch.where(code == Quadrant.ARGMAX, argmax, tokens)
        if self.config.clarifying_token_id is not None:
            clarify = (code == Quadrant.CLARIFY) & (state.input_ids[:, -1] != self.config.clarifying_token_id)
            tokens = torch.where(clarify, self.config.clarifying_token_id, tokens)
            self.clarifications += int((clarify & ~state.finished).sum())
        active = ~state.finished
        self.counts += torch.bincount(code[active].cpu(), minlength=len(Quadrant))
        self.last_parameters = params
        return tokens

    def stats(self) -> dict:
        total = max(int(self.counts.sum()), 1)
        return {
            "tokens": int(self.counts.sum()),
            "quadrant_counts": {q.name: int(self.counts[q]) for q in Quadrant},
            "quadrant_frequencies": {q.name: int(self.counts[q]) / total for q in Quadrant},
            "clarifications": self.clarifications,
        }
