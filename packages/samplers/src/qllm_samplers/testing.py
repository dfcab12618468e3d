"""Test scaffolding for samplers (needs the ``hf`` extra: transformers): tiny random HF models built from a
config (no hub), and exact laws on LMs small enough to enumerate (every whole continuation and its per-token
log-probabilities).

Used to check samplers against their exact targets (power sampling's p^alpha, token-wise temperature) in the
test suite and in ``scripts/power_analysis.py``; useful to anyone testing a sampler of their own.
"""

from __future__ import annotations

import itertools
import math

import torch

EOS, VOCAB, PROMPT = 2, 5, [1, 3]


def tiny_gpt2(vocab_size: int = 97, seed: int = 0, *, n_positions: int = 128, bos_token_id: int = 1,
              eos_token_id: int = 2, pad_token_id: int = 0):
    """A 2-layer random GPT-2 (n_embd 32, 4 heads) in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=32, n_layer=2, n_head=4,
                        bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    return GPT2LMHeadModel(config).eval()


def tiny_llama(vocab_size: int = 101, seed: int = 0, *, max_position_embeddings: int = 128, hidden_size: int = 32,
               num_hidden_layers: int = 2, initializer_range: float = 0.02):
    """A random Llama (4 heads, 2 KV heads, MLP 2x hidden; bos 1, eos 2, pad 0) in eval mode.

    The defaults are test-sized; benchmarks use e.g. ``vocab_size=512, hidden_size=64, num_hidden_layers=4``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_position_embeddings, initializer_range=initializer_range,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def tiny_bpe_tokenizer(texts: list[str], vocab_size: int = 300, *, padding_side: str = "right"):
    """A byte-level BPE tokenizer trained offline in about a second on ``texts`` ("<|endoftext|>" is EOS/BOS/pad)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>")
    tokenizer.padding_side = padding_side
    return tokenizer


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


def exact_laws(model, alpha: float, max_new: int, eos: int | None, prompt: list[int] = PROMPT):
    """Everything the exactness checks need on an enumerable LM: ``(continuations, lp, lq, log_p, power,
    tokenwise)`` with per-token log p and log q (temperature 1/alpha) lists, log p(x) [C], the exact target
    p^alpha [C] and the law of token-wise temperature 1/alpha [C] (float64)."""
    conts = all_continuations(max_new, eos, vocab_size=model.config.vocab_size)
    lp = continuation_logprobs(model, conts, prompt=prompt)
    lq = continuation_logprobs(model, conts, 1 / alpha, prompt=prompt)
    log_p = torch.tensor([sum(r) for r in lp], dtype=torch.float64)
    tokenwise = torch.tensor([sum(r) for r in lq], dtype=torch.float64).exp()
    return conts, lp, lq, log_p, torch.softmax(alpha * log_p, dim=0), tokenwise / tokenwise.sum()


def _sum_of_draws(values: torch.Tensor, probs: torch.Tensor, draws: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Support and probabilities of the sum of ``draws`` iid picks from (values, probs), unmerged."""
    total, mass = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    for _ in range(draws):
        total = (total[:, None] + values[None, :]).reshape(-1)
        mass = (mass[:, None] * probs[None, :]).reshape(-1)
    return total, mass


def mh_kernel(continuations, lp, lq, alpha: float, variant: str = "ours", proposals: int = 1) -> torch.Tensor:
    """The exact transition matrix of one MH move of ``PowerSampler`` over whole continuations.

    A uniform cut of the current state x (length n), then ``proposals`` = K suffixes drawn from q given the prefix.
    K = 1: accept y with min(1, [p(y)^a q(x)] / [p(x)^a q(y)] * n / n'). K > 1 (multiple-try, independent
    proposals): select y_J with probability w(y_J) / W, w = p^a / q, W the sum over the K proposals, and accept with
    min(1, n / n' * W / (W - w(y_J) + w(x))) (docs/power.md derives both). The K-1 other proposals enter through
    the distribution of their weight sum, enumerated exactly (cost grows as |suffixes|^(K+1): keep K small).

    ``variant`` (K = 1 only): "ours" (PowerSampler), "no_length_term" (whole suffixes, no n / n'), or
    "official_slice" (the official code: the current suffix sliced to the proposal's length, no length term).
    """
    if variant != "ours" and proposals != 1:
        raise ValueError(f"variant {variant!r} is defined for proposals=1 only")
    size = len(continuations)
    kernel = torch.zeros(size, size, dtype=torch.float64)
    for a, x in enumerate(continuations):
        n = len(x)
        for cut in range(n):
            group = [b for b, y in enumerate(continuations) if len(y) > cut and y[:cut] == x[:cut]]
            log_q = torch.tensor([sum(lq[b][cut:]) for b in group], dtype=torch.float64)
            if variant == "official_slice":
                current = [(alpha * sum(lp[a][cut:len(continuations[b])]) - sum(lq[a][cut:len(continuations[b])]))
                           for b in group]
            else:
                current = [alpha * sum(lp[a][cut:]) - sum(lq[a][cut:])] * len(group)
            log_w = torch.tensor([alpha * sum(lp[b][cut:]) for b in group], dtype=torch.float64) - log_q
            log_len = torch.tensor([math.log(n) - math.log(len(continuations[b])) if variant == "ours" else 0.0
                                    for b in group], dtype=torch.float64)
            log_wx = torch.tensor(current, dtype=torch.float64)
            if proposals == 1:
                move = log_q.exp() * torch.clamp(torch.exp(log_w - log_wx + log_len), max=1.0)
            else:
                # the K-1 other proposals' weight sum T (its support and probabilities, [M])
                others, mass = _sum_of_draws(log_w.exp(), log_q.exp(), proposals - 1)
                w, wx = log_w.exp()[:, None], log_wx.exp()[:, None]
                select = w / (w + others[None, :])
                accept = torch.clamp(log_len.exp()[:, None] * (w + others[None, :]) / (others[None, :] + wx), max=1.0)
                move = proposals * log_q.exp() * (select * accept * mass[None, :]).sum(1)
            for b, value in zip(group, move.tolist()):
                if b != a:
                    kernel[a, b] += value / n
        kernel[a, a] = 1.0 - kernel[a].sum()
    return kernel


def continuation_counts(out, continuations) -> torch.Tensor:
    """How often each enumerated continuation occurs among the rows of a ``GenerateOutput`` [C] float64."""
    index = {c: i for i, c in enumerate(continuations)}
    counts = torch.zeros(len(continuations), dtype=torch.float64)
    for row in range(out.sequences.shape[0]):
        counts[index[tuple(out.new_tokens[row, :int(out.lengths[row])].tolist())]] += 1
    return counts


@torch.no_grad()
def rescored_log_prob(model, out, temperature: float = 1.0) -> torch.Tensor:
    """[B] log p (or log q at a temperature) of each row's continuation in ``out``, by one teacher-forced pass."""
    from .lm import forward_step, length_mask

    logits, _ = forward_step(model, out.sequences, out.attention_mask)
    logprobs = torch.log_softmax(logits.double() / temperature, dim=-1)[:, out.prompt_length - 1:-1]
    new = out.new_tokens
    picked = logprobs.gather(2, new[:, :, None]).squeeze(2)
    valid = length_mask(out.lengths, new.shape[1])
    return (picked * valid).sum(1)
