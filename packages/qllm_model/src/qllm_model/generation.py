"""Text in, text out: byte prompts through ``qllm_samplers.generate`` with any sampler (token or sequence level)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qllm_samplers.generate import generate
from qllm_samplers.specs import parse_sampler

from .model import QLLM
from .tokenizer import ByteTokenizer


def generation_budget(model: QLLM, prompt_bytes: int, max_new_tokens: int | None,
                      flag: str = "max_new_tokens") -> int:
    """New bytes to generate: ``max_new_tokens``, or (None) whatever the context leaves after the prompt.

    Raises ValueError naming ``flag`` when the prompt plus the budget does not fit the model's context.
    """
    limit = model.config.max_seq_len
    room = limit - prompt_bytes
    if room < 1:
        raise ValueError(f"the longest prompt has {prompt_bytes} bytes, which leaves no room in the model's "
                         f"context of {limit} bytes: shorten it")
    if max_new_tokens is None:
        return room
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"{flag} must be an integer >= 1, got {max_new_tokens!r}")
    if max_new_tokens > room:
        raise ValueError(f"{flag}={max_new_tokens} does not fit: the longest prompt has {prompt_bytes} bytes and "
                         f"the model's context is {limit} bytes; pass {flag} <= {room} (or leave it out to fill "
                         "the context)")
    return max_new_tokens


@torch.no_grad()
def generate_text(model: QLLM, prompts: Sequence[str], *, sampler="temp:0.8", max_new_tokens: int | None = None,
                  seed: int | Sequence[int] | None = 0, stop_at_eos: bool = True,
                  budget_flag: str = "max_new_tokens") -> list[str]:
    """Continuations (prompt excluded) of each prompt.

    ``sampler``: a ``qllm_samplers.specs`` spec string (``"temp:0.8:top_k=40"``, ``"power:alpha=4:steps=2"``)
    or a sampler object (TokenSampler or SequenceSampler). ``max_new_tokens``: None fills the context.
    ``seed``: an int gives row b the seed ``seed + b``; a list gives one seed per prompt.
    """
    tokenizer = ByteTokenizer()
    device = next(model.parameters()).device
    input_ids, mask = tokenizer.batch_encode(prompts, device=device)
    budget = generation_budget(model, input_ids.shape[1], max_new_tokens, budget_flag)
    if isinstance(sampler, str):
        sampler = parse_sampler(sampler).build()
    if isinstance(seed, int):
        seed = [seed + row for row in range(len(prompts))]
    out = generate(model, input_ids, sampler=sampler, max_new_tokens=budget, attention_mask=mask,
                   eos_token_id=tokenizer.eos_token_id if stop_at_eos else None, generator=seed)
    return [tokenizer.decode(row[:int(n)]) for row, n in zip(out.new_tokens, out.lengths)]
