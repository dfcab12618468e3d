"""PBitSampler: every mode against the exact softmax, shift invariance, vocabulary reduction, RowRNG, errors."""

from __future__ import annotations

import math

import pytest
import torch

from qllm_samplers.diagnostics.distribution import g_test, total_variation, tv_noise_floor
from qllm_samplers.pbit.network import UniformSource, state_histogram
from qllm_samplers.pbit.token import OneHotNetwork, PBitSampler, centred_log_probs, reduce_vocabulary
from qllm_samplers.rng import RowRNG


def _logits(v: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(v, generator=g) * scale


def _assert_exact(tokens: torch.Tensor, probs: torch.Tensor, slack: float = 2.5) -> None:
    """No invalid draw, the G-test accepts, and TV is within ``slack`` x its expected value for an exact sampler.

    TV of a peaked distribution is dominated by one or two counts, so its spread around the noise floor is
    wide (half-normal): the G-test is the calibrated criterion, the TV bound a coarse guard.
    """
    tokens = tokens.flatten()
    assert (tokens >= 0).all(), "invalid draws"
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    _, p_value, _ = g_test(counts, probs)
    tv, floor = float(total_variation(counts / counts.sum(), probs)), tv_noise_floor(tokens.numel(), probs)
    assert p_value > 1e-3, f"G-test rejects the draws: p = {p_value}, tv = {tv}"
    assert tv < slack * floor, (tv, floor)


# ------------------------------------------------------------------------------------------ exact modes
@pytest.mark.parametrize("mode", ["swap", "shifted", "tempering"])
@pytest.mark.parametrize("offset", [0.0, 1000.0, -250.0])
def test_exact_modes_match_softmax_for_any_logit_offset(mode, offset):
    z = _logits(32, seed=1, scale=1.5)
    sampler = PBitSampler(mode)
    probs = torch.softmax(z.double(), dim=0)
    tokens = sampler.sample(z.double() + offset, 10_000, generator=7)
    assert tokens.shape == (10_000,) and tokens.dtype == torch.long
    _assert_exact(tokens, probs)
    assert sampler.counters.fallbacks == 0


@pytest.mark.parametrize("mode", ["swap", "shifted", "tempering"])
def test_exact_modes_on_peaked_logits_with_temperature(mode):
    # beta = 2 sharpens an already peaked row: the top token has most of the mass, the barrier case.
    z = _logits(32, seed=2, scale=2.5)
    sampler = PBitSampler(mode, beta=2.0)
    probs = torch.softmax(2.0 * z.double(), dim=0)
    assert probs.max() > 0.5
    _assert_exact(sampler.sample(z, 10_000, generator=80), probs)


def test_faithful_gibbs_at_lambda_5_with_100_sweeps():
    z = _logits(32, seed=3)
    sampler = PBitSampler("gibbs", lam=5.0, sweeps=100)
    tokens = sampler.sample(z + 40.0, 10_000, generator=9)
    probs = torch.softmax(z.double(), dim=0)
    tv = float(total_variation(torch.bincount(tokens, minlength=32).double() / 10_000, probs))
    assert tv <= 0.03
    # About 1.5 e^-5 of final states are not one-hot; the retries then absorb them.
    assert 0.002 < sampler.counters.invalid_rate < 0.03
    assert sampler.counters.fallback_rate == 0.0


def test_gibbs_barrier_is_visible_at_large_lambda():
    # lam = 50 with few sweeps: single flips cannot cross the barrier, the chain keeps its first one-hot state.
    z = _logits(16, seed=4)
    probs = torch.softmax(z.double(), dim=0)
    stuck = PBitSampler("gibbs", lam=50.0, sweeps=3).sample(z, 4000, generator=10)
    tv = float(total_variation(torch.bincount(stuck, minlength=16).double() / 4000, probs))
    assert tv > 5 * tv_noise_floor(4000, probs)
    # Replica exchange at the same lam mixes.
    _assert_exact(PBitSampler("tempering", lam=50.0).sample(z, 4000, generator=10), probs)


def test_tokens_are_shift_invariant_draw_for_draw():
    # Logits on a 2^-8 grid plus a power of two: z + c is exact in float32, so every draw must agree.
    z = torch.round(_logits(24, seed=5) * 256) / 256
    for mode in ("gibbs", "swap", "shifted", "tempering"):
        sampler = PBitSampler(mode, sweeps=5)
        base = sampler.sample(z, 500, generator=11)
        assert torch.equal(base, sampler.sample(z + 1024.0, 500, generator=11)), mode
        assert torch.equal(base, sampler.sample(z - 64.0, 500, generator=11)), mode


# ------------------------------------------------------------------------------------------ the network
def test_one_hot_network_is_the_penalty_energy_and_restricts_to_softmax():
    z = _logits(6, seed=6)
    values, _, valid = reduce_vocabulary(z[None])
    log_probs = centred_log_probs(values, valid, beta=1.0)
    network = OneHotNetwork(log_probs, valid, penalty=2.0).as_pbit_network()
    states = network.all_states()
    s = states.sum(-1).double()
    expected = -(states.double() * log_probs[0]).sum(-1) + 2.0 * (s - 1) ** 2
    assert torch.allclose(network.energy(states), expected, atol=1e-5)
    exact = network.exact_distribution()
    one_hot = s == 1
    conditional = exact[one_hot] / exact[one_hot].sum()
    order = states[one_hot].argmax(-1)
    assert torch.allclose(conditional, log_probs[0, order].exp(), atol=1e-6)


@pytest.mark.parametrize("update", ["sequential", "random"])
def test_token_network_state_distribution_matches_enumeration(update):
    # The O(1)-field token network and the dense general network are the same Boltzmann machine: compare the
    # full state distribution over {0,1}^6 (64 states) after mixing, at a penalty low enough to mix.
    z = _logits(6, seed=7)
    values, _, valid = reduce_vocabulary(z[None])
    log_probs = centred_log_probs(values, valid, 1.0).expand(8000, -1)
    network = OneHotNetwork(log_probs, valid.expand(8000, -1), penalty=1.0)
    y, s = network.empty_state()
    uniform = UniformSource(8000, 12)
    for _ in range(60):
        network.sweep(y, s, uniform, update)
    exact = network.as_pbit_network().exact_distribution()
    empirical = state_histogram(y.T, 6)
    assert g_test(empirical * 8000, exact)[1] > 1e-3
    assert float(total_variation(empirical, exact)) < 1.3 * tv_noise_floor(8000, exact)
    assert torch.equal(s, y.sum(0))


# ------------------------------------------------------------------------------------------ reduction
def test_top_k_top_p_and_masked_tokens():
    z = _logits(200, seed=8, scale=2.0)
    z[5] = -math.inf
    sampler = PBitSampler("shifted", top_k=10)
    tokens = sampler.sample(z, 5000, generator=13)
    top10 = torch.topk(z, 10).indices
    assert torch.isin(tokens, top10).all()
    target = sampler.target_probs(z)
    assert int((target > 0).sum()) == 10 and target.sum().item() == pytest.approx(1.0)
    _assert_exact(tokens, target)
    # top-p keeps the smallest prefix whose mass reaches p.
    probs = torch.softmax(z.double(), dim=0)
    sorted_probs, order = probs.sort(descending=True)
    keep = int((sorted_probs.cumsum(0) < 0.8).sum()) + 1
    target_p = PBitSampler("swap", top_p=0.8, top_k=None).target_probs(z)
    assert set(torch.nonzero(target_p).flatten().tolist()) == set(order[:keep].tolist())
    # A large vocabulary reduced by top-k through the real pipeline.
    big = _logits(49_152, seed=9, scale=3.0)
    sampler = PBitSampler("tempering", top_k=50)
    _assert_exact(sampler.sample(big, 4000, generator=14), sampler.target_probs(big))


@pytest.mark.parametrize("mode", ["gibbs", "swap", "shifted", "tempering"])
def test_batched_rows_with_different_candidate_counts(mode):
    z = torch.stack([_logits(12, seed=10), _logits(12, seed=11, scale=2.0), _logits(12, seed=12)])
    z[2, 3:] = -math.inf  # row 2 has only three candidates: padding bits must never switch on
    gibbs = mode == "gibbs"
    sampler = PBitSampler(mode, lam=2.0 if gibbs else None, sweeps=40 if gibbs else None)
    tokens = sampler.sample(z, 6000, generator=15)
    assert tokens.shape == (3, 6000)
    assert (tokens[2] < 3).all()
    targets = sampler.target_probs(z)
    for row in range(3):
        _assert_exact(tokens[row], targets[row])


# ------------------------------------------------------------------------------------------ generate() adapter
@pytest.mark.parametrize("mode", ["gibbs", "swap", "shifted", "tempering"])
def test_select_is_batch_invariant_with_row_rng(mode):
    scores = torch.stack([_logits(40, seed=s, scale=2.0) for s in range(4)])
    sampler = PBitSampler(mode, lam=1.0 if mode == "gibbs" else None, sweeps=4, max_retries=3)
    seeds = torch.tensor([101, 202, 303, 404])
    together = torch.stack([sampler.select(scores, None, RowRNG(seeds)) for _ in range(1)])[0]
    alone = sampler.select(scores[2:3], None, RowRNG(seeds[2:3]))
    assert together.shape == (4,) and together.dtype == torch.long
    assert together[2] == alone[0]
    # Successive draws from one RowRNG differ (the counter advances), and the same seeds repeat.
    rng = RowRNG(seeds)
    draws = torch.stack([sampler.select(scores, None, rng) for _ in range(12)])
    assert len(set(draws[:, 0].tolist())) > 1
    rng_again = RowRNG(seeds)
    assert torch.equal(draws, torch.stack([sampler.select(scores, None, rng_again) for _ in range(12)]))


def test_sample_with_row_rng_is_batch_invariant_for_many_chains():
    scores = torch.stack([_logits(20, seed=20), _logits(20, seed=21)])
    sampler = PBitSampler("shifted")
    both = sampler.sample(scores, 300, generator=RowRNG(torch.tensor([5, 6])))
    alone = sampler.sample(scores[1:], 300, generator=RowRNG(torch.tensor([6])))
    assert torch.equal(both[1], alone[0])


def test_decodes_text_with_generate(tiny_llama):
    from qllm_samplers.generate import generate
    from qllm_samplers.lm import forward_step

    prompt = torch.tensor([[1, 5, 9, 13], [0, 1, 7, 8]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    sampler = PBitSampler("shifted", top_k=20)
    out = generate(tiny_llama, prompt, sampler=sampler, attention_mask=mask, max_new_tokens=5, generator=[3, 4])
    assert out.sequences.shape == (2, prompt.shape[1] + 5)
    assert out.stats["draws"] == 10 and out.stats["fallbacks"] == 0
    # The first new token of each row is among that step's top 20 logits (the reduced vocabulary).
    first_logits, _ = forward_step(tiny_llama, prompt, mask)
    top20 = torch.topk(first_logits[:, -1], 20).indices
    assert all(int(out.new_tokens[row, 0]) in top20[row].tolist() for row in range(2))
    # Per-row seeds: row 1 decodes the same alone.
    alone = generate(tiny_llama, prompt[1:, 1:], sampler=sampler, attention_mask=mask[1:, 1:], max_new_tokens=5,
                     generator=[4])
    assert torch.equal(alone.new_tokens[0], out.new_tokens[1])


# ------------------------------------------------------------------------------------------ counters, errors
def test_fallbacks_are_counted_and_follow_the_policy():
    z = _logits(16, seed=13)
    # lam = 0 at one sweep: most final states are not one-hot, and with no retries they fall back.
    none = PBitSampler("gibbs", lam=0.0, sweeps=1, max_retries=0, fallback="none")
    tokens = none.sample(z, 2000, generator=16)
    failed = int((tokens == -1).sum())
    assert failed == none.counters.fallbacks == none.counters.invalid_attempts > 500
    assert none.counters.fallback_rate == pytest.approx(failed / 2000)
    argmax = PBitSampler("gibbs", lam=0.0, sweeps=1, max_retries=0, fallback="argmax")
    tokens = argmax.sample(z, 2000, generator=16)
    assert int((tokens == int(z.argmax())).sum()) >= failed
    exact = PBitSampler("gibbs", lam=0.0, sweeps=1, max_retries=0)
    _assert_exact(exact.sample(z, 6000, generator=17), torch.softmax(z.double(), 0))
    exact.reset_stats()
    assert exact.counters.draws == 0
    with pytest.raises(ValueError, match="fallback='none'"):
        none.select(z[None], None, RowRNG(torch.tensor([1])))


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="lam must be"):
        PBitSampler("gibbs", lam=-1.0)
    with pytest.raises(ValueError, match="beta must be"):
        PBitSampler("gibbs", beta=0.0)
    with pytest.raises(ValueError, match="sweeps must be"):
        PBitSampler("swap", sweeps=0)
    with pytest.raises(ValueError, match="mode must be one of"):
        PBitSampler("anneal")
    with pytest.raises(ValueError, match="top_k must be"):
        PBitSampler("gibbs", top_k=0)
    with pytest.raises(ValueError, match="top_p must be"):
        PBitSampler("gibbs", top_p=1.5)
    with pytest.raises(ValueError, match="lam must be 0"):
        PBitSampler("swap", lam=5.0)
    with pytest.raises(ValueError, match="replicas must be"):
        PBitSampler("tempering", replicas=1)
    sampler = PBitSampler("shifted")
    with pytest.raises(ValueError, match="NaN"):
        sampler.sample(torch.tensor([0.0, float("nan")]), 3)
    with pytest.raises(ValueError, match="vocabulary is empty"):
        sampler.sample(torch.full((5,), -math.inf), 3)
    with pytest.raises(ValueError, match=r"\+inf"):
        sampler.sample(torch.tensor([0.0, math.inf]), 3)
    with pytest.raises(ValueError, match="num_samples must be"):
        sampler.sample(torch.zeros(4), 0)
    with pytest.raises(ValueError, match="logits must be"):
        sampler.sample(torch.zeros(2, 3, 4), 1)
    with pytest.raises(ValueError, match=r"max_bits must be an int >= 1"):
        PBitSampler("gibbs", max_bits=0)


def test_full_vocabulary_network_is_refused_with_a_way_out():
    big = _logits(49_152, seed=3)
    with pytest.raises(ValueError, match=r"49152 p-bits .* more than max_bits=4096; reduce the vocabulary with "
                                         r"top_k \(e.g. top_k=50, the default\) or top_p, or raise max_bits"):
        PBitSampler("gibbs", top_k=None).sample(big, 1)
    # the default (top-k 50, as the original's generation) is practical on a 49k vocabulary
    sampler = PBitSampler()
    assert sampler.top_k == 50
    tokens = sampler.sample(big, 4, generator=1)
    assert torch.isin(tokens, torch.topk(big, 50).indices).all()


# ------------------------------------------------------------------------------------------ the original
def _original_logits() -> torch.Tensor:
    torch.manual_seed(42)  # qllm-pbits' exp_softmax_match: torch.manual_seed(42); torch.randn(32)
    return torch.randn(32)


def test_original_mode_reproduces_the_original_table():
    """qllm-pbits' README (V=32, n=10,000, 100 Gibbs steps): TV 0.158 at lambda=5, about 0.37 for lambda >= 10."""
    z = _original_logits()
    probs = torch.softmax(z.double(), 0)
    uniform = torch.full((32,), 1 / 32, dtype=torch.float64)
    assert float(total_variation(uniform, probs)) == pytest.approx(0.371, abs=0.001)
    low = PBitSampler("original", lam=5.0)
    tokens = low.sample(z, 4000, generator=1)
    tv_low = float(total_variation(torch.bincount(tokens, minlength=32).double() / 4000, probs))
    assert 0.12 < tv_low < 0.21, tv_low
    assert 0.0 < low.counters.fallback_rate < 0.02  # the README's "0.4% invalid" is the argmax fallback rate
    high = PBitSampler("original", lam=20.0)
    tokens = high.sample(z, 4000, generator=2)
    empirical = torch.bincount(tokens, minlength=32).double() / 4000
    # the chain freezes on its uniformly chosen first hot bit: the draws are uniform, hence TV(uniform, softmax)
    assert float(total_variation(empirical, probs)) == pytest.approx(0.371, abs=0.03)
    assert float(total_variation(empirical, uniform)) < 2.5 * tv_noise_floor(4000, uniform)
    assert high.counters.fallback_rate == 0.0 and high.fallback == "argmax"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_gpu():
    z = _logits(32, seed=14).cuda()
    for mode in ("gibbs", "swap", "shifted", "tempering"):
        sampler = PBitSampler(mode, sweeps=20 if mode == "gibbs" else None)
        tokens = sampler.sample(z, 10_000, generator=torch.Generator(device="cuda").manual_seed(1))
        assert tokens.device.type == "cuda"
        if mode != "gibbs":
            _assert_exact(tokens.cpu(), torch.softmax(z.double().cpu(), 0))


def test_overflowing_beta_names_beta():
    with pytest.raises(ValueError, match=r"beta=1e\+300: beta \* logits overflows"):
        PBitSampler("shifted", beta=1e300).sample(torch.tensor([1e10, 0.0, 1.0]), 2, generator=0)
    with pytest.raises(ValueError, match="beta must be a finite number > 0"):
        PBitSampler("shifted", beta=math.inf)
