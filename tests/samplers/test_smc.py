"""PowerSMC: consistency towards the enumerated p^alpha as particles grow, weights, cache re-indexing, bad input."""

from __future__ import annotations

import pytest
import torch

from qllm_samplers.diagnostics.distribution import g_test, total_variation, tv_noise_floor
from qllm_samplers.smc import PowerSMC, systematic_resample
from qllm_samplers.testing import EOS, PROMPT, continuation_counts, exact_laws, rescored_log_prob, toy_lm

ROWS = 2000


def _law(model, alpha, eos, particles, bridge=None, rows=ROWS, seed=0):
    sampler = PowerSMC(alpha=alpha, particles=particles, bridge=bridge)
    out = sampler.generate(model, torch.tensor([PROMPT] * rows), 3, eos_token_id=eos,
                           generator=list(range(seed, seed + rows)))
    return out


@pytest.mark.parametrize("case", ["no_eos", "eos"])
def test_consistent_as_particles_grow(case):
    """TV to the exact p^alpha falls with particles, to the sampling-noise floor at 128 (G-test agrees).

    With finitely many particles the final draw has the law of sampling importance resampling, biased towards
    the proposal: the test asserts the trend and the large-particle limit, not exactness at small sizes.
    """
    model, eos, alpha = (toy_lm(1, 8.0, 0.0), None, 4.0) if case == "no_eos" else (toy_lm(1, 12.0, 0.0), EOS, 2.0)
    conts, _, _, _, target, tokenwise = exact_laws(model, alpha, 3, eos)
    assert float(total_variation(target, tokenwise)) > 0.15  # the laws differ: the test can fail
    floor = tv_noise_floor(ROWS, target)
    tv = {}
    for particles in (1, 2, 128):
        counts = continuation_counts(_law(model, alpha, eos, particles), conts)
        tv[particles] = float(total_variation(counts / ROWS, target))
        if particles == 1:  # one particle is a plain draw from the proposal: token-wise temperature 1/alpha
            assert g_test(counts, tokenwise)[1] > 1e-3
        if particles == 128:
            assert g_test(counts, target)[1] > 1e-3
            assert g_test(counts, tokenwise)[1] < 1e-6
    assert tv[1] > tv[2] > tv[128]
    assert tv[2] > 2 * floor  # two particles are measurably biased ...
    assert tv[128] < 1.5 * floor, (tv, floor)  # ... 128 are at the noise floor


def test_bridge_keeps_the_target():
    """A ramp of the exponent changes the intermediate targets only: the large-particle limit is still p^alpha."""
    model, alpha = toy_lm(1, 12.0, 0.0), 2.0
    conts, _, _, _, target, tokenwise = exact_laws(model, alpha, 3, EOS)
    counts = continuation_counts(_law(model, alpha, EOS, 128, bridge=(0.5, 1.0, 2.0)), conts)
    assert g_test(counts, target)[1] > 1e-3
    assert float(total_variation(counts / ROWS, target)) < 1.5 * tv_noise_floor(ROWS, target)


@pytest.mark.parametrize("bridge", [None, 2, (1.0, 1.5, 2.0)])
def test_weights_are_importance_weights_of_whole_continuations(bridge):
    """Without resampling, each final log weight is alpha*log p(x) - log q(x), ramp or not (it telescopes);
    finished particles stop costing forward passes."""
    model, particles = toy_lm(1, 12.0, 0.0), 6
    sampler = PowerSMC(alpha=2.0, particles=particles, ess_threshold=1e-9, bridge=bridge, return_particles=True)
    out = sampler.generate(model, torch.tensor([PROMPT] * 3), 5, eos_token_id=EOS, generator=[4, 5, 6])
    wset = out.stats["particle_set"]
    torch.testing.assert_close(wset["log_weights"], 2.0 * wset["log_p"] - wset["log_q"], atol=1e-9, rtol=0)
    assert int(out.stats["resamples"].sum()) == 0
    lengths = wset["lengths"]
    assert (lengths < 5).any()  # some particles ended early with EOS ...
    assert out.forward_tokens.tolist() == (len(PROMPT) + (lengths - 1).sum(1)).tolist()  # ... and cost nothing after
    assert out.model_calls == int(lengths.max())
    ends = wset["tokens"][torch.arange(3)[:, None], torch.arange(particles)[None, :], lengths - 1]
    assert ((ends == EOS) | (lengths == 5)).all()


def test_resampling_reindexes_the_cache(tiny_hf_model):
    """Resampling every step (copying and dropping cache rows) keeps every cached entry exact, left padding too."""
    prompts = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10], [0, 11, 12, 13]])
    mask = (prompts != 0).long()
    sampler = PowerSMC(alpha=2.0, particles=4, ess_threshold=1.0, return_particles=True)
    out = sampler.generate(tiny_hf_model, prompts, 10, attention_mask=mask, eos_token_id=EOS, generator=[3, 4, 5])
    assert (out.stats["resamples"] >= 3).all()  # ESS < particles after almost every step: resampled each time
    torch.testing.assert_close(out.stats["log_p"], rescored_log_prob(tiny_hf_model, out), atol=2e-4, rtol=0)
    torch.testing.assert_close(out.stats["log_q"], rescored_log_prob(tiny_hf_model, out, 0.5), atol=2e-4, rtol=0)
    torch.testing.assert_close(out.log_p, out.stats["log_p"], atol=1e-4, rtol=0)
    assert out.stats["ess"].shape[0] == 3 and bool((out.stats["ess"] <= 4 + 1e-9).all())


def test_row_does_not_depend_on_batch_mates(tiny_llama):
    sampler = PowerSMC(alpha=4.0, particles=4)
    alone = sampler.generate(tiny_llama, torch.tensor([[5, 6, 7]]), 8, eos_token_id=EOS, generator=[42])
    prompts = torch.tensor([[0, 0, 9], [5, 6, 7], [0, 3, 4]])
    batch = sampler.generate(tiny_llama, prompts, 8, attention_mask=(prompts != 0).long(), eos_token_id=EOS,
                             generator=[1, 42, 2])
    n = int(alone.lengths[0])
    assert batch.new_tokens[1, :int(batch.lengths[1])].tolist() == alone.new_tokens[0, :n].tolist()
    assert int(batch.stats["resamples"][1]) == int(alone.stats["resamples"][0])


def test_systematic_resampling_copies_floor_or_ceil():
    weights = torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    for u in (0.0, 0.3, 0.999):
        picked = systematic_resample(weights, torch.tensor([u, u]))
        copies = torch.stack([torch.bincount(row, minlength=4) for row in picked]).double()
        assert ((copies - 4 * weights).abs() < 1).all()
        assert picked[1].tolist() == [2, 2, 2, 2]


@pytest.mark.parametrize("kwargs, match", [
    ({"particles": 0}, "particles"), ({"particles": True}, "particles"), ({"particles": 2.5}, "particles"),
    ({"ess_threshold": 0.0}, "ess_threshold"), ({"ess_threshold": 1.5}, "ess_threshold"),
    ({"ess_threshold": True}, "ess_threshold"), ({"alpha": 0.0}, "alpha"), ({"alpha": True}, "alpha"),
    ({"alpha": float("inf")}, "alpha"), ({"proposal_temperature": -1.0}, "proposal_temperature"),
    ({"bridge": (1.0, 2.0)}, "bridge"), ({"bridge": (3.0, 2.0, 4.0)}, "bridge"), ({"bridge": 0}, "bridge"),
    ({"bridge": (0.0, 4.0)}, "bridge"), ({"bridge": True}, "bridge"), ({"bridge": "fast"}, "bridge"),
    ({"proposal_top_k": 0}, "proposal_top_k"), ({"proposal_top_p": 1.5}, "proposal_top_p"),
    ({"return_particles": 1}, "return_particles"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PowerSMC(**kwargs)


def test_bad_generate_input(tiny_gpt2):
    sampler = PowerSMC(particles=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        sampler.generate(tiny_gpt2, torch.tensor([[5, 6]]), 0)
    with pytest.raises(ValueError, match="context limit"):
        sampler.generate(tiny_gpt2, torch.full((1, 128), 5), 1)


def test_every_constructor_key_is_a_spec_key():
    import inspect

    from qllm_samplers.specs import SAMPLER_TYPES, parse_sampler

    expected = set(inspect.signature(PowerSMC).parameters) - {"proposal_warpers", "pad_token_id", "return_particles"}
    assert {k.name for k in SAMPLER_TYPES["power-smc"].keys()} == expected
    sampler = parse_sampler("power-smc:2:n=16:ess=0.25:bridge=3:ptopk=20:ptemp=0.5").build()
    assert (sampler.alpha, sampler.particles, sampler.ess_threshold) == (2.0, 16, 0.25)
    assert sampler.bridge == (2 / 3, 4 / 3, 2.0)
    assert sampler.fixed_temperature == 0.5 and type(sampler.proposal_warpers[0]).__name__ == "TopK"
    assert parse_sampler("power:4:tries=4:ptopp=0.9").build().proposals == 4
