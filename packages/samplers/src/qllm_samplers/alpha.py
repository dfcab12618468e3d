"""AlphaSampler: sampling parameters set per token from how uncertain the model is.

At every step a scalar ``alpha`` per row combines two uncertainty signals (``qllm_samplers.signals``): the
normalised entropy of the next-token distribution and the normalised entropy of the last layer's attention
for the newest position. The published maps below turn alpha into temperature, top-k, top-p and a repetition
penalty (all increasing in alpha: an uncertain model is sampled more broadly), and alpha's state
(COLD / MIXED / HOT) decides whether to run a lookahead step. In COLD state the top candidates are each run one
step ahead, in one batched forward pass from the shared KV cache, and the one whose next distribution is most
settled (lowest ``entropy_weight * H + varentropy_weight * VarH``) is chosen.

The combination (see ``AlphaSamplerConfig`` and docs/adaptive.md) is
``alpha = token_weight * h_token + attention_weight * h_attention`` with both signals in [0, 1]; its weights
were chosen on SmolLM2 generations so that all three states occur on real text.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from enum import IntEnum

import torch

from .lm import forward_step
from .rng import RowRNG
from .signals import AttentionProbe, entropy_varentropy, token_signals
from .warpers import RepetitionPenalty, Temperature, TopK, TopP


def _as_tensor(a) -> tuple[torch.Tensor, bool]:
    is_tensor = isinstance(a, torch.Tensor)
    tensor = a if is_tensor else torch.tensor(float(a), dtype=torch.float64)
    if not torch.is_floating_point(tensor):
        tensor = tensor.double()
    if not torch.isfinite(tensor).all():
        raise ValueError(f"alpha must be finite, got {a}")
    return tensor, is_tensor


def _result(value: torch.Tensor, is_tensor: bool):
    return value if is_tensor else float(value)


# The published maps, exactly as given (a float in, a float out; a tensor in, a tensor out).
def alpha_temperature(a):
    """0.1 + 1.2 / (1 + exp(-1.5 (a - 1))): from 0.1 (a -> -inf) through 0.7 (a = 1) to 1.3."""
    t, is_tensor = _as_tensor(a)
    return _result(0.1 + 1.2 / (1 + torch.exp(-1.5 * (t - 1))), is_tensor)


def alpha_top_k(a):
    """10 + 190 (atan(a - 1) / pi + 0.5): from 10 through 105 (a = 1) to 200; rounded to an int when used."""
    t, is_tensor = _as_tensor(a)
    return _result(10 + 190 * (torch.atan(t - 1) / math.pi + 0.5), is_tensor)


def alpha_top_p(a):
    """0.85 + 0.1 (2 / (1 + exp(-0.8 a)) - 1): 0.85 at a = 0, rising towards 0.95."""
    t, is_tensor = _as_tensor(a)
    return _result(0.85 + 0.1 * (2 / (1 + torch.exp(-0.8 * t)) - 1), is_tensor)


def alpha_repetition_penalty(a):
    """1 + 0.3 / (1 + exp(-2 (a - 1))): from 1.0 through 1.15 (a = 1) to 1.3."""
    t, is_tensor = _as_tensor(a)
    return _result(1 + 0.3 / (1 + torch.exp(-2 * (t - 1))), is_tensor)


class AlphaState(IntEnum):
    COLD = 0
    MIXED = 1
    HOT = 2


def alpha_state(a, cold_point: float = 0.6, hot_point: float = 1.8):
    """COLD below ``cold_point``, HOT above ``hot_point``, MIXED otherwise (both points are MIXED).

    A float gives an ``AlphaState``; a tensor gives a LongTensor of state codes (``AlphaState`` values).
    """
    if not cold_point < hot_point:
        raise ValueError(f"cold_point must be < hot_point, got {cold_point} and {hot_point}")
    t, is_tensor = _as_tensor(a)
    codes = torch.where(t < cold_point, int(AlphaState.COLD),
                        torch.where(t > hot_point, int(AlphaState.HOT), int(AlphaState.MIXED))).long()
    return codes if is_tensor else AlphaState(int(codes))


@dataclass
class AlphaSamplerConfig:
    """Settings of ``AlphaSampler``.

    ``base_*`` are the fixed-parameter sampler the adaptive one is compared against (``baseline()``); the
    adaptive parameters themselves come from the published maps of alpha.
    """

    base_temperature: float = 0.4
    base_top_p: float = 0.85
    base_top_k: int = 40
    base_repetition_penalty: float = 1.0
    cold_point: float = 0.6
    hot_point: float = 1.8
    # alpha = token_weight * (token entropy / log2 V) + attention_weight * (attention entropy / log2 n_keys)
    token_weight: float = 4.0
    attention_weight: float = 1.0
    repetition_window: int = 128
    history_size: int = 100
    lookahead: bool = True
    lookahead_k: int = 3
    entropy_weight: float = 0.8
    varentropy_weight: float = 0.2

    def __post_init__(self):
        checks = [
            ("base_temperature", self.base_temperature > 0, "> 0"),
            ("base_top_p", 0 < self.base_top_p <= 1, "in (0, 1]"),
            ("base_top_k", isinstance(self.base_top_k, int) and self.base_top_k >= 1, "an int >= 1"),
            ("base_repetition_penalty", self.base_repetition_penalty > 0, "> 0"),
            ("token_weight", self.token_weight >= 0 and math.isfinite(self.token_weight), "finite and >= 0"),
            ("attention_weight", self.attention_weight >= 0 and math.isfinite(self.attention_weight),
             "finite and >= 0"),
            ("repetition_window", isinstance(self.repetition_window, int) and self.repetition_window >= 1,
             "an int >= 1"),
            ("history_size", isinstance(self.history_size, int) and self.history_size >= 1, "an int >= 1"),
            ("lookahead_k", isinstance(self.lookahead_k, int) and self.lookahead_k >= 2, "an int >= 2"),
            ("entropy_weight", self.entropy_weight >= 0, ">= 0"),
            ("varentropy_weight", self.varentropy_weight >= 0, ">= 0"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"AlphaSamplerConfig.{name} must be {allowed}, got {getattr(self, name)!r}")
        if not self.cold_point < self.hot_point:
            raise ValueError(f"AlphaSamplerConfig.cold_point must be < hot_point, got {self.cold_point} and "
                             f"{self.hot_point}")
        if self.token_weight + self.attention_weight == 0:
            raise ValueError("AlphaSamplerConfig: token_weight and attention_weight cannot both be 0")


def _cache_rows(cache, rows: torch.Tensor):
    """A cache holding ``rows`` of ``cache`` (repeats allowed), leaving ``cache`` itself untouched."""
    # batch_select_indices rebinds fresh (indexed) tensors rather than writing into the old ones, both in HF
    # caches (tensors inside per-layer objects) and in QLLM's (lists of tensors). So it is enough to select on
    # a copy of the containers: the original's tensors are shared, never modified, and no full copy is made.
    selected = copy.copy(cache)
    for name, value in vars(cache).items():
        if isinstance(value, list):
            setattr(selected, name, [item if item is None or isinstance(item, torch.Tensor) else copy.copy(item)
                                     for item in value])
    selected.batch_select_indices(rows)
    return selected


class AlphaSampler:
    """Adaptive sampler driven by alpha (see module docstring); a TokenSampler for ``generate``.

    Per-row parameters: each row of the batch gets its own alpha, temperature, top-k, top-p and penalty.
    ``history()`` gives each row's last ``history_size`` alphas; ``state_counts()`` their states;
    ``stats()`` (reported by ``generate``) the totals, including the lookahead's extra forward tokens.
    """

    def __init__(self, config: AlphaSamplerConfig | None = None):
        self.config = config or AlphaSamplerConfig()
        self.probe = AttentionProbe() if self.config.attention_weight > 0 else None
        self._attached = False
        self.reset(0)

    def reset(self, batch_size: int) -> None:
        size = self.config.history_size
        self._history = torch.full((batch_size, size), float("nan"))
        self._written = torch.zeros(batch_size, dtype=torch.long)
        self.total_states = torch.zeros(3, dtype=torch.long)
        self.tokens = 0
        self.alpha_sum = 0.0
        self.lookahead_rows = 0
        self.lookahead_changed = 0
        self.lookahead_forward_tokens = 0
        self.last_alpha: torch.Tensor | None = None
        self.last_parameters: dict[str, torch.Tensor] = {}

    def baseline(self):
        """The fixed-parameter sampler with this config's base values (what the adaptive one is compared to)."""
        from .chain import SamplingChain

        c = self.config
        return SamplingChain(temperature=c.base_temperature, top_k=c.base_top_k, top_p=c.base_top_p,
                             repetition_penalty=c.base_repetition_penalty)

    # generate() hooks
    def begin(self, model: torch.nn.Module, batch_size: int) -> None:
        self.reset(batch_size)
        if self.probe is not None:
            self.probe.attach(model)
            self._attached = True

    def end(self) -> None:
        if self._attached:
            self.probe.detach()
            self._attached = False

    def alpha(self, scores: torch.Tensor, batch_size: int) -> torch.Tensor:
        """alpha [B] of the current step from the logits and (if weighted) the probe's attention entropy."""
        signals = token_signals(scores)
        alpha = self.config.token_weight * signals.entropy_normalised
        if self.probe is not None:
            if not self._attached:
                raise ValueError("AlphaSampler needs begin(model, batch_size) before select() to read attention "
                                 "(generate() calls it), or AlphaSamplerConfig(attention_weight=0.0)")
            alpha = alpha + self.config.attention_weight * self.probe.read(batch_size).to(alpha.device)
        return alpha

    def parameters(self, alpha: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-row sampling parameters from the published maps."""
        return {
            "temperature": alpha_temperature(alpha),
            "top_k": torch.round(alpha_top_k(alpha)).long(),
            "top_p": alpha_top_p(alpha),
            "repetition_penalty": alpha_repetition_penalty(alpha),
        }

    def warp(self, scores: torch.Tensor, input_ids: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        # HF's order: penalty on raw logits, then temperature, then the truncations.
        scores = RepetitionPenalty(params["repetition_penalty"], window=self.config.repetition_window)(input_ids, scores)
        scores = Temperature(params["temperature"])(input_ids, scores)
        scores = TopK(params["top_k"])(input_ids, scores)
        return TopP(params["top_p"])(input_ids, scores)

    def select(self, scores: torch.Tensor, state, rng: RowRNG) -> torch.Tensor:
        batch = scores.shape[0]
        if self._history.shape[0] != batch:
            if self.tokens:
                raise ValueError(f"scores have {batch} rows but this run started with {self._history.shape[0]}")
            self.reset(batch)
        alpha = self.alpha(scores, batch)
        active = ~state.finished.to(alpha.device)
        states = alpha_state(alpha, self.config.cold_point, self.config.hot_point)
        self._record(alpha, states, active)
        params = self.parameters(alpha)
        self.last_alpha, self.last_parameters = alpha, params
        warped = self.warp(scores, state.input_ids, params)
        tokens = rng.categorical(warped)
        cold = active & (states == AlphaState.COLD)
        if self.config.lookahead and bool(cold.any()):
            tokens = self._lookahead(warped, tokens, cold.nonzero().squeeze(1), state)
        return tokens

    def _record(self, alpha: torch.Tensor, states: torch.Tensor, active: torch.Tensor) -> None:
        rows = active.nonzero().squeeze(1).cpu()
        if rows.numel() == 0:
            return
        slot = self._written[rows] % self.config.history_size
        self._history[rows, slot] = alpha[rows].detach().float().cpu()
        self._written[rows] += 1
        self.total_states += torch.bincount(states[active].cpu(), minlength=3)
        self.tokens += rows.numel()
        self.alpha_sum += float(alpha[active].sum())

    @torch.no_grad()
    def _lookahead(self, warped: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor, state) -> torch.Tensor:
        """Replace each COLD row's token by the candidate whose next-step distribution is most settled."""
        k = min(self.config.lookahead_k, warped.shape[-1])
        values, candidates = warped[rows].topk(k, dim=-1)
        usable = torch.isfinite(values)
        keep = usable.sum(dim=-1) >= 2  # one possible token leaves nothing to choose
        rows, candidates, usable = rows[keep], candidates[keep], usable[keep]
        if rows.numel() == 0:
            return tokens
        expanded = rows.repeat_interleave(k)
        cache = _cache_rows(state.past_key_values, expanded)
        mask = torch.cat([state.attention_mask[expanded], state.attention_mask.new_ones(expanded.shape[0], 1)], dim=1)
        if self.probe is not None:
            self.probe.enabled = False
        try:
            logits, _ = forward_step(state.model, candidates.reshape(-1, 1), mask, cache)
        finally:
            if self.probe is not None:
                self.probe.enabled = True
        entropy, varentropy = entropy_varentropy(logits[:, -1])
        score = self.config.entropy_weight * entropy + self.config.varentropy_weight * varentropy
        score = score.view(-1, k).masked_fill(~usable, float("inf"))
        best = candidates.gather(1, score.argmin(dim=-1, keepdim=True)).squeeze(1)
        self.lookahead_rows += rows.numel()
        self.lookahead_forward_tokens += expanded.numel()
        self.lookahead_changed += int((best != tokens[rows]).sum())
        tokens = tokens.clone()
        tokens[rows] = best
        return tokens

    # Reporting
    def history(self) -> list[list[float]]:
        """Each row's most recent alphas, oldest first (at most ``history_size``)."""
        out = []
        size = self.config.history_size
        for row in range(self._history.shape[0]):
            written = int(self._written[row])
            if written <= size:
                values = self._history[row, :written]
            else:
                start = written % size
                values = torch.cat([self._history[row, start:], self._history[row, :start]])
            out.append(values.tolist())
        return out

    def state_counts(self) -> dict[str, torch.Tensor]:
        """Per row, how many alphas in the rolling history are COLD / MIXED / HOT."""
        filled = ~torch.isnan(self._history)
        states = alpha_state(torch.nan_to_num(self._history), self.config.cold_point, self.config.hot_point)
        return {s.name: ((states == s) & filled).sum(dim=1) for s in AlphaState}

    def stats(self) -> dict:
        """Totals since begin(): state frequencies, mean alpha and the lookahead's effect and cost."""
        total = max(self.tokens, 1)
        return {
            "tokens": self.tokens,
            "mean_alpha": self.alpha_sum / total,
            "state_counts": {s.name: int(self.total_states[s]) for s in AlphaState},
            "state_frequencies": {s.name: int(self.total_states[s]) / total for s in AlphaState},
            "lookahead_rows": self.lookahead_rows,
            "lookahead_changed": self.lookahead_changed,
            "lookahead_change_rate": self.lookahead_changed / max(self.lookahead_rows, 1),
            "lookahead_forward_tokens": self.lookahead_forward_tokens,
        }
