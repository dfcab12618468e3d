"""A KV-cache decode loop that any HF causal LM and the QLLM byte model can use with any token sampler.

One forward pass for the (left-padded) prompts, then one single-token pass per step. Each row stops at its own
EOS; finished rows keep receiving the pad token so the batch stays rectangular, and the loop ends when every row
is done. Alongside the tokens it records each token's log-probability under the *base* model (the raw logits
before any warping), which is what power sampling, likelihood analyses and diversity metrics need.

The sampler contract: ``generate(model, ids, sampler=...)`` takes a ``TokenSampler`` (one token per step) or a
``SequenceSampler`` (whole continuations: ``PowerSampler``, ``PowerSMC``) and returns one ``GenerateOutput`` for
both, so callers never branch on the kind of sampler.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from .lm import check_decode_inputs, check_logits, forward_step, length_mask
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
    """Chooses one token per row from the raw next-token logits; ``generate`` runs the decode loop around it.

    Optional hooks, called by ``generate`` when the sampler defines them (they are not required, so they are not
    part of the structural check):

    - ``begin(model, batch_size) -> None``: before the prompt's forward pass (e.g. install an attention probe);
    - ``end() -> None``: after the loop, also when it raised (remove what ``begin`` installed);
    - ``stats() -> dict``: counters reported in ``GenerateOutput.stats``.
    """

    def select(self, scores: torch.Tensor, state: DecodeState, rng: RowRNG) -> torch.Tensor:
        """``scores`` [B, V] float32 raw logits -> LongTensor [B] of chosen tokens (drawn through ``rng``)."""
        ...


@runtime_checkable
class SequenceSampler(Protocol):
    """Samples whole continuations at once (``PowerSampler``: MH; ``PowerSMC``: sequential Monte Carlo)."""

    def generate(self, model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *,
                 attention_mask: torch.Tensor | None = None, eos_token_id: int | Sequence[int] | None = None,
                 generator: GeneratorLike = None) -> GenerateOutput:
        """One continuation per row of the left-padded ``input_ids``, as a ``GenerateOutput``."""
        ...


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
    """The result of every sampler, token-wise (``generate``) or sequence-level (``SequenceSampler.generate``)."""

    sequences: torch.Tensor  # [B, P + N]: prompts then new tokens, pad after a row's end
    attention_mask: torch.Tensor  # [B, P + N]: the prompt's mask, then 1 on each row's new tokens (EOS included)
    logprobs: torch.Tensor  # [B, N]: log p(token) under the base model; 0 after a row's end
    lengths: torch.Tensor  # [B]: new tokens per row, EOS included
    prompt_length: int
    forward_tokens: torch.Tensor  # LongTensor [B]: token positions each row ran through the model (prompt included)
    model_calls: int  # sequential model calls (forward passes of the whole batch)
    seconds: float
    stats: dict = field(default_factory=dict)  # sampler-specific: per-row tensors [B] or plain values

    @property
    def new_tokens(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length:]

    @property
    def log_p(self) -> torch.Tensor:
        """[B] float64: log p(continuation) under the base model (sum of ``logprobs``)."""
        return self.logprobs.double().sum(dim=1)


def _as_token_sampler(sampler) -> TokenSampler:
    if isinstance(sampler, TokenSampler):
        return sampler
    if callable(sampler) or isinstance(sampler, Sequence):
        return WarperSampler(sampler)
    raise ValueError("sampler must be a TokenSampler (select(scores, state, rng)), a SequenceSampler "
                     f"(generate(model, input_ids, max_new_tokens, ...)) or a warper callable, got {type(sampler)}")


def eos_tensor(eos_token_id: int | Sequence[int] | None, device: torch.device) -> torch.Tensor | None:
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, dtype=torch.long, device=device) if ids else None


def _repad(out: GenerateOutput, pad_token_id: int) -> GenerateOutput:
    """Put ``pad_token_id`` after each row's end (a sequence sampler pads with its own choice)."""
    new = out.new_tokens
    after_end = ~length_mask(out.lengths.to(new.device), new.shape[1])  # lengths may live elsewhere
    out.sequences = torch.cat([out.sequences[:, :out.prompt_length], new.masked_fill(after_end, pad_token_id)], 1)
    return out


@torch.no_grad()
def generate(model: torch.nn.Module, input_ids: torch.Tensor, *, sampler, max_new_tokens: int,
             attention_mask: torch.Tensor | None = None, eos_token_id: int | Sequence[int] | None = None,
             generator: GeneratorLike = None, pad_token_id: int | None = None) -> GenerateOutput:
    """Decode up to ``max_new_tokens`` per row with ``sampler``: a TokenSampler choosing each token (or a warper
    callable / list of them), or a SequenceSampler producing whole continuations (PowerSampler, PowerSMC).

    ``eos_token_id=None`` means no row stops early. ``generator`` seeds the per-row random streams (see
    ``RowRNG.from_generator``): per-row seeds make a request's tokens independent of its batch-mates.
    ``pad_token_id`` (default: the first EOS id, else 0) fills each row after its end.
    """
    if not isinstance(sampler, TokenSampler) and isinstance(sampler, SequenceSampler):
        out = sampler.generate(model, input_ids, max_new_tokens, attention_mask=attention_mask,
                               eos_token_id=eos_token_id, generator=generator)
        return out if pad_token_id is None else _repad(out, pad_token_id)
    attention_mask = check_decode_inputs(model, input_ids, attention_mask, max_new_tokens)
    batch, prompt_length = input_ids.shape
    device = input_ids.device
    token_sampler = _as_token_sampler(sampler)
    eos = eos_tensor(eos_token_id, device)
    if pad_token_id is None:
        pad_token_id = int(eos[0]) if eos is not None else 0
    rng = RowRNG.from_generator(generator, batch, device)

    start = time.perf_counter()
    if hasattr(token_sampler, "begin"):
        token_sampler.begin(model, batch)
    try:
        logits, cache = forward_step(model, input_ids, attention_mask, None)
        model_calls = 1
        forward_tokens = attention_mask.sum(dim=1).long()  # real prompt tokens; padding is not this row's work
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
            forward_tokens += (~finished).long()  # a finished row's pad token is batch filler, not its work
            sequence = torch.cat([sequence, chosen[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(chosen[:, None])], dim=1)
            logits, cache = forward_step(model, chosen[:, None], mask, cache)
            model_calls += 1
            scores = logits[:, -1]
    finally:
        if hasattr(token_sampler, "end"):
            token_sampler.end()
    used = int(lengths.max())
    stats = token_sampler.stats() if callable(getattr(token_sampler, "stats", None)) else {}
    new_mask = length_mask(lengths, used).to(attention_mask.dtype)
    return GenerateOutput(
        sequences=torch.cat([input_ids, tokens[:, :used]], dim=1),
        attention_mask=torch.cat([attention_mask, new_mask], dim=1),
        logprobs=logprobs[:, :used],
        lengths=lengths,
        prompt_length=prompt_length,
        forward_tokens=forward_tokens,
        model_calls=model_calls,
        seconds=time.perf_counter() - start,
        stats=stats,
    )
