"""EntropixSampler: each quadrant triggers its action, batched rows behave like rows alone."""

from __future__ import annotations

import math

import pytest
import torch

from qllm_samplers import hf_compat
from qllm_samplers.entropix import EntropixConfig, EntropixSampler, Quadrant, quadrants
from qllm_samplers.generate import DecodeState, generate
from qllm_samplers.rng import RowRNG
from qllm_samplers.signals import AttentionMetrics, token_signals

VOCAB = 1024


def _from_probs(probs: torch.Tensor) -> torch.Tensor:
    return torch.where(probs > 0, probs.log(), torch.tensor(float("-inf")))


def _quadrant_logits() -> torch.Tensor:
    """One row per quadrant, in Quadrant order (thresholds of the default config, in bits)."""
    rows = torch.zeros(5, VOCAB)
    rows[0, 3] = 1.0  # certain: H = 0, V = 0 -> ARGMAX
    rows[1, :64] = 1 / 64  # uniform over 64: H = 6 > 5, V = 0 -> CLARIFY
    rows[2, 0], rows[2, 1:1001] = 0.9, 0.1 / 1000  # a strong token and a wide tail: H ~ 1.5, V ~ 15.5 -> EXPLORE
    rows[3, 5], rows[3, 10:1010] = 0.5, 0.5 / 1000  # H ~ 6.0, V ~ 24.9 -> RESAMPLE
    geometric = 0.6 ** torch.arange(16.0)
    rows[4, 20:36] = geometric / geometric.sum()  # H ~ 2.9, V ~ 2.6 -> ADAPTIVE
    return _from_probs(rows)


def _state(input_ids, finished=None):
    return DecodeState(model=None, input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                       past_key_values=None, step=0,
                       finished=torch.zeros(input_ids.shape[0], dtype=torch.bool) if finished is None else finished)


def test_constructed_rows_land_in_their_quadrants():
    signals = token_signals(_quadrant_logits())
    assert signals.entropy[2] < 5 and signals.varentropy[2] > 5
    assert signals.entropy[3] > 3 and signals.varentropy[3] > 5
    codes = quadrants(signals.entropy, signals.varentropy, EntropixConfig())
    assert codes.tolist() == [Quadrant.ARGMAX, Quadrant.CLARIFY, Quadrant.EXPLORE, Quadrant.RESAMPLE,
                              Quadrant.ADAPTIVE]


def test_quadrant_parameters():
    config = EntropixConfig(use_attention=False)
    params = EntropixSampler(config).parameters(_quadrant_logits(), torch.zeros(5))
    t = config.temperature
    assert params["temperature"][1].item() == pytest.approx(min(1.5, t * 1.3))
    assert params["temperature"][2].item() == pytest.approx(t * 1.2)
    assert params["top_k"][2].item() == 40  # explore: entropix's int(27 * (1 + 0.5 * (1 - 0))) = 40
    assert params["temperature"][3].item() == pytest.approx(2.0)  # resample: at least 2.0
    signals = token_signals(_quadrant_logits()[4:])
    uncertainty = float(signals.entropy_normalised + signals.varentropy_normalised)
    assert params["temperature"][4].item() == pytest.approx(t * (1 + 0.3 * uncertainty))
    # Attention entropy raises the explore temperature and lowers the resample top-p.
    hot = EntropixSampler(config).parameters(_quadrant_logits(), torch.full((5,), 0.5))
    assert hot["temperature"][2].item() == pytest.approx(t * (1.2 + 0.3 * 0.5))
    assert hot["top_p"][3].item() == pytest.approx(0.9 - 0.2 * 0.5)


def _draw_many(row: int, seeds: range, config: EntropixConfig, last_token: int = 0) -> list[int]:
    sampler = EntropixSampler(config)
    logits = _quadrant_logits()[row : row + 1].expand(len(seeds), -1)
    ids = torch.full((len(seeds), 2), last_token)
    return sampler.select(logits, _state(ids), RowRNG.from_generator(list(seeds), len(seeds))).tolist()


def test_argmax_quadrant_is_greedy():
    assert set(_draw_many(0, range(50), EntropixConfig(use_attention=False))) == {3}


def test_resample_quadrant_never_returns_the_argmax():
    tokens = _draw_many(3, range(300), EntropixConfig(use_attention=False))
    assert 5 not in tokens and len(set(tokens)) > 10
    # The same row in the ADAPTIVE quadrant (thresholds moved) draws its argmax often: the exclusion is real.
    adaptive = EntropixConfig(use_attention=False, medium_entropy=7.0, high_entropy=8.0, high_varentropy=30.0)
    assert _draw_many(3, range(300), adaptive).count(5) > 30


def test_clarifying_token_is_inserted_once():
    config = EntropixConfig(use_attention=False, clarifying_token_id=700)
    assert set(_draw_many(1, range(20), config, last_token=3)) == {700}
    after = _draw_many(1, range(200), config, last_token=700)  # just asked: sample hotter instead
    assert 700 not in after and set(after) <= set(range(64)) and len(set(after)) > 20
    # Without a configured token the quadrant only samples.
    assert 700 not in _draw_many(1, range(50), EntropixConfig(use_attention=False), last_token=3)


def test_adaptive_quadrant_keeps_the_most_likely_of_its_draws():
    single = _draw_many(4, range(400), EntropixConfig(use_attention=False, adaptive_samples=1))
    best_of_five = _draw_many(4, range(400), EntropixConfig(use_attention=False, adaptive_samples=5))
    # The mode (token 20, p = 0.4 before warping) wins far more often when the best of 5 draws is kept.
    assert best_of_five.count(20) > single.count(20) + 80


def test_batch_rows_match_rows_alone():
    config = EntropixConfig(use_attention=False, clarifying_token_id=700)
    logits = _quadrant_logits()
    ids = torch.tensor([[1, 2]] * 5)
    seeds = [21, 22, 23, 24, 25]
    rng = RowRNG.from_generator(seeds, 5)
    sampler = EntropixSampler(config)
    together = torch.stack([sampler.select(logits, _state(ids), rng) for _ in range(12)], dim=1)
    for row in range(5):
        alone_rng = RowRNG.from_generator([seeds[row]], 1)
        alone = EntropixSampler(config)
        drawn = torch.stack([alone.select(logits[row : row + 1], _state(ids[row : row + 1]), alone_rng)
                             for _ in range(12)], dim=1)
        assert torch.equal(drawn[0], together[row])
    counts = sampler.stats()["quadrant_counts"]
    assert all(counts[q.name] == 12 for q in Quadrant)


@pytest.mark.parametrize("field, value, match", [
    ("temperature", 0.0, "temperature must be > 0"),
    ("top_p", 0.0, r"top_p must be in \(0, 1\]"),
    ("low_entropy", 4.0, "low_entropy <= medium_entropy"),
    ("high_varentropy", 0.01, "low_varentropy <= high_varentropy"),
    ("clarifying_token_id", -1, "clarifying_token_id must be None or an int >= 0"),
    ("adaptive_samples", 0, "adaptive_samples must be an int >= 1"),
    ("explore_top_k_scale", float("inf"), "must be finite"),
])
def test_config_rejects_bad_values(field, value, match):
    with pytest.raises(ValueError, match=match):
        EntropixConfig(**{field: value})


def test_non_finite_logits_raise():
    sampler = EntropixSampler(EntropixConfig(use_attention=False))
    with pytest.raises(ValueError, match="NaN"):
        sampler.select(torch.tensor([[0.0, float("nan")]]), _state(torch.tensor([[1]])), RowRNG.from_generator([0], 1))
    with pytest.raises(ValueError, match="begin"):
        EntropixSampler().select(torch.zeros(1, 4), _state(torch.tensor([[1]])), RowRNG.from_generator([0], 1))


def test_generate_with_attention_signal(tiny_hf_model):
    implementation = hf_compat.attention_implementation(tiny_hf_model)
    sampler = EntropixSampler(EntropixConfig(clarifying_token_id=7))
    ids = torch.randint(3, 90, (2, 4), generator=torch.Generator().manual_seed(3))
    out = generate(tiny_hf_model, ids, sampler=sampler, max_new_tokens=5, generator=[4, 5])
    assert hf_compat.attention_implementation(tiny_hf_model) == implementation
    assert out.stats["tokens"] == 10 and sum(out.stats["quadrant_counts"].values()) == 10
    # A random tiny model is nearly uniform over ~100 tokens: entropy ~6.6 bits, varentropy ~0 -> CLARIFY,
    # so the clarifying token follows every token that is not already the clarifying token.
    assert out.stats["quadrant_counts"]["CLARIFY"] == 10
    tokens = out.sequences[:, ids.shape[1] - 1 :]
    follows_other = tokens[:, :-1] != 7
    assert follows_other.any() and (tokens[:, 1:][follows_other] == 7).all()
    assert (tokens[:, 1:][~follows_other] != 7).any()  # after asking, it samples instead of asking again


def _entropix_reference(ent, vent, attn_ent, attn_vent, agreement, interaction, quadrant):
    """entropix's own formulas (entropix/sampler.py, Oct 2024, SamplerConfig defaults), one row, Python floats."""
    temp, top_p, top_k, min_p = 0.666, 0.90, 27, 0.03
    if quadrant == Quadrant.CLARIFY:
        return min(1.5, temp * (1.3 + 0.2 * attn_ent)), top_k, top_p, min_p
    if quadrant == Quadrant.EXPLORE:
        return (min(1.5, temp * (1.2 + 0.3 * interaction)), max(5, int(top_k * (1 + 0.5 * (1 - agreement)))),
                top_p, min_p)
    if quadrant == Quadrant.RESAMPLE:
        return max(2.0, temp * (2.0 + 0.5 * attn_vent)), top_k, max(0.5, top_p - 0.2 * attn_ent), min_p
    logits_uncertainty, attn_uncertainty = ent + vent, attn_ent + attn_vent
    return (temp * (1 + 0.3 * logits_uncertainty + 0.2 * attn_uncertainty - 0.2 * agreement),
            int(min(max(round(top_k * (1 + 0.3 * interaction - 0.2 * agreement)), 1), 100)),
            min(max(top_p * (1 + 0.1 * attn_vent), 0.1), 1.0),
            min(max(min_p * (1 - 0.5 * logits_uncertainty), 0.01), 0.5))


def test_faithful_parameters_are_entropix_formulas():
    config = EntropixConfig(mode="faithful")
    logits = _quadrant_logits()
    attention = AttentionMetrics(entropy=torch.tensor([0.5, 1.2, 2.0, 3.1, 0.7]),
                                 varentropy=torch.tensor([0.1, 0.3, 0.05, 0.4, 0.2]),
                                 agreement=torch.tensor([0.02, 0.1, 0.3, 0.05, 0.15]),
                                 interaction_strength=torch.tensor([1.0, 2.0, 0.8, 1.5, 0.6]))
    params = EntropixSampler(config).parameters(logits, attention)
    signals = token_signals(logits)
    for row in range(1, 5):
        quadrant = Quadrant(int(params["quadrant"][row]))
        assert quadrant == row
        expected = _entropix_reference(float(signals.entropy[row]), float(signals.varentropy[row]),
                                       float(attention.entropy[row]), float(attention.varentropy[row]),
                                       float(attention.agreement[row]), float(attention.interaction_strength[row]),
                                       quadrant)
        got = (params["temperature"][row].item(), int(params["top_k"][row]), params["top_p"][row].item(),
               params["min_p"][row].item())
        assert got[1] == expected[1], quadrant
        for ours, theirs in zip((got[0], got[2], got[3]), (expected[0], expected[2], expected[3])):
            assert ours == pytest.approx(theirs, rel=1e-5), quadrant


def test_faithful_adaptive_uses_raw_bits_and_normalised_does_not():
    """The issue's example: H = 2, V = 3 bits on a 49,152-token vocabulary, no attention signal."""
    faithful = EntropixConfig(mode="faithful", use_attention=False)
    zeros = torch.zeros(1)
    none = AttentionMetrics(zeros, zeros, zeros, None)
    # a row with H ~ 2 bits, V ~ 3 bits^2 is ADAPTIVE under the default thresholds
    logits = torch.full((1, 49152), -math.inf)
    logits[0, :6] = torch.tensor([0.0, -0.3, -0.9, -1.3, -2.4, -4.6])
    signals = token_signals(logits)
    ent, vent = float(signals.entropy), float(signals.varentropy)
    params = EntropixSampler(faithful).parameters(logits, none)
    assert int(params["quadrant"]) == Quadrant.ADAPTIVE
    assert params["temperature"].item() == pytest.approx(0.666 * (1 + 0.3 * (ent + vent)), rel=1e-5)
    assert params["min_p"].item() == pytest.approx(max(0.01, 0.03 * (1 - 0.5 * (ent + vent))), rel=1e-5)
    ours = EntropixSampler(EntropixConfig(use_attention=False)).parameters(logits, zeros)
    scale = math.log2(49152)
    assert ours["temperature"].item() == pytest.approx(0.666 * (1 + 0.3 * (ent / scale + vent / scale**2)), rel=1e-5)


def test_argmax_exclusion_is_off_in_faithful_mode_and_an_option():
    faithful = _draw_many(3, range(300), EntropixConfig(mode="faithful", use_attention=False))
    assert faithful.count(5) >= 3  # the argmax is drawn (about 3% of draws at temperature 2)
    excluded = _draw_many(3, range(300), EntropixConfig(mode="faithful", use_attention=False,
                                                        resample_excludes_argmax=True))
    assert 5 not in excluded
    kept = _draw_many(3, range(300), EntropixConfig(use_attention=False, resample_excludes_argmax=False))
    assert kept.count(5) >= 3


def test_faithful_mode_reads_entropix_attention_metrics(tiny_llama):
    sampler = EntropixSampler(EntropixConfig(mode="faithful"))
    ids = torch.randint(3, 90, (2, 5), generator=torch.Generator().manual_seed(3))
    out = generate(tiny_llama, ids, sampler=sampler, max_new_tokens=3, generator=[1, 2])
    assert out.stats["tokens"] == 6
    metrics = sampler.probe.read_metrics(2) if sampler.probe.attached else None
    assert metrics is None  # detached after generate()
    with pytest.raises(ValueError, match="mode must be one of"):
        EntropixConfig(mode="exact")


def test_input_ids_batch_mismatch_raises():
    sampler = EntropixSampler(EntropixConfig(use_attention=False, clarifying_token_id=7))
    with pytest.raises(ValueError, match=r"input_ids has 1 rows but scores has 5"):
        sampler.select(_quadrant_logits(), _state(torch.tensor([[1, 2]])), RowRNG(torch.arange(5)))
