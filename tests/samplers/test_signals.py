"""Uncertainty signals: token entropy / varentropy and the last-layer attention entropy probe."""

from __future__ import annotations

import math

import pytest
import torch

from qllm_samplers import hf_compat, testing
from qllm_samplers.lm import forward_step
from qllm_samplers.signals import AttentionProbe, attention_entropy, entropy_varentropy, token_signals


def _sharpened(model):
    """A tiny model with its query/key projections scaled up, so its attention is far from uniform (a fresh
    init is nearly uniform)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if any(part in name for part in ("q_proj", "k_proj", "c_attn")):
                parameter.mul_(25)
    return model


def _peaky_llama():
    return _sharpened(testing.tiny_llama())


def _peaky_gpt2():
    return _sharpened(testing.tiny_gpt2())


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def peaky_model(request):
    return _peaky_llama() if request.param == "llama" else _peaky_gpt2()


def _reference_entropy(model, ids, mask):
    """Last-layer, newest-query attention entropy from output_attentions under eager attention, by hand."""
    previous = hf_compat.attention_implementation(model)
    model.set_attn_implementation("eager")
    try:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, output_attentions=True)
    finally:
        model.set_attn_implementation(previous)
    probs = out.attentions[-1][:, :, -1, :].double()  # [B, H, S]
    bits = -(probs * torch.log2(probs.clamp_min(1e-300))).sum(-1)
    return (bits.mean(-1) / torch.log2(mask.sum(-1).double())).float()


def test_entropy_varentropy_hand_computed():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.5, 0.0]]))
    entropy, varentropy = entropy_varentropy(logits)
    # Surprisals 1, 2, 2 bits -> H = 1.5, Var = 0.5 * 0.25 + 0.5 * 0.25; second row: two tokens at 1 bit, one -inf.
    torch.testing.assert_close(entropy, torch.tensor([1.5, 1.0]))
    torch.testing.assert_close(varentropy, torch.tensor([0.25, 0.0]))


def test_token_signals_normalised_by_log2_vocab():
    logits = torch.zeros(2, 64)
    logits[1, 0] = 1000.0  # one certain token
    signals = token_signals(logits)
    torch.testing.assert_close(signals.entropy, torch.tensor([6.0, 0.0]))
    torch.testing.assert_close(signals.entropy_normalised, torch.tensor([1.0, 0.0]))
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25, 0.0]]))
    signals = token_signals(logits)
    torch.testing.assert_close(signals.entropy_normalised, torch.tensor([1.5 / 2]))
    torch.testing.assert_close(signals.varentropy_normalised, torch.tensor([0.25 / 4]))


@pytest.mark.parametrize("bad, match", [
    (torch.tensor([[0.0, float("nan")]]), "NaN"),
    (torch.tensor([[0.0, float("inf")]]), r"\+inf"),
    (torch.zeros(4), r"\[batch, vocab\]"),
    (torch.zeros(1, 1), "vocabulary size"),
])
def test_token_signals_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        token_signals(bad)


def test_attention_entropy_hand_computed_and_masked():
    probs = torch.tensor([[[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]]])  # [1, 2 heads, 4 keys]
    head_bits, normalised = attention_entropy(probs)
    torch.testing.assert_close(head_bits, torch.tensor([[2.0, 0.0]]))
    torch.testing.assert_close(normalised, torch.tensor([(2.0 / 2 + 0.0) / 2]))
    # Two valid keys out of four: uniform over them is 1 bit, normalised by log2(2) = 1.
    probs = torch.tensor([[[0.5, 0.5, 0.0, 0.0]]])
    _, normalised = attention_entropy(probs, torch.tensor([[True, True, False, False]]))
    torch.testing.assert_close(normalised, torch.tensor([1.0]))
    # A single valid key carries no uncertainty.
    _, normalised = attention_entropy(torch.tensor([[[1.0, 0.0]]]), torch.tensor([[True, False]]))
    assert normalised.item() == 0.0
    with pytest.raises(ValueError, match="non-finite"):
        attention_entropy(torch.tensor([[[float("nan"), 1.0]]]))
    with pytest.raises(ValueError, match=r"\[batch, heads, keys\]"):
        attention_entropy(torch.ones(2, 3))


def test_probe_matches_eager_output_attentions(peaky_model):
    torch.manual_seed(1)
    ids = torch.randint(3, 90, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[2, :1] = 0
    expected_prompt = _reference_entropy(peaky_model, ids, mask)
    probe = AttentionProbe().attach(peaky_model)
    try:
        _, cache = forward_step(peaky_model, ids, mask)
        torch.testing.assert_close(probe.read(3), expected_prompt, atol=1e-5, rtol=1e-5)
        new = torch.randint(3, 90, (3, 1))
        mask2 = torch.cat([mask, torch.ones_like(new)], dim=1)
        forward_step(peaky_model, new, mask2, cache)
        got_step = probe.read(3).clone()
    finally:
        probe.detach()
    expected_step = _reference_entropy(peaky_model, torch.cat([ids, new], dim=1), mask2)
    torch.testing.assert_close(got_step, expected_step, atol=1e-5, rtol=1e-5)
    assert expected_step.min() > 0.01 and expected_step.max() < 0.99  # a real, non-degenerate signal


def test_probe_leaves_model_outputs_and_implementation_unchanged(peaky_model):
    ids = torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    before, _ = forward_step(peaky_model, ids, mask)
    implementation = hf_compat.attention_implementation(peaky_model)
    probe = AttentionProbe().attach(peaky_model)
    during, _ = forward_step(peaky_model, ids, mask)
    probe.detach()
    assert hf_compat.attention_implementation(peaky_model) == implementation
    torch.testing.assert_close(during, before, atol=0, rtol=0)  # the same kernel runs every layer


def test_padding_does_not_change_attention_entropy():
    """The same prompt alone and left-padded next to a longer one: masked slots must not enter the entropy."""
    model = _peaky_llama()
    prompt = torch.randint(3, 90, (1, 6), generator=torch.Generator().manual_seed(3))
    longer = torch.randint(3, 90, (1, 11), generator=torch.Generator().manual_seed(4))
    probe = AttentionProbe().attach(model)
    try:
        _, cache = forward_step(model, prompt, torch.ones_like(prompt))
        alone = [probe.read(1).clone()]
        forward_step(model, torch.tensor([[7]]), torch.ones(1, 7, dtype=torch.long), cache)
        alone.append(probe.read(1).clone())
        ids = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), prompt], dim=1), longer])
        mask = torch.ones_like(ids)
        mask[0, :5] = 0
        _, cache = forward_step(model, ids, mask)
        batched = [probe.read(2).clone()]
        forward_step(model, torch.tensor([[7], [8]]), torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1), cache)
        batched.append(probe.read(2).clone())
    finally:
        probe.detach()
    for single, both in zip(alone, batched):
        torch.testing.assert_close(both[0], single[0], atol=1e-5, rtol=1e-5)


def test_unfilled_static_cache_slots_are_masked():
    """A StaticCache holds empty slots; the entropy must equal the DynamicCache one (entropix's drift bug)."""
    from transformers import StaticCache

    model = _peaky_llama()
    ids = torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    probe = AttentionProbe().attach(model)
    try:
        readings = {}
        for name, cache in [("dynamic", None), ("static", StaticCache(config=model.config, max_cache_len=48))]:
            _, cache = forward_step(model, ids, mask, cache)
            prefill = probe.read(2).clone()
            forward_step(model, torch.tensor([[5], [6]]), torch.ones(2, 7, dtype=torch.long), cache)
            readings[name] = (prefill, probe.read(2).clone())
    finally:
        probe.detach()
    for dynamic, static in zip(readings["dynamic"], readings["static"]):
        torch.testing.assert_close(static, dynamic, atol=1e-5, rtol=1e-5)


def test_probe_works_with_eager_models():
    model = _peaky_gpt2()
    model.set_attn_implementation("eager")
    ids = torch.randint(3, 90, (2, 8), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    expected = _reference_entropy(model, ids, mask)
    probe = AttentionProbe().attach(model)
    forward_step(model, ids, mask)
    got = probe.read(2).clone()
    probe.detach()
    assert hf_compat.attention_implementation(model) == "eager"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_unreadable_model_raises_with_class_name():
    class Opaque(torch.nn.Module):
        def forward(self, input_ids, **kwargs):
            return input_ids

    with pytest.raises(ValueError, match="cannot read the attention of Opaque.*attention_weight=0.0"):
        AttentionProbe().attach(Opaque())
    with pytest.raises(ValueError, match="not attached"):
        AttentionProbe().read(1)


def test_probe_reads_rows_of_the_forward_it_saw(tiny_llama):
    probe = AttentionProbe().attach(tiny_llama)
    try:
        forward_step(tiny_llama, torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long))
        with pytest.raises(ValueError, match="different forward pass"):
            probe.read(2)
        with pytest.raises(ValueError, match="already attached"):
            probe.attach(tiny_llama)
    finally:
        probe.detach()
    # The conftest model's attention is nearly uniform: normalised entropy close to 1, as log2(3) predicts.
    assert math.isclose(float(probe.entropy_normalised[0]), 1.0, abs_tol=0.01)
