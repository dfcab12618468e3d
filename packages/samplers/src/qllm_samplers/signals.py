"""Uncertainty signals shared by the adaptive samplers (AlphaSampler, EntropixSampler).

Two kinds of signal:

- **Token entropy / varentropy** of the next-token distribution ``p = softmax(logits)``: the entropy
  ``H = -sum p log2 p`` (bits) and the varentropy ``Var[-log2 p] = sum p (log2 p)^2 - H^2`` (bits^2), the
  spread of the surprisal around its mean (entropix's second axis). Normalised versions divide by ``log2 V``
  (and ``(log2 V)^2``), so they lie in [0, 1] whatever the vocabulary size.
- **Attention entropy** of the *last* layer's attention weights for the *newest* position, averaged over
  heads, in bits, normalised by ``log2`` of the number of keys that position may attend to.

The attention signal is read without ``output_attentions=True`` (which forces the slow eager path in every
layer). For Hugging Face models, ``AttentionProbe`` installs a custom attention function through
``transformers.AttentionInterface``: every layer still runs the model's own kernel (SDPA or eager), and only
the last layer additionally recomputes ``softmax(q_new K^T)`` for its newest query, a [B, H, 1, S] product.
Masked keys (left padding, static-cache slots not written yet) get exactly zero weight and are not counted in
the normaliser. entropix let empty cache slots enter its softmax, so its attention entropy drifted upwards as
the cache filled, independent of the text.

For QLLM, the agreed protocol is an attribute on its attention modules: when ``capture_last_query_probs`` is
True, the module stores ``last_query_probs`` [B, H, S], the softmax weights of the newest query over all keys
with masked slots exactly zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import hf_compat

LN2 = math.log(2.0)

# Names under which the probe's attention function is registered in transformers' interfaces, keyed by the
# implementation it delegates to (the model keeps its own kernel; only the last layer does extra work).
_PROBE_IMPLEMENTATIONS = {"sdpa": "qllm_probe_sdpa", "eager": "qllm_probe_eager"}
_PROBE_ATTRIBUTE = "_qllm_attention_probe"


@dataclass
class TokenSignals:
    """Per-row signals of a batch of next-token distributions ([B] tensors, float32)."""

    entropy: torch.Tensor  # bits
    varentropy: torch.Tensor  # bits^2
    entropy_normalised: torch.Tensor  # entropy / log2(V), in [0, 1]
    varentropy_normalised: torch.Tensor  # varentropy / log2(V)^2


def entropy_varentropy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy (bits) and varentropy (bits^2) of ``softmax(logits)`` along the last dimension.

    -inf logits are tokens with probability zero; they contribute nothing (0 * log 0 = 0). This runs on every
    decode step over the whole vocabulary, so it is written as few passes: the two sums are dot products, and
    the varentropy is E[(log p)^2] - H^2.
    """
    if not torch.is_floating_point(logits):
        raise ValueError(f"logits must be a floating-point tensor, got {logits.dtype}")
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    probs = log_probs.exp()
    # A zero-probability token has log p = -inf; clamping it keeps p * log p at exactly 0 instead of NaN.
    log_probs = log_probs.clamp(min=-1e4)
    flat_probs, flat_logs = probs.reshape(-1, 1, probs.shape[-1]), log_probs.reshape(-1, probs.shape[-1], 1)
    entropy = -torch.bmm(flat_probs, flat_logs).reshape(probs.shape[:-1])
    second = torch.bmm(flat_probs, flat_logs * flat_logs).reshape(probs.shape[:-1])
    varentropy = (second - entropy * entropy).clamp(min=0)
    return entropy / LN2, varentropy / LN2**2


def token_signals(logits: torch.Tensor) -> TokenSignals:
    """Token entropy and varentropy of each row of ``logits`` [B, V], raw and normalised by log2(V)."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    vocab = logits.shape[-1]
    if vocab < 2:
        raise ValueError(f"logits: vocabulary size must be >= 2 to normalise by log2(V), got {vocab}")
    # NaN and +inf both propagate into the row maximum, as does a row with nothing but -inf: one cheap check.
    if not torch.isfinite(logits.amax(dim=-1)).all():
        if torch.isnan(logits).any() or torch.isposinf(logits).any():
            raise ValueError("logits: NaN or +inf in the logits; the signals need finite values (-inf allowed)")
        raise ValueError("logits: a row has no finite logit (every token is -inf)")
    entropy, varentropy = entropy_varentropy(logits)
    scale = math.log2(vocab)
    return TokenSignals(entropy, varentropy, entropy / scale, varentropy / scale**2)


def attention_entropy(probs: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy of attention weights ``probs`` [B, H, S] (one query per row and head).

    ``valid`` [B, S] bool marks the keys the query may attend to (default: all). Returns per-head entropies in
    bits [B, H] and their head average normalised by ``log2(number of valid keys)`` [B] (0 for a row with a
    single valid key, where there is no uncertainty to measure).
    """
    if probs.dim() != 3:
        raise ValueError(f"attention probs must be [batch, heads, keys], got shape {tuple(probs.shape)}")
    if not torch.isfinite(probs).all():
        raise ValueError("attention probs: non-finite attention weights")
    probs = probs.float()
    if valid is None:
        valid = torch.ones(probs.shape[0], probs.shape[2], dtype=torch.bool, device=probs.device)
    probs = probs * valid[:, None, :]
    surprisal = torch.where(probs > 0, -torch.log2(probs.clamp_min(1e-38)), torch.zeros_like(probs))
    head_bits = (probs * surprisal).sum(dim=-1)
    keys = valid.sum(dim=-1).float()
    normaliser = torch.log2(keys.clamp_min(2.0))
    normalised = torch.where(keys > 1, head_bits.mean(dim=-1) / normaliser, torch.zeros_like(normaliser))
    return head_bits, normalised


@dataclass
class AttentionMetrics:
    """entropix's attention metrics of the newest query of the last layer ([B] tensors, float32).

    ``entropy``: head-mean attention entropy in bits; ``varentropy``: the variance over heads of the per-head
    entropies (population variance, as jnp.var); ``agreement``: mean over heads and valid keys of |p_h - mean_h p|;
    ``interaction_strength``: mean |q k / sqrt(d)| over heads and valid keys, None where the model exposes only
    the probabilities (QLLM's capture flag). entropix averaged over every cache slot, written or not; here only
    the keys the query may attend to count.
    """

    entropy: torch.Tensor
    varentropy: torch.Tensor
    agreement: torch.Tensor
    interaction_strength: torch.Tensor | None


def attention_metrics(probs: torch.Tensor, valid: torch.Tensor, raw_scores: torch.Tensor | None = None,
                      head_bits: torch.Tensor | None = None) -> AttentionMetrics:
    """``AttentionMetrics`` of attention weights ``probs`` [B, H, S] over valid keys ``valid`` [B, S]
    (``head_bits``: their per-head entropy, when the caller has it already)."""
    if head_bits is None:
        head_bits, _ = attention_entropy(probs, valid)
    probs = probs.float() * valid[:, None, :]
    keys = valid.sum(dim=-1).clamp(min=1).float()
    agreement = (probs - probs.mean(dim=1, keepdim=True)).abs().sum(dim=-1).mean(dim=-1) / keys
    interaction = None
    if raw_scores is not None:
        interaction = (raw_scores.float().abs() * valid[:, None, :]).sum(dim=-1).mean(dim=-1) / keys
    return AttentionMetrics(head_bits.mean(dim=-1), head_bits.var(dim=-1, unbiased=False), agreement, interaction)


def _newest_query_probs(module, query: torch.Tensor, key: torch.Tensor, attention_mask, scaling) -> tuple:
    """softmax(q_new K^T) of the newest query [B, H, S], the valid-key mask [B, S] and the raw scores [B, H, S]."""
    q = query[:, :, -1:, :].float()  # [B, Hq, 1, D]
    heads, kv_heads = q.shape[1], key.shape[1]
    k = key.float()
    if heads != kv_heads:  # grouped-query attention: each KV head serves heads // kv_heads query heads
        k = k.repeat_interleave(heads // kv_heads, dim=1)
    scale = scaling if scaling is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = (q @ k.transpose(-1, -2)).squeeze(2) * scale  # [B, H, S]
    raw = scores
    batch, _, keys = scores.shape
    if attention_mask is None:
        # No mask means causal attention aligned at the first key (SDPA's is_causal): the newest of q queries
        # sees keys 0..q-1. Keys beyond that are unwritten static-cache slots, and must not enter the softmax.
        queries = query.shape[2]
        seen = keys if queries == 1 else min(queries, keys)
        valid = (torch.arange(keys, device=scores.device) < seen).expand(batch, keys)
        scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    else:
        last_row = attention_mask[:, :, -1, :keys]  # [B or 1, 1 or H, S]: the newest query's row
        if last_row.dtype == torch.bool:
            valid = last_row.all(dim=1)
            scores = scores.masked_fill(~last_row, float("-inf"))
        else:  # additive float mask (eager): masked keys hold the dtype's minimum
            valid = (last_row > torch.finfo(last_row.dtype).min / 2).all(dim=1)
            scores = scores + last_row.float()
            scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
        valid = valid.expand(batch, keys)
    probs = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(probs, nan=0.0), valid, raw


def _probe_attention(delegate_name: str):
    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        delegate = hf_compat.attention_function(module, delegate_name)
        output = delegate(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        probe = getattr(module, _PROBE_ATTRIBUTE, None)
        if probe is not None and probe.enabled:
            probs, valid, raw = _newest_query_probs(module, query, key, attention_mask, scaling)
            probe._record(probs, valid, raw)
        return output

    return attention


def _register_probe_implementations() -> None:
    for delegate, name in _PROBE_IMPLEMENTATIONS.items():
        hf_compat.register_attention_function(name, _probe_attention(delegate), mask_like=delegate)


class AttentionProbe:
    """Reads the last layer's attention entropy of the newest position during ordinary forward passes.

    ``attach(model)`` before decoding, ``detach()`` after (the model is restored exactly). After each forward
    pass, ``entropy_normalised`` [B] and ``head_entropy`` [B, H] (bits) describe the newest position of each
    row. Set ``enabled = False`` around forward passes whose attention should not be recorded (lookahead).
    """

    def __init__(self):
        self.model = None
        self._enabled = True
        self.head_entropy: torch.Tensor | None = None
        self.entropy_normalised: torch.Tensor | None = None
        self._last: tuple | None = None
        self._hf_restore: str | None = None
        self._hf_module = None
        self._capture_module = None

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = bool(value)
        if self._capture_module is not None:
            self._capture_module.capture_last_query_probs = self._enabled

    @property
    def attached(self) -> bool:
        return self.model is not None

    def attach(self, model: torch.nn.Module) -> AttentionProbe:
        if self.model is not None:
            raise ValueError("AttentionProbe is already attached to a model; call detach() first")
        capture = [m for m in model.modules() if hasattr(m, "capture_last_query_probs")]
        if capture:
            self._capture_module = capture[-1]  # modules() is in registration order: the last is the top layer
            self._capture_module.capture_last_query_probs = True
        elif callable(getattr(model, "set_attn_implementation", None)) and hasattr(model, "config"):
            self._attach_hf(model)
        else:
            raise ValueError(_unreadable_message(model, "it is neither a transformers model nor a model whose "
                                                 "attention modules have `capture_last_query_probs`"))
        self.model = model
        self.head_entropy = self.entropy_normalised = None
        return self

    def _attach_hf(self, model) -> None:
        current = hf_compat.attention_implementation(model)
        if current not in _PROBE_IMPLEMENTATIONS:
            raise ValueError(_unreadable_message(
                model, f"its attention implementation is {current!r}; the probe wraps only 'sdpa' or 'eager' "
                       "(load it with attn_implementation='sdpa')"))
        last = hf_compat.last_attention_layer(model)
        if last is None:
            raise ValueError(_unreadable_message(model, "no attention module with a `layer_idx` was found"))
        _register_probe_implementations()
        self._hf_module = last
        setattr(self._hf_module, _PROBE_ATTRIBUTE, self)
        self._hf_restore = current
        model.set_attn_implementation(_PROBE_IMPLEMENTATIONS[current])
        if hf_compat.attention_implementation(model) != _PROBE_IMPLEMENTATIONS[current]:
            self.detach_quietly()
            raise ValueError(_unreadable_message(model, "it does not accept a custom attention implementation"))

    def detach_quietly(self) -> None:
        if self._hf_module is not None:
            delattr(self._hf_module, _PROBE_ATTRIBUTE)
            self._hf_module = None

    def detach(self) -> None:
        """Restore the model: its original attention implementation, capture flags off (no-op when detached)."""
        if self.model is None:
            return
        if self._hf_restore is not None:
            self.model.set_attn_implementation(self._hf_restore)
            self._hf_restore = None
        self.detach_quietly()
        if self._capture_module is not None:
            self._capture_module.capture_last_query_probs = False
            if hasattr(self._capture_module, "last_query_probs"):
                self._capture_module.last_query_probs = None
            self._capture_module = None
        self.model = None

    def _record(self, probs: torch.Tensor, valid: torch.Tensor, raw_scores: torch.Tensor | None = None) -> None:
        self.head_entropy, self.entropy_normalised = attention_entropy(probs, valid)
        self._last = (probs, valid, raw_scores)

    def read_metrics(self, batch_size: int) -> AttentionMetrics:
        """entropix's attention metrics of the newest position after the latest recorded forward pass."""
        self.read(batch_size)
        return attention_metrics(*self._last, head_bits=self.head_entropy)  # read() computed the entropy

    def read(self, batch_size: int) -> torch.Tensor:
        """Normalised attention entropy [B] of the newest position after the latest recorded forward pass."""
        if self.model is None:
            raise ValueError("AttentionProbe.read: the probe is not attached to a model (call attach(model))")
        if self._capture_module is not None:
            probs = getattr(self._capture_module, "last_query_probs", None)
            if probs is None:
                raise ValueError(_unreadable_message(self.model, "`last_query_probs` was not set by the forward pass"))
            # Masked slots are exactly zero by protocol; a valid key with underflowed weight adds nothing anyway.
            valid = (probs > 0).any(dim=1)
            self._record(probs, valid)
        if self.entropy_normalised is None:
            raise ValueError(_unreadable_message(self.model, "no attention was recorded during the forward pass"))
        if self.entropy_normalised.shape[0] != batch_size:
            raise ValueError(f"attention entropy has {self.entropy_normalised.shape[0]} rows, scores have "
                             f"{batch_size}: the probe saw a different forward pass than the one being sampled")
        if not torch.isfinite(self.entropy_normalised).all():
            raise ValueError("attention entropy is not finite (non-finite attention weights)")
        return self.entropy_normalised


def _unreadable_message(model, why: str) -> str:
    return (f"cannot read the attention of {type(model).__name__}: {why}. Use a transformers causal LM with "
            "sdpa or eager attention, a QLLM, or give your attention modules a `capture_last_query_probs` flag "
            "that stores `last_query_probs` [B, H, S]; or turn the attention signal off "
            "(AlphaSamplerConfig(attention_weight=0.0), EntropixConfig(use_attention=False))")
