"""EntropixSampler: the entropy / varentropy quadrant policy of xjdr-alt/entropix (Oct 2024 sampler), batched.

Each row's next-token distribution is placed on two axes, its entropy H (bits) and varentropy V (bits^2, the
variance of the surprisal), and the quadrant picks the action (thresholds and precedence are entropix's):

- low H, low V (the model knows): argmax;
- high H, low V (uniformly unsure): optionally emit a "clarifying" token (entropix inserted token 2564; here any
  token id you configure, or none), else sample hotter;
- low H, high V (a few strong but different options: a fork): explore with a higher temperature and a wider top-k;
- high H, high V (lost): resample at a high temperature and a lower top-p;
- anything else: adaptive parameters from the signals, drawing a few samples and keeping the most likely.

Two modes (``EntropixConfig.mode``):

- ``"faithful"``: entropix's parameter formulas on raw bits, with its attention metrics (head-mean attention
  entropy, its variance over heads, head agreement, interaction strength; ``signals.AttentionMetrics``) read from
  the last layer's newest query, and no argmax exclusion. On SmolLM2 at H = 2, V = 3 bits the ADAPTIVE
  temperature is 0.666 (1 + 0.3 (2 + 3)) = 1.665 and min_p clips to 0.01, as in entropix.
- ``"normalised"`` (ours, the default): the same formulas on entropy / log2 V and varentropy / (log2 V)^2, with
  the normalised attention entropy in place of every attention metric, so the parameters do not grow with the
  vocabulary (0.694 and 0.028 in the example above); RESAMPLE excludes the argmax (``resample_excludes_argmax``).

Departures from entropix in both modes (its bugs, fixed): its ``_sample`` applies min_p to a logits copy it then
ignores (a no-op) - here min_p filters; its top-p mask runs over the ascending flipped top-k, so it drops the
*most* likely tokens - here top-p is transformers'; its PyTorch port draws argmax(p / U) with uniform U, which is
not a draw from p (the JAX original used exponentials) - here the draw is exact. Also: entropix averaged its
attention metrics over every cache slot, written or not (they drift as the cache fills); here only attendable keys
count; interaction strength is 0 where a model exposes only attention probabilities (QLLM). The original reads
every metric with ``.item()`` and branches in Python, so it only works at batch size 1; here each row gets its
quadrant as a code and its own parameters as tensors, one warp and a fixed number of draws serve the whole batch,
and every row consumes the same random numbers whatever its quadrant (a seeded row gives the same tokens alone or
in any batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from enum import IntEnum

import torch

from .chain import RowParameters, warp_rows
from .rng import RowRNG
from .signals import AttentionMetrics, AttentionProbe, token_signals
from .warpers import check_input_ids

MODES = ("normalised", "faithful")


class Quadrant(IntEnum):
    ARGMAX = 0  # low entropy, low varentropy
    CLARIFY = 1  # high entropy, low varentropy
    EXPLORE = 2  # low entropy, high varentropy
    RESAMPLE = 3  # high entropy, high varentropy
    ADAPTIVE = 4  # everything else


@dataclass
class EntropixConfig:
    """Thresholds in bits (entropy) and bits^2 (varentropy) of the raw next-token distribution.

    ``mode``: "normalised" (ours) or "faithful" (entropix's raw-bit formulas and attention metrics; see the module
    docstring). ``resample_excludes_argmax``: None follows the mode (True in normalised, False in faithful).
    """

    mode: str = "normalised"
    resample_excludes_argmax: bool | None = None
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
    # low entropy, high varentropy: temperature * (offset + coef * interaction strength (faithful) or attention
    # entropy (normalised)); top-k floor(top_k * (1 + (scale - 1) * (1 - agreement))), at least 5 (entropix's int())
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
    # adaptive: uncertainty u = entropy + varentropy (normalised or raw bits), a = attention uncertainty
    adaptive_temperature_logits: float = 0.3
    adaptive_temperature_attention: float = 0.2
    adaptive_temperature_agreement: float = 0.2  # faithful only (no agreement signal in normalised mode)
    adaptive_top_k_agreement: float = 0.2  # faithful only
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
            ("mode", self.mode in MODES, f"one of {MODES}"),
            ("resample_excludes_argmax", self.resample_excludes_argmax in (None, True, False), "None, true or false"),
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


    @property
    def faithful(self) -> bool:
        return self.mode == "faithful"

    @property
    def excludes_argmax(self) -> bool:
        return (not self.faithful) if self.resample_excludes_argmax is None else self.resample_excludes_argmax

    @property
    def top_k_bound(self) -> int:
        """The largest top-k any quadrant can ask for (a static candidate bound for the draw)."""
        return max(self.top_k, 5, math.floor(self.top_k * self.explore_top_k_scale), self.adaptive_max_top_k)


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
        self._reset()

    def _reset(self) -> None:
        self._counts = torch.zeros(len(Quadrant) + 1, dtype=torch.long)
        self._clarifications = torch.zeros((), dtype=torch.long)

    def begin(self, model: torch.nn.Module, batch_size: int) -> None:
        self._reset()
        if self.probe is not None:
            self.probe.attach(model)

    def end(self) -> None:
        if self.probe is not None:
            self.probe.detach()

    def _attention(self, batch: int, device) -> torch.Tensor | AttentionMetrics:
        """The normalised attention entropy [B] (normalised mode) or entropix's metrics (faithful mode)."""
        if self.probe is None:
            zeros = torch.zeros(batch, device=device)
            return AttentionMetrics(zeros, zeros, zeros, None) if self.config.faithful else zeros
        if not self.probe.attached:
            raise ValueError("EntropixSampler needs begin(model, batch_size) before select() to read attention "
                             "(generate() calls it), or EntropixConfig(use_attention=False)")
        if self.config.faithful:
            m = self.probe.read_metrics(batch)
            return AttentionMetrics(m.entropy.to(device), m.varentropy.to(device), m.agreement.to(device),
                                    None if m.interaction_strength is None else m.interaction_strength.to(device))
        return self.probe.read(batch).to(device)

    def parameters(self, scores: torch.Tensor, attention: torch.Tensor | AttentionMetrics) -> dict[str, torch.Tensor]:
        """Quadrant and per-row temperature / top-k / top-p / min-p for a batch of raw logits.

        ``attention``: the normalised attention entropy [B] in normalised mode, ``AttentionMetrics`` in faithful
        mode (what ``select`` reads from the probe).
        """
        c = self.config
        signals = token_signals(scores)
        code = quadrants(signals.entropy, signals.varentropy, c)
        ones = torch.ones_like(signals.entropy)
        if c.faithful:
            if not isinstance(attention, AttentionMetrics):
                raise ValueError("attention: faithful mode needs signals.AttentionMetrics (entropy, varentropy, "
                                 f"agreement, interaction_strength), got {type(attention).__name__}")
            uncertainty = signals.entropy + signals.varentropy
            attn_entropy, attn_varentropy, agreement = attention.entropy, attention.varentropy, attention.agreement
            interaction = (torch.zeros_like(attn_entropy) if attention.interaction_strength is None
                           else attention.interaction_strength)
            attn_uncertainty = attn_entropy + attn_varentropy
        else:
            uncertainty = signals.entropy_normalised + signals.varentropy_normalised
            # our variant: the one attention signal stands in for every attention metric, no agreement term
            attn_entropy = attn_varentropy = interaction = attn_uncertainty = attention
            agreement = torch.zeros_like(attention)
        temperature = c.temperature * ones
        top_k = torch.full_like(code, c.top_k)
        top_p = c.top_p * ones
        min_p = c.min_p * ones

        def put(quadrant, target, value):
            return torch.where(code == quadrant, value, target)

        temperature = put(Quadrant.CLARIFY, temperature, torch.clamp(
            c.temperature * (c.clarify_temperature_offset + c.clarify_temperature_coef * attn_entropy),
            max=c.clarify_max_temperature))
        temperature = put(Quadrant.EXPLORE, temperature, torch.clamp(
            c.temperature * (c.explore_temperature_offset + c.explore_temperature_coef * interaction),
            max=c.explore_max_temperature))
        # entropix: max(5, int(top_k * (1 + 0.5 * (1 - agreement)))); int() truncates: 27 * 1.5 -> 40
        explore_top_k = torch.floor(c.top_k * (1 + (c.explore_top_k_scale - 1) * (1 - agreement))).clamp(min=5)
        top_k = put(Quadrant.EXPLORE, top_k, explore_top_k.long())
        temperature = put(Quadrant.RESAMPLE, temperature, torch.clamp(
            c.temperature * (c.resample_temperature_offset + c.resample_temperature_coef * attn_varentropy),
            min=c.resample_min_temperature))
        top_p = put(Quadrant.RESAMPLE, top_p, torch.clamp(c.top_p - c.resample_top_p_coef * attn_entropy,
                                                          min=c.resample_min_top_p))
        adaptive_temperature = c.temperature * (1 + c.adaptive_temperature_logits * uncertainty
                                                + c.adaptive_temperature_attention * attn_uncertainty
                                                - c.adaptive_temperature_agreement * agreement)
        temperature = put(Quadrant.ADAPTIVE, temperature, adaptive_temperature)
        top_p = put(Quadrant.ADAPTIVE, top_p, torch.clamp(c.top_p * (1 + c.adaptive_top_p_attention * attn_varentropy),
                                                          0.1, 1.0))
        adaptive_top_k = torch.clamp(torch.round(c.top_k * (1 + c.adaptive_top_k_attention * interaction
                                                            - c.adaptive_top_k_agreement * agreement)),
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
        # Every value is in range by construction (temperatures > 0, top-k in [1, top_k_bound], top-p in (0, 1],
        # min-p in [0, 1)): no per-step validation, no SamplingChain rebuilt, no host sync for the parameters.
        warped = warp_rows(None, scores, RowParameters(
            temperature=params["temperature"].to(torch.float64), top_k=params["top_k"],
            top_p=params["top_p"].to(torch.float64), min_p=params["min_p"].to(torch.float64),
            k_max=self.config.top_k_bound))
        if self.config.excludes_argmax:
            # Ours: "resample without the argmax", where anything else survived the truncations.
            resample = code == Quadrant.RESAMPLE
            without_top = warped.scatter(1, argmax[:, None], float("-inf"))
            has_other = torch.isfinite(without_top).any(dim=-1)
            warped = torch.where((resample & has_other)[:, None], without_top, warped)
        # Every row draws the same number of times, whatever its quadrant, so rows never shift each other's
        # random streams. Adaptive rows keep the most likely of their draws (entropix adds a score that is the
        # same for every draw of a row, so the log-probability decides).
        draws = torch.stack([rng.categorical(warped) for _ in range(self.config.adaptive_samples)], dim=1)
        draw_logprob = torch.log_softmax(scores.float(), dim=-1).gather(1, draws)
        best = draws.gather(1, draw_logprob.argmax(dim=1, keepdim=True)).squeeze(1)
        tokens = torch.where(code == Quadrant.ADAPTIVE, best, draws[:, 0])
        tokens = torch.where(code == Quadrant.ARGMAX, argmax, tokens)
        active = ~state.finished.to(code.device)
        if self.config.clarifying_token_id is not None:
            check_input_ids(state.input_ids, batch, "EntropixConfig.clarifying_token_id", values=False)
            clarify = (code == Quadrant.CLARIFY) & (state.input_ids[:, -1] != self.config.clarifying_token_id)
            tokens = torch.where(clarify, self.config.clarifying_token_id, tokens)
            self._clarifications = self._clarifications.to(code.device) + (clarify & active).sum()
        # Tensor ops only (no host sync): finished rows are counted in a scratch slot that is dropped.
        self._counts = self._counts.to(code.device) + torch.bincount(
            torch.where(active, code, len(Quadrant)), minlength=len(Quadrant) + 1)
        self.last_parameters = params
        return tokens

    @property
    def counts(self) -> torch.Tensor:
        """Tokens per quadrant (rows that had not finished), on the CPU."""
        return self._counts[: len(Quadrant)].cpu()

    @property
    def clarifications(self) -> int:
        return int(self._clarifications)

    def stats(self) -> dict:
        total = max(int(self.counts.sum()), 1)
        return {
            "tokens": int(self.counts.sum()),
            "quadrant_counts": {q.name: int(self.counts[q]) for q in Quadrant},
            "quadrant_frequencies": {q.name: int(self.counts[q]) / total for q in Quadrant},
            "clarifications": self.clarifications,
        }
