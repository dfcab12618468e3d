"""AlphaSampler: the published maps, state thresholds, per-row parameters, the COLD-state lookahead."""

from __future__ import annotations

import math

import pytest
import torch

from qllm_samplers import hf_compat
from qllm_samplers.alpha import (
    AlphaSampler,
    AlphaSamplerConfig,
    AlphaState,
    alpha_repetition_penalty,
    alpha_state,
    alpha_temperature,
    alpha_top_k,
    alpha_top_p,
    calibrate_weights,
    fit_weights,
)
from qllm_samplers.generate import DecodeState, generate
from qllm_samplers.lm import forward_step
from qllm_samplers.rng import RowRNG
from qllm_samplers.signals import entropy_varentropy, token_signals
from qllm_samplers.warpers import RepetitionPenalty, Temperature, TopK, TopP


def _state(input_ids, model=None, cache=None, mask=None, finished=None):
    batch = input_ids.shape[0]
    return DecodeState(model=model, input_ids=input_ids,
                       attention_mask=torch.ones_like(input_ids) if mask is None else mask,
                       past_key_values=cache, step=0,
                       finished=torch.zeros(batch, dtype=torch.bool) if finished is None else finished)


def _logits_with_entropy(batch_bits, vocab=256):
    """Rows whose distribution is uniform over 2**bits tokens (entropy exactly ``bits``)."""
    rows = torch.full((len(batch_bits), vocab), float("-inf"))
    for row, bits in enumerate(batch_bits):
        rows[row, : 2**bits] = 0.0
    return rows


@pytest.mark.parametrize("a, temperature, top_k, top_p, penalty", [
    (1.0, 0.7, 105.0, 0.85 + 0.1 * (2 / (1 + math.exp(-0.8)) - 1), 1.15),
    (0.0, 0.1 + 1.2 / (1 + math.exp(1.5)), 10 + 190 * 0.25, 0.85, 1 + 0.3 / (1 + math.exp(2))),
    (2.0, 0.1 + 1.2 / (1 + math.exp(-1.5)), 10 + 190 * 0.75, 0.85 + 0.1 * (2 / (1 + math.exp(-1.6)) - 1),
     1 + 0.3 / (1 + math.exp(-2))),
    (0.3, 0.1 + 1.2 / (1 + math.exp(1.05)), 10 + 190 * (math.atan(-0.7) / math.pi + 0.5),
     0.85 + 0.1 * (2 / (1 + math.exp(-0.24)) - 1), 1 + 0.3 / (1 + math.exp(1.4))),
])
def test_published_maps_at_sample_points(a, temperature, top_k, top_p, penalty):
    assert alpha_temperature(a) == pytest.approx(temperature, abs=1e-12)
    assert alpha_top_k(a) == pytest.approx(top_k, abs=1e-10)
    assert alpha_top_p(a) == pytest.approx(top_p, abs=1e-12)
    assert alpha_repetition_penalty(a) == pytest.approx(penalty, abs=1e-12)
    as_tensor = torch.tensor([a, a], dtype=torch.float64)
    torch.testing.assert_close(alpha_temperature(as_tensor), torch.tensor([temperature] * 2, dtype=torch.float64))
    torch.testing.assert_close(alpha_top_k(as_tensor), torch.tensor([top_k] * 2, dtype=torch.float64))


def test_map_limits_and_monotonicity():
    grid = torch.linspace(-5, 7, 121, dtype=torch.float64)
    for fn, low, high in [(alpha_temperature, 0.1, 1.3), (alpha_top_k, 10, 200), (alpha_repetition_penalty, 1, 1.3)]:
        values = fn(grid)
        assert (values.diff() > 0).all()
        extremes = fn(torch.tensor([-1e4, 1e4], dtype=torch.float64))
        assert extremes.tolist() == pytest.approx([low, high], abs=0.01)
    assert alpha_top_p(50.0) == pytest.approx(0.95, abs=1e-9)
    with pytest.raises(ValueError, match="finite"):
        alpha_temperature(float("nan"))


def test_state_thresholds():
    assert alpha_state(0.5999) is AlphaState.COLD
    assert alpha_state(0.6) is AlphaState.MIXED
    assert alpha_state(1.8) is AlphaState.MIXED
    assert alpha_state(1.8001) is AlphaState.HOT
    codes = alpha_state(torch.tensor([0.0, 0.6, 1.0, 1.8, 1.81]))
    assert codes.tolist() == [0, 1, 1, 1, 2]
    assert alpha_state(1.0, cold_point=1.5, hot_point=2.0) is AlphaState.COLD
    with pytest.raises(ValueError, match="cold_point must be < hot_point"):
        alpha_state(1.0, cold_point=2.0, hot_point=1.0)


@pytest.mark.parametrize("field, value, match", [
    ("base_temperature", 0.0, "base_temperature must be > 0"),
    ("base_top_p", 1.5, r"base_top_p must be in \(0, 1\]"),
    ("base_top_k", 0, "base_top_k must be an int >= 1"),
    ("token_weight", -1.0, "token_weight must be finite and >= 0"),
    ("lookahead_k", 1, "lookahead_k must be an int >= 2"),
    ("history_size", 0, "history_size must be an int >= 1"),
    ("repetition_window", 0, "repetition_window must be an int >= 1"),
    ("hot_point", 0.5, "cold_point must be < hot_point"),
])
def test_config_rejects_bad_values(field, value, match):
    with pytest.raises(ValueError, match=match):
        AlphaSamplerConfig(**{field: value})
    with pytest.raises(ValueError, match="cannot both be 0"):
        AlphaSamplerConfig(token_weight=0.0, attention_weight=0.0)


def test_defaults_are_the_published_ones():
    c = AlphaSamplerConfig()
    assert (c.base_temperature, c.base_top_p, c.base_top_k, c.cold_point, c.hot_point) == (0.4, 0.85, 40, 0.6, 1.8)
    assert c.repetition_window == 128 and c.history_size == 100


def test_per_row_parameters_follow_each_rows_alpha():
    config = AlphaSamplerConfig(token_weight=4.0, attention_weight=0.0, lookahead=False)
    sampler = AlphaSampler(config)
    scores = _logits_with_entropy([0, 4, 8])  # entropy 0, 4 and 8 bits of log2(256) = 8
    ids = torch.tensor([[3, 4], [5, 6], [7, 8]])
    sampler.select(scores, _state(ids), RowRNG.from_generator([1, 2, 3], 3))
    expected_alpha = torch.tensor([0.0, 2.0, 4.0])
    torch.testing.assert_close(sampler.last_alpha, expected_alpha)
    params = sampler.last_parameters
    torch.testing.assert_close(params["temperature"], alpha_temperature(expected_alpha))
    assert params["top_k"].tolist() == [round(alpha_top_k(a)) for a in (0.0, 2.0, 4.0)]
    # The warp applies each row's own parameters: row by row with scalar warpers gives the same scores.
    warped = sampler.warp(scores, ids, params)
    for row in range(3):
        one = scores[row : row + 1]
        one = RepetitionPenalty(float(params["repetition_penalty"][row]), window=128)(ids[row : row + 1], one)
        one = Temperature(float(params["temperature"][row]))(ids[row : row + 1], one)
        one = TopK(int(params["top_k"][row]))(ids[row : row + 1], one)
        one = TopP(float(params["top_p"][row]))(ids[row : row + 1], one)
        torch.testing.assert_close(warped[row : row + 1], one)
    assert sampler.stats()["state_counts"] == {"COLD": 1, "MIXED": 0, "HOT": 2}


def test_batch_rows_match_rows_sampled_alone():
    config = AlphaSamplerConfig(attention_weight=0.0, lookahead=False)
    torch.manual_seed(0)
    scores = torch.randn(4, 300) * torch.tensor([[0.5], [2.0], [4.0], [8.0]])
    ids = torch.randint(0, 300, (4, 20))
    seeds = [11, 12, 13, 14]
    together = []
    rng = RowRNG.from_generator(seeds, 4)
    sampler = AlphaSampler(config)
    for _ in range(30):
        together.append(sampler.select(scores, _state(ids), rng))
    together = torch.stack(together, dim=1)
    for row in range(4):
        rng_row = RowRNG.from_generator([seeds[row]], 1)
        alone = AlphaSampler(config)
        drawn = torch.stack([alone.select(scores[row : row + 1], _state(ids[row : row + 1]), rng_row)
                             for _ in range(30)], dim=1)
        assert torch.equal(drawn[0], together[row])
    assert len(set(together[0].tolist())) > 5  # the flat row really samples


def test_history_is_rolling_and_counts_states():
    sampler = AlphaSampler(AlphaSamplerConfig(attention_weight=0.0, lookahead=False, history_size=5))
    rng = RowRNG.from_generator([0, 1], 2)
    ids = torch.tensor([[1], [2]])
    for bits in range(8):
        finished = torch.tensor([False, bits >= 6])  # row 1 stops recording after 6 tokens
        sampler.select(_logits_with_entropy([bits, 0]), _state(ids, finished=finished), rng)
    history = sampler.history()
    expected = [4.0 * b / 8 for b in range(3, 8)]
    assert history[0] == pytest.approx(expected)
    assert history[1] == pytest.approx([0.0] * 5)
    counts = sampler.state_counts()
    # Row 0: alphas 1.5, 2.0, 2.5, 3.0, 3.5 -> one MIXED, four HOT; row 1: all COLD.
    assert [int(counts[s][0]) for s in ("COLD", "MIXED", "HOT")] == [0, 1, 4]
    assert [int(counts[s][1]) for s in ("COLD", "MIXED", "HOT")] == [5, 0, 0]
    assert sampler.stats()["tokens"] == 8 + 6


def test_bad_scores_raise():
    sampler = AlphaSampler(AlphaSamplerConfig(attention_weight=0.0))
    rng = RowRNG.from_generator([0], 1)
    with pytest.raises(ValueError, match="NaN"):
        sampler.select(torch.tensor([[0.0, float("nan")]]), _state(torch.tensor([[1]])), rng)
    with pytest.raises(ValueError, match="begin"):
        AlphaSampler().select(torch.zeros(1, 5), _state(torch.tensor([[1]])), rng)


def _snapshot(cache):
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers], cache.get_seq_length()


def test_lookahead_picks_min_score_candidate_and_leaves_cache_intact(tiny_llama):
    # A cold point above any alpha forces COLD on every row; three candidates per row.
    config = AlphaSamplerConfig(cold_point=50.0, hot_point=60.0, lookahead_k=3, attention_weight=0.0,
                                entropy_weight=0.8, varentropy_weight=0.2)
    sampler = AlphaSampler(config)
    ids = torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    logits, cache = forward_step(tiny_llama, ids, mask)
    scores = logits[:, -1] * 20  # sharpen: a few plausible tokens, as in a COLD state
    before, length = _snapshot(cache)
    state = _state(ids, model=tiny_llama, cache=cache, mask=mask)
    chosen = sampler.select(scores, state, RowRNG.from_generator([5, 6], 2))
    after, length_after = _snapshot(cache)
    assert length_after == length
    for (k0, v0), (k1, v1) in zip(before, after):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)
    # Brute force: each candidate run from scratch (no cache), scored the same way. The candidates are the top
    # 3 tokens of the temperature-1 distribution (after the penalty), all inside its top-p nucleus here.
    params = sampler.last_parameters
    penalised = RepetitionPenalty(params["repetition_penalty"], window=128)(ids, scores)
    for row in range(2):
        candidates = penalised[row].topk(3).indices
        assert float(torch.softmax(penalised[row], 0).topk(2).values.sum()) < 0.85  # the third is in the nucleus
        scores_row = []
        for token in candidates:
            seq = torch.cat([ids[row : row + 1], token.view(1, 1)], dim=1)
            row_mask = torch.cat([mask[row : row + 1], torch.ones(1, 1, dtype=torch.long)], dim=1)
            next_logits, _ = forward_step(tiny_llama, seq, row_mask)
            entropy, varentropy = entropy_varentropy(next_logits[:, -1])
            scores_row.append(float(0.8 * entropy + 0.2 * varentropy))
        assert int(chosen[row]) == int(candidates[int(torch.tensor(scores_row).argmin())])
    stats = sampler.stats()
    assert stats["lookahead_rows"] == 2 and stats["lookahead_forward_tokens"] == 6


def test_lookahead_skips_rows_with_one_candidate(tiny_llama):
    sampler = AlphaSampler(AlphaSamplerConfig(cold_point=50.0, hot_point=60.0, attention_weight=0.0))
    ids = torch.tensor([[5, 6, 7]])
    logits, cache = forward_step(tiny_llama, ids, torch.ones_like(ids))
    scores = torch.full_like(logits[:, -1], float("-inf"))
    scores[0, 9] = 0.0
    chosen = sampler.select(scores, _state(ids, model=tiny_llama, cache=cache), RowRNG.from_generator([0], 1))
    assert chosen.tolist() == [9] and sampler.stats()["lookahead_forward_tokens"] == 0


def test_generate_end_to_end_restores_model_and_reports(tiny_hf_model):
    implementation = hf_compat.attention_implementation(tiny_hf_model)
    sampler = AlphaSampler(AlphaSamplerConfig(cold_point=1.2, hot_point=1.9))
    ids = torch.randint(3, 90, (3, 5), generator=torch.Generator().manual_seed(1))
    out = generate(tiny_hf_model, ids, sampler=sampler, max_new_tokens=6, generator=[1, 2, 3])
    assert hf_compat.attention_implementation(tiny_hf_model) == implementation
    stats = out.stats
    assert stats["tokens"] == 18 and sum(stats["state_counts"].values()) == 18
    assert stats["lookahead_forward_tokens"] == 3 * stats["lookahead_rows"]
    assert all(len(h) == 6 for h in sampler.history())
    # Rows alone give the same tokens as in the batch (per-row seeds, same-length prompts).
    alone = generate(tiny_hf_model, ids[1:2], sampler=AlphaSampler(AlphaSamplerConfig(cold_point=1.2, hot_point=1.9)),
                     max_new_tokens=6, generator=[2])
    assert torch.equal(alone.sequences[0], out.sequences[1])


def test_alpha_combines_token_and_attention_entropy(tiny_llama):
    sampler = AlphaSampler(AlphaSamplerConfig(token_weight=2.0, attention_weight=3.0))
    ids = torch.tensor([[5, 6, 7, 8]])
    sampler.begin(tiny_llama, 1)
    try:
        logits, _ = forward_step(tiny_llama, ids, torch.ones_like(ids))
        alpha = sampler.alpha(logits[:, -1], 1)
        attention = sampler.probe.read(1)
    finally:
        sampler.end()
    expected = 2.0 * token_signals(logits[:, -1]).entropy_normalised + 3.0 * attention
    torch.testing.assert_close(alpha, expected)
    assert 0.0 < float(attention) <= 1.0


def test_fit_weights_hits_the_state_fractions():
    torch.manual_seed(0)
    token = torch.rand(2000) * 0.5
    attention = 0.3 + 0.4 * torch.rand(2000)
    token_weight, attention_weight, offset = fit_weights(token, attention, cold_fraction=0.2, hot_fraction=0.15)
    assert attention_weight == pytest.approx(0.25 * token_weight)
    alpha = token_weight * token + attention_weight * attention + offset
    assert float((alpha < 0.6).double().mean()) == pytest.approx(0.2, abs=0.002)
    assert float((alpha > 1.8).double().mean()) == pytest.approx(0.15, abs=0.002)
    with pytest.raises(ValueError, match="do not vary"):
        fit_weights(torch.ones(10), torch.ones(10))
    with pytest.raises(ValueError, match="cold_fraction \\+ hot_fraction must be < 1"):
        fit_weights(token, attention, cold_fraction=0.6, hot_fraction=0.5)
    with pytest.raises(ValueError, match="one shape"):
        fit_weights(token, attention[:5])


def test_calibrated_weights_drive_the_sampler(tiny_llama):
    ids = torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(2))
    implementation = hf_compat.attention_implementation(tiny_llama)
    weights = calibrate_weights(tiny_llama, ids, max_new_tokens=12, generator=[0, 1])
    assert hf_compat.attention_implementation(tiny_llama) == implementation
    assert all(math.isfinite(w) for w in weights) and weights[0] > 0
    config = AlphaSamplerConfig(token_weight=weights[0], attention_weight=weights[1], alpha_offset=weights[2],
                                lookahead=False)
    out = generate(tiny_llama, ids, sampler=AlphaSampler(config), max_new_tokens=12, generator=[0, 1])
    # The tiny model's signals barely depend on the sampler, so its own text spreads over all three states.
    assert all(count > 0 for count in out.stats["state_counts"].values())
    with pytest.raises(ValueError, match="alpha_offset must be finite"):
        AlphaSamplerConfig(alpha_offset=float("nan"))


def test_repetition_window_counts_only_real_tokens():
    """A left-padded row's window holds its real tokens only: the pad id is not penalised as 'repeated'."""
    config = AlphaSamplerConfig(attention_weight=0.0, lookahead=False, repetition_window=6)
    sampler = AlphaSampler(config)
    scores = torch.randn(2, 50, generator=torch.Generator().manual_seed(0))
    scores[:, 0] = 5.0  # the pad id is a likely token
    real = torch.tensor([[7, 8, 9]])
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), real], dim=1)
    ids = torch.cat([padded, torch.tensor([[0, 11, 12, 13, 14, 15]])])  # row 1 really contains token 0
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    params = sampler.parameters(sampler.alpha(scores, 2))
    warped = sampler.warp(scores, ids, params, mask)
    alone = sampler.warp(scores[:1], real, {name: value[:1] for name, value in params.items()})
    torch.testing.assert_close(warped[:1], alone)
    unmasked = sampler.warp(scores, ids, params)  # what counting the padding would have done
    assert not torch.equal(unmasked[0], warped[0])
    # row 1's real token 0 is penalised in both; and select() uses the mask from the decode state
    assert torch.equal(warped[1], unmasked[1])
    rng_a, rng_b = RowRNG.from_generator([5, 6], 2), RowRNG.from_generator([5], 1)
    together = sampler.select(scores, _state(ids, mask=mask), rng_a)
    single = AlphaSampler(config).select(scores[:1], _state(real), rng_b)
    assert together[0] == single[0]


@pytest.mark.parametrize("field", ["base_temperature", "base_repetition_penalty", "entropy_weight"])
def test_config_rejects_non_finite_values(field):
    with pytest.raises(ValueError, match=f"AlphaSamplerConfig.{field} must be finite, got inf"):
        AlphaSamplerConfig(**{field: math.inf})


def test_input_ids_batch_mismatch_raises():
    sampler = AlphaSampler(AlphaSamplerConfig(attention_weight=0.0, lookahead=False))
    with pytest.raises(ValueError, match=r"input_ids has 3 rows but scores has 2"):
        sampler.select(torch.randn(2, 50), _state(torch.zeros(3, 4, dtype=torch.long)), RowRNG(torch.arange(2)))
