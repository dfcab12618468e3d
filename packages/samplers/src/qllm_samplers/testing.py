"""Test scaffolding for samplers (needs the ``hf`` extra: transformers): tiny random HF models built from a
config (no hub), and exact laws on LMs small enough to enumerate (every whole continuation and its per-token
log-probabilities).

Used to check samplers against their exact targets (power sampling's p^alpha, token-wise temperature) in the
test suite and in ``scripts/power_analysis.py``; useful to anyone testing a sampler of their own.
"""

from __future__ import annotations

import itertools

import torch

EOS, VOCAB, PROMPT = 2, 5, [1, 3]


def tiny_gpt2(vocab_size: int = 97, seed: int = 0):
    """A 2-layer random GPT-2 (n_embd 32, 128 positions; bos 1, eos 2, pad 0) in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_positions=128, n_embd=32, n_layer=2, n_head=4,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return GPT2LMHeadModel(config).eval()


def tiny_llama(vocab_size: int = 101, seed: int = 0, max_position_embeddings: int = 128):
    """A 2-layer random Llama (hidden 32, 4 heads, 2 KV heads; bos 1, eos 2, pad 0) in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_position_embeddings,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def toy_lm(seed: int = 1, scale: float = 8.0, eos_bias: float = 0.0, vocab_size: int = VOCAB, eos: int = EOS):
    """A tiny random Llama whose output logits are scaled by ``scale`` so that p^alpha and temperature differ."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         bos_token_id=1, eos_token_id=eos, pad_token_id=0, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    head = torch.nn.Linear(16, vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight * scale)
        head.bias.zero_()
        head.bias[eos] = eos_bias
    model.lm_head = head
    return model


def all_continuations(max_new: int, eos: int | None, vocab_size: int = VOCAB) -> list[tuple[int, ...]]:
    """Every whole continuation: EOS-terminated (EOS only at the end) or cut at ``max_new`` tokens."""
    if eos is None:
        return list(itertools.product(range(vocab_size), repeat=max_new))
    others = [t for t in range(vocab_size) if t != eos]
    out = [tuple(pre) + (eos,) for k in range(1, max_new + 1) for pre in itertools.product(others, repeat=k - 1)]
    return out + list(itertools.product(others, repeat=max_new))


@torch.no_grad()
def continuation_logprobs(model, continuations, temperature: float = 1.0,
                          prompt: list[int] = PROMPT) -> list[list[float]]:
    """Per-token log-probabilities of each continuation after ``prompt`` (teacher forcing, one batched call)."""
    width = max(len(c) for c in continuations)
    ids = torch.tensor([prompt + list(c) + [0] * (width - len(c)) for c in continuations])
    logprobs = torch.log_softmax(model(input_ids=ids).logits.double() / temperature, dim=-1)
    start = len(prompt) - 1
    return [[float(logprobs[r, start + j, t]) for j, t in enumerate(c)] for r, c in enumerate(continuations)]
