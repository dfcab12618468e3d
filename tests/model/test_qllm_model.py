"""QLLM model: tokenizer, config errors, PhaseRotator, KV cache, left padding, attention probe, LoRA, generate."""

from __future__ import annotations

import math

import pytest
import torch

from qllm_model.config import QLLMConfig
from qllm_model.lora import LoRALinear, mark_only_lora_trainable
from qllm_model.model import QLLM, PhaseRotator
from qllm_model.tokenizer import ByteTokenizer
from qllm_samplers.generate import generate
from qllm_samplers.lm import context_limit


def tiny_config(**overrides) -> QLLMConfig:
    values = dict(max_seq_len=48, d_model=32, n_layers=2, n_heads=4, n_global_tokens=4, phase_mode="gain")
    values.update(overrides)
    return QLLMConfig(**values)


def tiny_model(seed: int = 0, **overrides) -> QLLM:
    torch.manual_seed(seed)
    model = QLLM(tiny_config(**overrides)).eval()
    # Random non-identity phases, so the rotator is really exercised.
    if model.phase is not None:
        with torch.no_grad():
            model.phase.phase.normal_(0.0, 0.7)
    return model


class ArgmaxSampler:
    def select(self, scores, state, rng):
        return scores.argmax(dim=-1)


# --- tokenizer -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["", "hello", "naïve café", "日本語 テキスト", "emoji 🤖🧪 and \x00 nul", "a\r\nb"])
def test_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text, add_eos=True)) == text


def test_tokenizer_invalid_utf8_and_specials():
    tok = ByteTokenizer()
    assert tok.vocab_size == 257 and tok.eos_token_id == 256
    assert tok.decode([0x66, 0xFF, 0x6F]) == "f\ufffdo"
    assert tok.decode_bytes(tok.encode(b"\xff\xfe raw")) == b"\xff\xfe raw"
    with pytest.raises(ValueError, match="outside the byte vocabulary"):
        tok.decode([300])


def test_batch_encode_left_pads():
    ids, mask = ByteTokenizer().batch_encode(["ab", "wxyz"])
    assert ids.tolist() == [[256, 256, 97, 98], [119, 120, 121, 122]]
    assert mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]


# --- config ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, match", [
    (dict(max_seq_len=0), "max_seq_len"),
    (dict(d_model=30, n_heads=4), "n_heads must be >= 1 and divide d_model"),
    (dict(phase_mode="rotation", d_model=33, n_heads=3), "d_model must be even"),
    (dict(phase_mode="spin"), "phase_mode"),
    (dict(lora_r=-1), "lora_r"),
    (dict(lora_targets=["lm_head"]), "lora_targets"),
])
def test_config_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**overrides)


def test_config_exposes_context_limit_and_vocab():
    model = tiny_model()
    assert context_limit(model) == 48
    assert model.config.max_position_embeddings == 48 and model.config.vocab_size == 257


# --- PhaseRotator ----------------------------------------------------------------------------------------
def test_phase_rotator_gain_is_the_published_formula():
    torch.manual_seed(1)
    rot = PhaseRotator(8, "gain")
    with torch.no_grad():
        rot.phase.normal_()
    x = torch.randn(3, 5, 8)
    phi = torch.tanh(rot.phase) * math.pi
    torch.testing.assert_close(rot(x), x * torch.cos(phi) - x * torch.sin(phi))
    # A per-channel gain: each channel is scaled independently, so norms are not preserved.
    assert not torch.allclose(rot(x).norm(dim=-1), x.norm(dim=-1))


def test_phase_rotator_rotation_is_complex_multiplication():
    torch.manual_seed(2)
    rot = PhaseRotator(8, "rotation")
    with torch.no_grad():
        rot.phase.normal_()
    x = torch.randn(3, 5, 8)
    z = torch.complex(x[..., :4], x[..., 4:]) * torch.exp(1j * torch.tanh(rot.phase) * math.pi)
    torch.testing.assert_close(rot(x), torch.cat([z.real, z.imag], dim=-1))
    torch.testing.assert_close(rot(x).norm(dim=-1), x.norm(dim=-1))


def test_phase_rotator_starts_as_identity_and_coherence_loss():
    x = torch.randn(2, 3, 6)
    for mode in ("gain", "rotation"):
        torch.testing.assert_close(PhaseRotator(6, mode)(x), x)
    rot = PhaseRotator(4, "gain")
    with torch.no_grad():
        rot.phase.copy_(torch.tensor([0.0, 1.0, 3.0, 2.0]))
    expected = (1.0 + 4.0 + 1.0) / 3 + 0.1 * (0 + 1 + 9 + 4) / 4
    assert rot.coherence_loss().item() == pytest.approx(expected)
    assert QLLM(tiny_config(phase_mode="off")).coherence_loss().item() == 0.0


# --- causality, cache, padding ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["off", "gain", "rotation"])
def test_causal_and_memory_tokens_not_in_logits(mode):
    model = tiny_model(phase_mode=mode)
    torch.manual_seed(3)
    x = torch.randint(0, 256, (2, 12))
    y = x.clone()
    y[:, 7:] = torch.randint(0, 256, (2, 5))
    lx, ly = model(x).logits, model(y).logits
    assert lx.shape == (2, 12, 257)
    torch.testing.assert_close(lx[:, :7], ly[:, :7])
    assert not torch.allclose(lx[:, 7:], ly[:, 7:])


@pytest.mark.parametrize("n_global", [0, 4])
def test_kv_cache_matches_full_recompute(n_global):
    model = tiny_model(n_global_tokens=n_global, phase_mode="rotation")
    torch.manual_seed(4)
    x = torch.randint(0, 256, (3, 14))
    full = model(x).logits
    out = model(x[:, :5], use_cache=True)
    cache, pieces = out.past_key_values, [out.logits]
    assert cache.get_seq_length() == 5
    for t in range(5, 14):
        out = model(x[:, t:t + 1], attention_mask=torch.ones(3, t + 1, dtype=torch.long),
                    past_key_values=cache, use_cache=True)
        pieces.append(out.logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-4)
    assert cache.get_seq_length() == 14
    assert cache.keys[0].shape[2] == 14 + n_global  # memory tokens live in the cache ...
    cache.crop(9)  # ... but crop counts real positions only
    assert cache.get_seq_length() == 9 and cache.keys[0].shape[2] == 9 + n_global
    cache.crop(-2)
    assert cache.get_seq_length() == 7
    again = model(x[:, 7:10], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(again, full[:, 7:10], atol=1e-5, rtol=1e-4)


def test_cache_batch_select_and_reorder():
    model = tiny_model()
    torch.manual_seed(5)
    x = torch.randint(0, 256, (3, 8))
    nxt = torch.randint(0, 256, (3, 1))
    cache = model(x, use_cache=True).past_key_values
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    reordered = model(nxt[[2, 0, 1]], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(reordered, model(torch.cat([x, nxt], 1)[[2, 0, 1]]).logits[:, -1:],
                               atol=1e-5, rtol=1e-4)
    cache.batch_select_indices(torch.tensor([1]))  # row 0 of the original batch
    assert cache.keys[0].shape[0] == 1 and cache.get_seq_length() == 9
    torch.testing.assert_close(model(nxt[:1], past_key_values=cache, use_cache=True).logits,
                               model(torch.cat([x[:1], nxt[:1], nxt[:1]], 1)).logits[:, -1:],
                               atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("n_global", [0, 4])
def test_left_padding_matches_rows_run_alone(n_global):
    model = tiny_model(n_global_tokens=n_global)
    tok = ByteTokenizer()
    prompts = ["To be, or not", "Hi", "What light through"]
    ids, mask = tok.batch_encode(prompts)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(ids, attention_mask=mask, position_ids=positions, use_cache=True)
    nxt = torch.tensor([[101], [102], [103]])
    mask2 = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
    step = model(nxt, attention_mask=mask2, position_ids=positions[:, -1:] + 1,
                 past_key_values=out.past_key_values, use_cache=True).logits
    for row, prompt in enumerate(prompts):
        alone = model(torch.tensor([tok.encode(prompt) + [int(nxt[row])]])).logits
        n = len(tok.encode(prompt))
        torch.testing.assert_close(out.logits[row, -n:], alone[0, :n], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(step[row, 0], alone[0, n], atol=1e-5, rtol=1e-4)
    assert torch.isfinite(out.logits).all()


def test_positions_beyond_context_raise():
    model = tiny_model()
    with pytest.raises(ValueError, match="max_seq_len=48"):
        model(torch.zeros(1, 49, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must cover"):
        model(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 5))


def test_greedy_generate_matches_no_cache_recompute():
    model = tiny_model(n_global_tokens=4, phase_mode="rotation")
    tok = ByteTokenizer()
    prompts = ["ROMEO:", "a", "First Citizen"]
    ids, mask = tok.batch_encode(prompts)
    out = generate(model, ids, sampler=ArgmaxSampler(), max_new_tokens=12, attention_mask=mask)
    for row, prompt in enumerate(prompts):
        seq = tok.encode(prompt)
        for _ in range(12):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
        assert out.new_tokens[row].tolist() == seq[len(tok.encode(prompt)):]


# --- attention probe -------------------------------------------------------------------------------------
def test_attention_probe_matches_explicit_softmax():
    model = tiny_model(n_global_tokens=3)
    ids, mask = ByteTokenizer().batch_encode(["abcdef", "xy"])
    captured = []
    attn = model.blocks[1].attn
    attn.c_attn.register_forward_hook(lambda m, i, o: captured.append(o))
    baseline = model(ids, attention_mask=mask).logits
    assert attn.last_query_probs is None
    for a in model.attention_modules():
        a.capture_last_query_probs = True
    captured.clear()
    logits = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(logits, baseline)  # probing does not change the main path
    probs = attn.last_query_probs
    assert probs.shape == (2, 4, 3 + 6)
    # Two calls: the memory tokens (computed once, batch 1), then the real tokens.
    memory_qkv, qkv = captured
    q, k, _ = qkv.split(32, dim=2)
    q = q.view(2, -1, 4, 8).transpose(1, 2)
    k = torch.cat([memory_qkv.expand(2, -1, -1), qkv], dim=1).split(32, dim=2)[1]
    k = k.reshape(2, -1, 4, 8).transpose(1, 2)
    scores = (q[:, :, -1:] @ k.transpose(-2, -1))[:, :, 0] / math.sqrt(8)
    key_ok = torch.cat([torch.ones(2, 3, dtype=torch.bool), mask.bool()], 1)[:, None]
    expected = torch.softmax(scores.masked_fill(~key_ok, float("-inf")), dim=-1)
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-4)
    assert (probs[1, :, 3:7] == 0).all()  # the four padded slots of "xy"
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4))


# --- LoRA ------------------------------------------------------------------------------------------------
def test_lora_linear_scale_zero_init_and_merge():
    torch.manual_seed(6)
    layer = LoRALinear(6, 5, bias=True, r=2, alpha=8.0)
    assert (layer.lora_B == 0).all() and layer.scaling == 4.0
    x = torch.randn(4, 6)
    torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias)
    with torch.no_grad():
        layer.lora_B.normal_()
    expected = x @ layer.weight.T + layer.bias + 4.0 * (x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(layer(x), expected)
    layer.merge()
    layer.merge()  # idempotent
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_lora_model_starts_at_base_function_and_merges_to_plain_model():
    base = tiny_model(seed=7)
    lora = tiny_model(seed=8, lora_r=4, lora_alpha=8.0)
    missing, unexpected = lora.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all("lora_" in k for k in missing)
    x = torch.randint(0, 256, (2, 10))
    torch.testing.assert_close(lora(x).logits, base(x).logits)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(0.0, 0.05)
    tuned = lora(x).logits
    assert not torch.allclose(tuned, base(x).logits)
    lora.merge_lora()
    assert not any(isinstance(m, LoRALinear) for m in lora.modules()) and lora.config.lora_r == 0
    torch.testing.assert_close(lora(x).logits, tuned, atol=1e-5, rtol=1e-4)
    plain = QLLM(lora.config).eval()
    plain.load_state_dict(lora.state_dict())  # strict: a plain QLLM state dict


def test_lora_only_freezes_everything_else():
    model = tiny_model(lora_r=2)
    trainable = mark_only_lora_trainable(model)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.split(".")[-1] in ("lora_A", "lora_B") for n in names)
    assert any("mlp.c_fc.lora_A" in n for n in names)  # the MLP gets adapters, not frozen at random init
    assert trainable == sum(model.get_parameter(n).numel() for n in names)
    with pytest.raises(ValueError, match="no LoRA parameters"):
        mark_only_lora_trainable(tiny_model())


def test_generate_text_greedy_and_seeded_rows_are_batch_invariant():
    from qllm_model.generation import generate_text

    model = tiny_model(seed=12)
    tok = ByteTokenizer()
    greedy = generate_text(model, ["KING:"], max_new_tokens=8, sampler="greedy", stop_at_eos=False)[0]
    seq = tok.encode("KING:")
    for _ in range(8):
        seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert greedy == tok.decode(seq[5:])
    alone = generate_text(model, ["To be"], max_new_tokens=10, sampler="temp:1", seed=[77], stop_at_eos=False)
    batch = generate_text(model, ["Hi", "To be"], max_new_tokens=10, sampler="temp:1", seed=[5, 77],
                          stop_at_eos=False)
    assert batch[1] == alone[0]
    other = generate_text(model, ["To be"], max_new_tokens=10, sampler="temp:1", seed=[78], stop_at_eos=False)
    assert other != alone  # a different seed draws different bytes (a random 257-way model, 10 draws)


def test_generation_budget_fills_the_context_or_names_the_flag():
    from qllm_model.generation import generate_text, generation_budget

    model = tiny_model(seed=12)  # context 48
    assert generation_budget(model, 3, None) == 45 and generation_budget(model, 3, 45) == 45
    generate_text(model, ["abc"], sampler="greedy", stop_at_eos=False)  # fills the context: no error
    with pytest.raises(ValueError, match=r"--max_new_tokens=46 does not fit.*--max_new_tokens <= 45"):
        generate_text(model, ["abc"], max_new_tokens=46, budget_flag="--max_new_tokens")
    with pytest.raises(ValueError, match="leaves no room"):
        generate_text(model, ["x" * 48])


# --- the training path against a transcription of the original ----------------------------------------------
def original_forward(model: QLLM, input_ids: torch.Tensor) -> torch.Tensor:
    """The original qllm2 function with our weights: memory tokens concatenated in front of every row, one
    explicit causal mask over memory + tokens, attention as an explicit softmax (no SDPA, no shared prefill)."""
    import torch.nn.functional as F

    B, T = input_ids.shape
    x = model.tok_emb(input_ids) + model.pos_emb(torch.arange(T)[None])
    if model.phase is not None:
        x = model.phase(x)
    M = model.config.n_global_tokens
    if M:
        x = torch.cat([model.global_tokens[None].expand(B, -1, -1), x], dim=1)
    L = x.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    for block in model.blocks:
        attn = block.attn
        h = block.ln_1(x)
        q, k, v = attn.c_attn(h).split(x.shape[-1], dim=2)
        q, k, v = (t.view(B, L, attn.n_heads, attn.head_dim).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(attn.head_dim)
        weights = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        y = (weights @ v).transpose(1, 2).reshape(B, L, -1)
        x = x + attn.c_proj(y)
        x = x + block.mlp.mlp_proj(F.gelu(block.mlp.c_fc(block.ln_2(x))))
    return model.lm_head(model.ln_f(x[:, M:]))


@pytest.mark.parametrize("n_global, mode", [(4, "gain"), (4, "rotation"), (0, "gain")])
def test_training_path_equals_the_original_function_and_gradients(n_global, mode):
    model = tiny_model(seed=13, n_global_tokens=n_global, phase_mode=mode).train()
    torch.manual_seed(14)
    x = torch.randint(0, 256, (3, 20))
    ours = model(x).logits
    reference = original_forward(model, x)
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-4)
    grads = torch.autograd.grad(ours.square().mean(), list(model.parameters()), allow_unused=True)
    expected = torch.autograd.grad(reference.square().mean(), list(model.parameters()), allow_unused=True)
    for (name, _), g, e in zip(model.named_parameters(), grads, expected):
        assert (g is None) == (e is None), name
        if g is not None:
            torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-3, msg=name)


def test_unpadded_prefill_cache_equals_the_padded_path():
    # The joint (memory + tokens) path fills the cache the way the prefill + explicit-mask path does.
    model = tiny_model(seed=15, n_global_tokens=4)
    torch.manual_seed(16)
    x = torch.randint(0, 256, (2, 9))
    fast = model(x, attention_mask=torch.ones(2, 9, dtype=torch.long), use_cache=True)
    padded = torch.cat([torch.zeros(2, 1, dtype=torch.long), x], 1)
    mask = torch.cat([torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 9, dtype=torch.long)], 1)
    slow = model(padded, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True)
    torch.testing.assert_close(fast.logits, slow.logits[:, 1:], atol=1e-5, rtol=1e-4)
    for layer in range(2):
        keys = slow.past_key_values.keys[layer]
        torch.testing.assert_close(fast.past_key_values.keys[layer],
                                   torch.cat([keys[:, :, :4], keys[:, :, 5:]], 2), atol=1e-5, rtol=1e-4)


# --- LoRA placement: the original's separate q, k, v adapters -------------------------------------------------
def test_lora_separate_qkv_is_three_independent_adapters():
    torch.manual_seed(17)
    fused = LoRALinear(8, 12, bias=False, r=2, alpha=4.0, splits=3)
    with torch.no_grad():
        fused.lora_B.normal_()
    x = torch.randn(5, 8)
    expected = x @ fused.weight.T
    for s in range(3):  # slice s of the output (q, k, v) = its own B_s A_s x
        A = fused.lora_A[2 * s:2 * s + 2]
        B = fused.lora_B[4 * s:4 * s + 4]
        expected[:, 4 * s:4 * s + 4] += 2.0 * (x @ A.T @ B.T)
    torch.testing.assert_close(fused(x), expected)
    fused.merge()
    torch.testing.assert_close(fused(x), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="splits must be >= 1 and divide"):
        LoRALinear(8, 10, r=2, alpha=4.0, splits=3)


def test_lora_qkv_option_places_adapters_like_the_original():
    model = tiny_model(lora_r=4, lora_qkv="separate", lora_targets=["c_attn", "c_proj"])
    attn = model.blocks[0].attn
    assert attn.c_attn.splits == 3 and attn.c_attn.lora_A.shape == (12, 32)  # q, k, v: rank 4 each
    assert attn.c_proj.splits == 1 and not isinstance(model.blocks[0].mlp.c_fc, LoRALinear)
    base = tiny_model()
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected
    x = torch.randint(0, 256, (2, 8))
    torch.testing.assert_close(model(x).logits, base(x).logits)  # adapters start as no-ops
    with pytest.raises(ValueError, match="lora_qkv"):
        tiny_config(lora_qkv="split")
