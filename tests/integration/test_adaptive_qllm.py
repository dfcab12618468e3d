"""The adaptive samplers on QLLM (qllm_model): the attention probe's capture flag and the lookahead's cache."""

from __future__ import annotations

import math

import torch

from qllm_samplers.alpha import AlphaSampler, AlphaSamplerConfig
from qllm_samplers.generate import DecodeState, generate
from qllm_samplers.lm import forward_step
from qllm_samplers.rng import RowRNG
from qllm_samplers.signals import AttentionProbe


def _state(input_ids, model=None, cache=None):
    batch = input_ids.shape[0]
    return DecodeState(model=model, input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                       past_key_values=cache, step=0, finished=torch.zeros(batch, dtype=torch.bool))


def test_lookahead_on_qllm_leaves_its_cache_intact():
    from qllm_model.config import QLLMConfig
    from qllm_model.model import QLLM

    torch.manual_seed(0)
    model = QLLM(QLLMConfig(d_model=32, n_layers=2, n_heads=4, max_seq_len=64, n_global_tokens=4)).eval()
    sampler = AlphaSampler(AlphaSamplerConfig(cold_point=50.0, hot_point=60.0, lookahead_k=4))
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(1))
    sampler.begin(model, 2)
    try:
        logits, cache = forward_step(model, ids, torch.ones_like(ids))
        keys = [k.clone() for k in cache.keys]
        length = cache.get_seq_length()
        sampler.select(logits[:, -1], _state(ids, model=model, cache=cache), RowRNG.from_generator([1, 2], 2))
    finally:
        sampler.end()
    assert cache.get_seq_length() == length and all(torch.equal(a, b) for a, b in zip(keys, cache.keys))
    assert sampler.stats()["lookahead_forward_tokens"] == 8
    out = generate(model, ids, sampler=AlphaSampler(), max_new_tokens=8, generator=[3, 4])
    assert out.stats["tokens"] == 16 and out.stats["lookahead_forward_tokens"] % 3 == 0


def _peaky_qllm():
    from qllm_model.config import QLLMConfig
    from qllm_model.model import QLLM

    torch.manual_seed(0)
    model = QLLM(QLLMConfig(d_model=32, n_layers=2, n_heads=4, max_seq_len=64, n_global_tokens=4)).eval()
    with torch.no_grad():  # sharpen the attention: a fresh init is nearly uniform
        for attention in model.attention_modules():
            attention.c_attn.weight.mul_(25)
    return model


def test_probe_reads_qllm_through_its_capture_flag():
    model = _peaky_qllm()
    prompt = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(7))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), prompt], dim=1)
    mask = torch.ones_like(padded)
    mask[:, :3] = 0
    last = model.attention_modules()[-1]
    probe = AttentionProbe().attach(model)
    try:
        assert last.capture_last_query_probs and not model.attention_modules()[0].capture_last_query_probs
        forward_step(model, prompt, torch.ones_like(prompt))
        alone = probe.read(1).clone()
        forward_step(model, padded, mask)
        with_padding = probe.read(1).clone()
        probs = last.last_query_probs.double()
    finally:
        probe.detach()
    assert not last.capture_last_query_probs
    # By hand: the 4 memory keys and the 6 real tokens are the context; the 3 padded slots are not.
    bits = -(probs * torch.log2(probs.clamp_min(1e-300))).sum(-1).mean(-1)
    torch.testing.assert_close(with_padding, (bits / math.log2(4 + 6)).float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(with_padding, alone, atol=1e-5, rtol=1e-5)
    assert 0.02 < float(alone) < 0.98
