"""AlphaSampler: sampling parameters set per token from how uncertain the model is.

At every step a scalar ``alpha`` per row combines two uncertainty signals (``qllm_samplers.signals``): the
normalised entropy of the next-token distribution and the normalised entropy of the last layer's attention
for the newest position. The published maps below turn alpha into temperature, top-k, top-p and a repetition
penalty (all increasing in alpha: an uncertain model is sampled more broadly), and alpha's state
(COLD / MIXED / HOT) decides whether to run a lookahead step. In COLD state the top candidates are each run one
step ahead, in one batched forward pass from the shared KV cache, and the one whose next distribution is most
settled (lowest ``entropy_weight * H + varentropy_weight * VarH``, in bits) is chosen. The candidates are the
``lookahead_k`` most likely tokens inside the row's top-p nucleus at temperature 1.

The combination (see ``AlphaSamplerConfig`` and docs/adaptive.md) is
``alpha = token_weight * h_token + attention_weight * h_attention`` with both signals in [0, 1]; its weights
were chosen on SmolLM2 generations so that all three states occur on real text.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from enum import IntEnum

import torch

from . import hf_compat
from .chain import RowParameters, SamplingChain, sample_rows, warp_rows
from .lm import forward_step
from .rng import RowRNG
from .signals import AttentionProbe, entropy_varentropy, token_signals
from .warpers import check_input_ids


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


# The published maps, exactly as given (a float in, a float out; a tensor in, a tensor out). The underscored
# versions skip the input check for the sampler's hot path, where alpha is checked once per step.
def _temperature(t: torch.Tensor) -> torch.Tensor:
    return 0.1 + 1.2 / (1 + torch.exp(-1.5 * (t - 1)))


def _top_k(t: torch.Tensor) -> torch.Tensor:
    return 10 + 190 * (torch.atan(t - 1) / math.pi + 0.5)


def _top_p(t: torch.Tensor) -> torch.Tensor:
    return 0.85 + 0.1 * (2 / (1 + torch.exp(-0.8 * t)) - 1)


def _repetition_penalty(t: torch.Tensor) -> torch.Tensor:
    return 1 + 0.3 / (1 + torch.exp(-2 * (t - 1)))


def alpha_temperature(a):
    """0.1 + 1.2 / (1 + exp(-1.5 (a - 1))): from 0.1 (a -> -inf) through 0.7 (a = 1) to 1.3."""
    t, is_tensor = _as_tensor(a)
    return _result(_temperature(t), is_tensor)


def alpha_top_k(a):
    """10 + 190 (atan(a - 1) / pi + 0.5): from 10 through 105 (a = 1) to 200; rounded to an int when used."""
    t, is_tensor = _as_tensor(a)
    return _result(_top_k(t), is_tensor)


def alpha_top_p(a):
    """0.85 + 0.1 (2 / (1 + exp(-0.8 a)) - 1): 0.85 at a = 0, rising towards 0.95."""
    t, is_tensor = _as_tensor(a)
    return _result(_top_p(t), is_tensor)


def alpha_repetition_penalty(a):
    """1 + 0.3 / (1 + exp(-2 (a - 1))): from 1.0 through 1.15 (a = 1) to 1.3."""
    t, is_tensor = _as_tensor(a)
    return _result(_repetition_penalty(t), is_tensor)


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
    codes = _state_codes(t, cold_point, hot_point)
    return codes if is_tensor else AlphaState(int(codes))


def _state_codes(t: torch.Tensor, cold_point: float, hot_point: float) -> torch.Tensor:
    # MIXED = 1, plus one above hot_point, minus one below cold_point.
    return 1 + (t > hot_point).long() - (t < cold_point).long()


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
    #         + alpha_offset  (calibrate_weights fits all three to another model)
    token_weight: float = 4.0
    attention_weight: float = 1.0
    alpha_offset: float = 0.0
    repetition_window: int = 128
    history_size: int = 100
    lookahead: bool = True
    lookahead_k: int = 3
    entropy_weight: float = 0.8
    varentropy_weight: float = 0.2

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"AlphaSamplerConfig.{f.name} must be finite, got {value}")
        checks = [
            ("base_temperature", self.base_temperature > 0, "> 0"),
            ("base_top_p", 0 < self.base_top_p <= 1, "in (0, 1]"),
            ("base_top_k", isinstance(self.base_top_k, int) and self.base_top_k >= 1, "an int >= 1"),
            ("base_repetition_penalty", self.base_repetition_penalty > 0, "> 0"),
            ("token_weight", self.token_weight >= 0 and math.isfinite(self.token_weight), "finite and >= 0"),
            ("attention_weight", self.attention_weight >= 0 and math.isfinite(self.attention_weight),
             "finite and >= 0"),
            ("alpha_offset", math.isfinite(self.alpha_offset), "finite"),
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


ALPHA_TOP_K_MAX = 200  # the top-k map's supremum: a static candidate bound, so no int(top_k.max()) per step


def real_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, vocab: int) -> torch.Tensor:
    """``input_ids`` with padding positions replaced by ``vocab``, an id the repetition penalty ignores (it
    penalises ids >= V in a scratch column), so a left-padded row's window counts only its real tokens."""
    if attention_mask is None:
        return input_ids
    return input_ids.masked_fill(attention_mask[:, -input_ids.shape[1]:] == 0, vocab)


class AlphaSampler:
    """Adaptive sampler driven by alpha (see module docstring); a TokenSampler for ``generate``.

    Per-row parameters: each row of the batch gets its own alpha, temperature, top-k, top-p and penalty.
    ``history()`` gives each row's last ``history_size`` alphas; ``state_counts()`` their states;
    ``stats()`` (reported by ``generate``) the totals, including the lookahead's extra forward tokens.
    """

    def __init__(self, config: AlphaSamplerConfig | None = None):
        self.config = config or AlphaSamplerConfig()
        self.probe = AttentionProbe() if self.config.attention_weight > 0 else None
        self.reset(0)

    def reset(self, batch_size: int) -> None:
        size = self.config.history_size
        self._history = torch.full((batch_size, size), float("nan"))
        self._written = torch.zeros(batch_size, dtype=torch.long)
        self._state_totals = torch.zeros(len(AlphaState) + 1, dtype=torch.long)  # last slot: finished rows
        self._alpha_sum = torch.zeros((), dtype=torch.float64)
        self.lookahead_rows = 0
        self.lookahead_changed = 0
        self.lookahead_forward_tokens = 0
        self.last_alpha: torch.Tensor | None = None
        self.last_parameters: dict[str, torch.Tensor] = {}

    def baseline(self) -> SamplingChain:
        """The fixed-parameter sampler with this config's base values (what the adaptive one is compared to)."""
        c = self.config
        return SamplingChain(temperature=c.base_temperature, top_k=c.base_top_k, top_p=c.base_top_p,
                             repetition_penalty=c.base_repetition_penalty)

    # generate() hooks
    def begin(self, model: torch.nn.Module, batch_size: int) -> None:
        self.reset(batch_size)
        if self.probe is not None:
            self.probe.attach(model)

    def end(self) -> None:
        if self.probe is not None:
            self.probe.detach()

    def alpha(self, scores: torch.Tensor, batch_size: int) -> torch.Tensor:
        """alpha [B] of the current step from the logits and (if weighted) the probe's attention entropy."""
        signals = token_signals(scores)
        alpha = self.config.token_weight * signals.entropy_normalised + self.config.alpha_offset
        if self.probe is not None:
            if not self.probe.attached:
                raise ValueError("AlphaSampler needs begin(model, batch_size) before select() to read attention "
                                 "(generate() calls it), or AlphaSamplerConfig(attention_weight=0.0)")
            alpha = alpha + self.config.attention_weight * self.probe.read(batch_size).to(alpha.device)
        return alpha

    def parameters(self, alpha: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-row sampling parameters from the published maps (alpha is finite: its signals are checked)."""
        return {
            "temperature": _temperature(alpha),
            "top_k": torch.round(_top_k(alpha)).long(),
            "top_p": _top_p(alpha),
            "repetition_penalty": _repetition_penalty(alpha),
        }

    def row_parameters(self, params: dict[str, torch.Tensor]) -> RowParameters:
        """The classic chain's stages (penalty, temperature, top-k, top-p in transformers' order) as per-row
        tensors. The published maps keep every value in range (temperature in (0.1, 1.3), top-k in [10, 200],
        top-p in [0.85, 0.95), penalty in [1, 1.3]), so nothing is validated, nor synchronised, per step."""
        return RowParameters(temperature=params["temperature"], top_k=params["top_k"], top_p=params["top_p"],
                             repetition_penalty=params["repetition_penalty"],
                             repetition_window=self.config.repetition_window,
                             k_max=max(ALPHA_TOP_K_MAX, self.config.lookahead_k))

    def warp(self, scores: torch.Tensor, input_ids: torch.Tensor, params: dict[str, torch.Tensor],
             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The warped scores [B, V] that the draw samples from (padding never counts as a repeated token)."""
        return warp_rows(real_tokens(input_ids, attention_mask, scores.shape[-1]), scores,
                         self.row_parameters(params))

    def select(self, scores: torch.Tensor, state, rng: RowRNG) -> torch.Tensor:
        batch = scores.shape[0]
        # shape only here: the draw below (sample_rows, penalty on) checks the id values once
        check_input_ids(state.input_ids, batch, "AlphaSampler's repetition penalty", values=False)
        if self._history.shape[0] != batch:
            if self.tokens:
                raise ValueError(f"scores have {batch} rows but this run started with {self._history.shape[0]}")
            self.reset(batch)
        if self._history.device != scores.device:
            self._history, self._written = self._history.to(scores.device), self._written.to(scores.device)
            self._state_totals = self._state_totals.to(scores.device)
            self._alpha_sum = self._alpha_sum.to(scores.device)
        alpha = self.alpha(scores, batch)
        active = ~state.finished.to(alpha.device)
        states = _state_codes(alpha, self.config.cold_point, self.config.hot_point)
        self._record(alpha, states, active)
        params = self.parameters(alpha)
        self.last_alpha, self.last_parameters = alpha, params
        # The draw does not warp the whole vocabulary when it can avoid it (the same draw as plain sampling).
        input_ids = real_tokens(state.input_ids, state.attention_mask, scores.shape[-1])
        tokens = sample_rows(input_ids, scores, rng, self.row_parameters(params))
        cold = active & (states == AlphaState.COLD)
        if self.config.lookahead and bool(cold.any()):
            rows = cold.nonzero().squeeze(1)
            tokens = self._lookahead(self.candidate_scores(scores[rows], input_ids[rows],
                                                           {name: value[rows] for name, value in params.items()}),
                                     tokens, rows, state)
        return tokens

    def candidate_scores(self, scores: torch.Tensor, input_ids: torch.Tensor,
                         params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scores whose finite entries are the lookahead candidates of each (COLD) row.

        The candidates are the ``lookahead_k`` most likely tokens of the row's penalised distribution at
        temperature 1 that lie inside its top-p nucleus. Temperature 1, because a COLD row's own low temperature
        (about 0.3) leaves a single token in the nucleus almost always, and there would be nothing to choose.
        """
        ones = torch.ones_like(params["temperature"])
        return self.warp(scores, input_ids, {**params, "temperature": ones,
                                             "top_k": torch.full_like(params["top_k"], self.config.lookahead_k)})

    def _record(self, alpha: torch.Tensor, states: torch.Tensor, active: torch.Tensor) -> None:
        # Tensor ops only (no host sync): this runs every step.
        rows = torch.arange(alpha.shape[0], device=alpha.device)
        slot = self._written % self.config.history_size
        kept = self._history[rows, slot]
        self._history[rows, slot] = torch.where(active, alpha.float(), kept)
        self._written += active.long()
        self._state_totals += torch.bincount(torch.where(active, states, len(AlphaState)),
                                             minlength=len(AlphaState) + 1)
        self._alpha_sum += torch.where(active, alpha, 0.0).sum().double()

    @torch.no_grad()
    def _lookahead(self, warped: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor, state) -> torch.Tensor:
        """Replace each COLD row's token by the candidate whose next-step distribution is most settled.

        ``warped`` [R, V]: ``candidate_scores`` of the COLD ``rows``; their finite top entries are the candidates.
        """
        k = min(self.config.lookahead_k, warped.shape[-1])
        values, candidates = warped.topk(k, dim=-1)
        usable = torch.isfinite(values)
        keep = usable.sum(dim=-1) >= 2  # one possible token leaves nothing to choose
        rows, candidates, usable = rows[keep], candidates[keep], usable[keep]
        if rows.numel() == 0:
            return tokens
        expanded = rows.repeat_interleave(k)
        cache = hf_compat.cache_rows_copy(state.past_key_values, expanded)
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

    @property
    def tokens(self) -> int:
        """Tokens chosen so far for rows that had not finished."""
        return int(self._state_totals[: len(AlphaState)].sum())

    def stats(self) -> dict:
        """Totals since begin(): state frequencies, mean alpha and the lookahead's effect and cost."""
        total = max(self.tokens, 1)
        return {
            "tokens": self.tokens,
            "mean_alpha": float(self._alpha_sum) / total,
            "state_counts": {s.name: int(self._state_totals[s]) for s in AlphaState},
            "state_frequencies": {s.name: int(self._state_totals[s]) / total for s in AlphaState},
            "lookahead_rows": self.lookahead_rows,
            "lookahead_changed": self.lookahead_changed,
            "lookahead_change_rate": self.lookahead_changed / max(self.lookahead_rows, 1),
            "lookahead_forward_tokens": self.lookahead_forward_tokens,
        }


class _SignalRecorder:
    """A TokenSampler that samples with a fixed chain and records (token entropy, attention entropy) per token."""

    def __init__(self, chain: SamplingChain):
        self.chain = chain
        self.probe = AttentionProbe()
        self.token: list[torch.Tensor] = []
        self.attention: list[torch.Tensor] = []

    def begin(self, model: torch.nn.Module, batch_size: int) -> None:
        self.probe.attach(model)

    def end(self) -> None:
        self.probe.detach()

    def select(self, scores: torch.Tensor, state, rng: RowRNG) -> torch.Tensor:
        active = ~state.finished
        self.token.append(token_signals(scores).entropy_normalised[active])
        self.attention.append(self.probe.read(scores.shape[0])[active])
        return self.chain.select(scores, state, rng)


@torch.no_grad()
def calibrate_weights(model: torch.nn.Module, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                      cold_fraction: float = 0.2, hot_fraction: float = 0.15, cold_point: float = 0.6,
                      hot_point: float = 1.8, max_new_tokens: int = 64, temperature: float = 0.7,
                      eos_token_id=None, generator=None) -> tuple[float, float, float]:
    """``(token_weight, attention_weight, alpha_offset)`` making this model's own text COLD / HOT at given rates.

    The signals' scales differ between models: SmolLM2's normalised token entropy is small (log2 V = 15.6
    bits), a byte model's is large (log2 V = 8 bits), and attention entropy depends on the context and on
    memory tokens. Text is sampled at ``temperature`` with the signals recorded, then ``fit_weights`` picks
    the weights. The defaults (4.0, 1.0, 0.0) are close to what this gives on SmolLM2-135M-Instruct.
    """
    from .generate import generate

    recorder = _SignalRecorder(SamplingChain(temperature=temperature))
    generate(model, input_ids, sampler=recorder, max_new_tokens=max_new_tokens, attention_mask=attention_mask,
             eos_token_id=eos_token_id, generator=generator)
    return fit_weights(torch.cat(recorder.token), torch.cat(recorder.attention), cold_fraction=cold_fraction,
                       hot_fraction=hot_fraction, cold_point=cold_point, hot_point=hot_point)


def fit_weights(token_entropy: torch.Tensor, attention_entropy: torch.Tensor, *, cold_fraction: float = 0.2,
                hot_fraction: float = 0.15, cold_point: float = 0.6, hot_point: float = 1.8,
                attention_ratio: float = 0.25) -> tuple[float, float, float]:
    """``(token_weight, attention_weight, alpha_offset)`` putting ``cold_fraction`` of the tokens below
    ``cold_point`` and ``hot_fraction`` above ``hot_point``.

    alpha = scale * (token + attention_ratio * attention) + offset: the two quantiles of the bracket fix the
    scale and the offset exactly (an affine map of the same ordering). ``attention_ratio`` 0.25 is the ratio of
    the default weights (1.0 / 4.0).
    """
    if token_entropy.shape != attention_entropy.shape or token_entropy.dim() != 1 or token_entropy.numel() < 2:
        raise ValueError(f"token_entropy and attention_entropy must be 1-D tensors of one shape with >= 2 values, "
                         f"got {tuple(token_entropy.shape)} and {tuple(attention_entropy.shape)}")
    for name, value in (("cold_fraction", cold_fraction), ("hot_fraction", hot_fraction)):
        if not 0 < value < 1:
            raise ValueError(f"{name} must be in (0, 1), got {value}")
    if cold_fraction + hot_fraction >= 1:
        raise ValueError(f"cold_fraction + hot_fraction must be < 1, got {cold_fraction + hot_fraction}")
    if not cold_point < hot_point:
        raise ValueError(f"cold_point must be < hot_point, got {cold_point} and {hot_point}")
    if not (attention_ratio >= 0 and math.isfinite(attention_ratio)):
        raise ValueError(f"attention_ratio must be finite and >= 0, got {attention_ratio}")
    combined = token_entropy.double() + attention_ratio * attention_entropy.double()
    low = float(torch.quantile(combined, cold_fraction))
    high = float(torch.quantile(combined, 1 - hot_fraction))
    if not high > low:
        raise ValueError("the signals do not vary between the two quantiles: no weights can separate the states")
    scale = (hot_point - cold_point) / (high - low)
    return scale, scale * attention_ratio, cold_point - scale * low
