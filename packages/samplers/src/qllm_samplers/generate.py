"""A KV-cache decode loop that any HF causal LM and the QLLM byte model can use with any token sampler.

One forward pass for the (left-padded) prompts, then one single-token pass per step. Each row stops at its own
EOS; finished rows keep receiving the pad token so the batch stays rectangular, and the loop ends when every row
is done. Alongside the tokens it records each token's log-probability under the *base* model (the raw logits
before any warping), which is what power sampling, likelihood analyses and diversity metrics need.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from .lm import check_decode_inputs, check_logits, forward_step
from .rng import GeneratorLike, RowRNG


@dataclass
class DecodeState:
    """What a token sampler may look at when choosing the next token (see docs/DESIGN.md)."""

    model: torch.nn.Module
    input_ids: torch.Tensor  # [B, T] prompt and tokens so far, left padded
    attention_mask: torch.Tensor  # [B, T]
    past_key_values: Any  # the cache that produced the current scores
    step: int  # 0 for the first new token
    finished: torch.Tensor  # [B] bool


@runtime_checkable
class TokenSampler(Protocol):
    def select(self, scores: torch.Tensor, state: DecodeState, rng: RowRNG) -> torch.Tensor: ...


class WarperSampler:
    """Adapts a plain HF-style warper ``(input_ids, scores) -> scores`` (or a list of them) to a TokenSampler."""

    def __init__(self, warpers: Callable | Sequence[Callable]):
        self.warpers = list(warpers) if isinstance(warpers, Sequence) else [warpers]

    def select(self, scores: torch.Tensor, state: DecodeState, rng: RowRNG) -> torch.Tensor:
        for warper in self.warpers:
            scores = warper(state.input_ids, scores)
        return rng.categorical(scores)


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # [B, T_prompt + N]: prompts then new tokens, pad after a row's EOS
    logprobs: torch.Tensor  # [B, N]: log p(token) under the base model; 0 after a row finished
    lengths: torch.Tensor  # [B]: new tokens per row, EOS included
    prompt_length: int
    forward_tokens: int  # token positions run through the model (prompt included)
    seconds: float
    stats: dict = field(default_factory=dict)  # sampler-specific counters, if it reports any

    @property
    def new_tokens(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length:]


def _as_token_sampler(sampler) -> TokenSampler:
    if isinstance(sampler, TokenSampler):
        return sampler
    if callable(sampler) or isinstance(sampler, Sequence):
        return WarperSampler(sampler)
    raise ValueError(f"sampler must have select(scores, state, rng) or be a warper callable, got {type(sampler)}")


def _eos_tensor(eos_token_id: int | Sequence[int] | None, device: torch.device) -> torch.Tensor | None:
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, dtype=torch.long, device=device) if ids else None


@torch.no_grad()
def generate(model: torch.nn.Module, input_ids: torch.Tensor, *, sampler, max_new_tokens: int,
             attention_mask: torch.Tensor | None = None, eos_token_id: int | Sequence[int] | None = None,
             generator: GeneratorLike = None, pad_token_id: int | None = None) -> GenerateOutput:
    """Decode up to ``max_new_tokens`` per row with ``sampler`` choosing each token.

    ``eos_token_id=None`` means no row stops early. ``generator`` seeds the per-row random streams (see
    ``RowRNG.from_generator``): per-row seeds make a request's tokens independent of its batch-mates.
    """
    attention_mask = check_decode_inputs(model, input_ids, attention_mask, max_new_tokens)
    batch, prompt_length = input_ids.shape
    device = input_ids.device
    token_sampler = _as_token_sampler(sampler)
    eos = _eos_tensor(eos_token_id, device)
    if pad_token_id is None:
        pad_token_id = int(eos[0]) if eos is not None else 0
    rng = RowRNG.from_generator(generator, batch, device)

    start = time.perf_counter()
    if hasattr(token_sampler, "begin"):
        token_sampler.begin(model, batch)
    try:
        logits, cache = forward_step(model, input_ids, attention_mask, None)
        forward_tokens = batch * prompt_length
        scores = logits[:, -1]
        tokens = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        logprobs = torch.zeros((batch, max_new_tokens), dtype=torch.float32, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        lengths = torch.zeros(batch, dtype=torch.long, device=device)
        sequence, mask = input_ids, attention_mask
        for step in range(max_new_tokens):
            # One pass over the vocabulary serves both the base log-probs and the input check: the log-sum-exp
            # is NaN, -inf or +inf exactly when a row holds NaN, has no finite logit, or holds +inf.
            log_normalizer = torch.logsumexp(scores, dim=-1)
            if not bool(torch.isfinite(log_normalizer[~finished]).all()):
                check_logits(scores[~finished], where=f"model logits at step {step}")
            state = DecodeState(model, sequence, mask, cache, step, finished)
            chosen = token_sampler.select(scores, state, rng)
            chosen_logprob = scores.gather(1, chosen[:, None]).squeeze(1) - log_normalizer
            chosen = torch.where(finished, pad_token_id, chosen)
            tokens[:, step] = chosen
            logprobs[:, step] = torch.where(finished, 0.0, chosen_logprob)
            lengths += (~finished).long()
            if eos is not None:
                finished = finished | torch.isin(chosen, eos)
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            sequence = torch.cat([sequence, chosen[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(chosen[:, None])], dim=1)
            logits, cache = forward_step(model, chosen[:, None], mask, cache)
            forward_tokens += batch
            scores = logits[:, -1]
    finally:
        if hasattr(token_sampler, "end"):
            token_sampler.end()
    used = int(lengths.max())
    stats = token_sampler.stats() if callable(getattr(token_sampler, "stats", None)) else {}
    return GenerateOutput(
        sequences=torch.cat([input_ids, tokens[:, :used]], dim=1),
        logprobs=logprobs[:, :used],
        lengths=lengths,
        prompt_length=prompt_length,
        forward_tokens=forward_tokens,
        seconds=time.perf_counter() - start,
        stats=stats,
    )
