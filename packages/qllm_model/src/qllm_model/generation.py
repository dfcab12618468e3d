"""Text in, text out: byte prompts through ``qllm_samplers.generate`` with any token sampler."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qllm_samplers.chain import SamplingChain
from qllm_samplers.generate import generate

from .model import QLLM
from .tokenizer import ByteTokenizer


@torch.no_grad()
def generate_text(model: QLLM, prompts: Sequence[str], *, max_new_tokens: int = 200, sampler=None,
                  temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                  seed: int | Sequence[int] | None = 0, stop_at_eos: bool = True) -> list[str]:
    """Continuations (prompt excluded) of each prompt; ``sampler`` overrides the temperature/top-k/top-p chain.

    ``seed``: an int gives row b the seed ``seed + b``; a list gives one seed per prompt.
    """
    tokenizer = ByteTokenizer()
    device = next(model.parameters()).device
    input_ids, mask = tokenizer.batch_encode(prompts, device=device)
    if sampler is None:
        sampler = SamplingChain(temperature=temperature, top_k=top_k, top_p=top_p)  # temperature 0 = greedy
    out = generate(model, input_ids, sampler=sampler, max_new_tokens=max_new_tokens, attention_mask=mask,
                   eos_token_id=tokenizer.eos_token_id if stop_at_eos else None, generator=seed,
                   pad_token_id=tokenizer.pad_token_id)
    return [tokenizer.decode(row[:int(n)]) for row, n in zip(out.new_tokens, out.lengths)]
