"""The small surface through which samplers drive a causal LM with a KV cache.

Any HF causal LM and the QLLM byte model both satisfy it: ``model(input_ids=..., attention_mask=...,
position_ids=..., past_key_values=..., use_cache=True)`` returns an object with ``.logits`` [B, T, V] and
``.past_key_values``, a cache with ``get_seq_length()``, ``crop(n)``, ``batch_select_indices(idx)`` and
``reorder_cache(idx)`` (HF's ``DynamicCache`` names). Positions come from the attention mask so that
left-padded rows count positions from their first real token, as HF ``generate`` does.
"""

from __future__ import annotations

import torch


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids [B, T] for a left-padded mask: 0 at each row's first real token, padding clamped to 0."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def length_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """[B, width] bool, True on each row's first ``lengths[b]`` positions (the real tokens of a continuation)."""
    return torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]


def context_limit(model: torch.nn.Module) -> int | None:
    """The model's maximum context length, if its config says."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_len"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_logits(logits: torch.Tensor, where: str = "logits") -> None:
    """Raise ValueError on NaN, on +inf, or on a row with no finite value (nothing could be sampled from it)."""
    if torch.isnan(logits).any():
        raise ValueError(f"{where}: NaN in the model's logits; cannot sample")
    if torch.isposinf(logits).any():
        raise ValueError(f"{where}: +inf in the model's logits; probabilities are undefined")
    if not torch.isfinite(logits).any(dim=-1).all():
        raise ValueError(f"{where}: a row has no finite logit (every token is -inf or +inf)")


def check_decode_inputs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                        max_new_tokens: int) -> torch.Tensor:
    """Validate a decode request and return its attention mask (all ones when none was given).

    Raises ValueError for a malformed prompt batch, ``max_new_tokens < 1``, a mask of the wrong shape, or a prompt
    that would run past the model's context limit (never truncated silently).
    """
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be [batch, prompt_len >= 1], got shape {tuple(input_ids.shape)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    prompt_length = input_ids.shape[1]
    limit = context_limit(model)
    if limit is not None and prompt_length + max_new_tokens > limit:
        raise ValueError(
            f"prompt length {prompt_length} + max_new_tokens {max_new_tokens} exceeds the model's context "
            f"limit of {limit} positions; shorten the prompt or lower max_new_tokens (no silent truncation)"
        )
    if attention_mask is None:
        return torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
    return attention_mask


@torch.no_grad()
def forward_step(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 past_key_values=None):
    """Run ``input_ids`` (the new tokens, [B, T_new]) through the model on top of ``past_key_values``.

    ``attention_mask`` covers the cached tokens and the new ones ([B, T_cached + T_new]). Returns the logits
    of the new positions in float32 ([B, T_new, V]) and the updated cache.
    """
    new = input_ids.shape[1]
    position_ids = positions_from_mask(attention_mask)[:, -new:]
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=past_key_values, use_cache=True)
    return out.logits.float(), out.past_key_values
