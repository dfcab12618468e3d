"""SamplingChain: transformers' order, the fast draw's support, seeded distribution tests, batch invariance."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LogitsProcessorList
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from qllm_samplers.chain import Greedy, SamplingChain
from qllm_samplers.generate import generate
from qllm_samplers.rng import RowRNG
from qllm_samplers.warpers import MinP, RepetitionPenalty, Temperature, TopK, TopP, Typical


def logits(batch: int, vocab: int, seed: int, scale_low: float = 1.0, scale_high: float = 7.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = scale_low + (scale_high - scale_low) * torch.rand(batch, 1, generator=g)
    return torch.randn(batch, vocab, generator=g) * scale


def history(batch: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, 30), generator=torch.Generator().manual_seed(seed))


def test_chain_equals_transformers_processors_in_order():
    scores, ids = logits(8, 3000, 0), history(8, 3000, 0)
    chain = SamplingChain(temperature=0.7, top_k=40, top_p=0.9, min_p=0.02, typical_p=0.95, repetition_penalty=1.2)
    assert [type(w) for w in chain.warpers] == [RepetitionPenalty, Temperature, TopK, TopP, MinP, Typical]
    ref = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.7),
                               TopKLogitsWarper(40), TopPLogitsWarper(0.9), MinPLogitsWarper(0.02),
                               TypicalLogitsWarper(0.95)])(ids, scores.clone())
    assert torch.equal(chain(ids, scores.clone()), ref)


def test_order_matters_temperature_before_top_p():
    scores = logits(8, 500, 1)
    chain = SamplingChain(temperature=2.5, top_p=0.5)
    after = TopPLogitsWarper(0.5)(None, TemperatureLogitsWarper(2.5)(None, scores.clone()))
    before = TemperatureLogitsWarper(2.5)(None, TopPLogitsWarper(0.5)(None, scores.clone()))
    out = chain(None, scores)
    assert torch.equal(out, after)
    assert not torch.equal(torch.isfinite(out), torch.isfinite(before))


def rebuild(plan, vocab: int) -> torch.Tensor:
    """The full [B, V] warped scores that ``plan`` draws from."""
    if plan.ids is None:
        full = plan.logits.clone()
    else:
        full = torch.full((plan.logits.shape[0], vocab), -math.inf).scatter_(1, plan.ids, plan.logits)
    if plan.fallback.numel():
        full[plan.fallback] = plan.fallback_logits
    return full


CONFIGS = {
    "top_p": dict(top_p=0.9),
    "top_k": dict(top_k=25),
    "min_p": dict(min_p=0.05),
    "all": dict(temperature=0.8, top_k=60, top_p=0.92, min_p=0.01, repetition_penalty=1.3),
    "per_row": dict(temperature=torch.linspace(0.3, 1.5, 12), top_p=torch.linspace(0.2, 1.0, 12),
                    top_k=torch.arange(12) * 7 + 1, min_p=torch.linspace(0.0, 0.3, 12)),
    "min_keep": dict(top_p=0.3, min_p=0.5, min_tokens_to_keep=4),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fast_draw_has_exactly_the_warped_support(name):
    """What select() draws from equals chain(input_ids, scores) exactly, fast path and fallback rows alike."""
    fallbacks = 0
    for seed in range(4):
        scores, ids = logits(12, 3000, seed, 0.3, 8.0), history(12, 3000, seed)
        chain = SamplingChain(**CONFIGS[name], candidates=48)
        plan = chain.plan(ids, scores.clone())
        assert torch.equal(rebuild(plan, 3000), chain(ids, scores.clone()))
        fallbacks += plan.fallback.numel()
    if name in ("top_p", "min_p", "per_row"):
        assert 0 < fallbacks < 48  # both paths exercised


def test_temperature_zero_rows_are_greedy():
    scores = logits(6, 2000, 2)
    chain = SamplingChain(temperature=torch.tensor([0.0, 1.0, 0.0, 0.5, 0.0, 2.0]), top_p=0.9, candidates=32)
    tokens = chain.sample(None, scores, RowRNG(torch.arange(6)))
    assert torch.equal(tokens[[0, 2, 4]], scores.argmax(-1)[[0, 2, 4]])
    assert torch.equal(SamplingChain(temperature=0.0).sample(None, scores, RowRNG(torch.arange(6))),
                       scores.argmax(-1))
    assert torch.equal(Greedy().select(scores, None, RowRNG(torch.arange(6))), scores.argmax(-1))


def g_test_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """G-test of multinomial counts against probabilities; categories expected < 5 are pooled."""
    n = counts.sum()
    expected = probs.double() * n
    small = expected < 5
    observed = torch.cat([counts[~small].double(), counts[small].double().sum()[None]])
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    observed, expected = observed[expected > 0], expected[expected > 0]
    nonzero = observed > 0
    statistic = 2 * (observed[nonzero] * (observed[nonzero] / expected[nonzero]).log()).sum()
    dof = torch.tensor((expected.numel() - 1) / 2, dtype=torch.float64)
    return torch.special.gammaincc(dof, statistic / 2).item()


def draw_counts(chain: SamplingChain, row: torch.Tensor, ids: torch.Tensor, draws: int, seed: int) -> torch.Tensor:
    batch = 2000
    rng = RowRNG(torch.arange(batch) + seed * 100_000)
    counts = torch.zeros(row.shape[-1], dtype=torch.long)
    for _ in range(draws // batch):
        tokens = chain.sample(ids.expand(batch, -1), row.expand(batch, -1), rng)
        counts += torch.bincount(tokens, minlength=row.shape[-1])
    return counts


DISTRIBUTION_CONFIGS = {
    "fast_path": (dict(temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.5), 4.0),
    "min_p": (dict(min_p=0.02), 3.0),
    "flat_top_p_fallback": (dict(top_p=0.4), 0.3),
    "temperature_only": (dict(temperature=1.3), 1.0),
    "typical": (dict(typical_p=0.7), 2.0),
}


@pytest.mark.parametrize("name", list(DISTRIBUTION_CONFIGS))
def test_draws_follow_the_warped_softmax(name):
    kwargs, scale = DISTRIBUTION_CONFIGS[name]
    vocab = 400
    row = torch.randn(1, vocab, generator=torch.Generator().manual_seed(7)) * scale
    ids = history(1, vocab, 7)
    chain = SamplingChain(**kwargs, candidates=32)
    probs = torch.softmax(chain(ids, row.clone())[0].double(), dim=-1)
    counts = draw_counts(chain, row, ids, 40_000, seed=1)
    assert counts[probs == 0].sum() == 0  # nothing outside the kept set
    assert g_test_p_value(counts, probs) > 1e-3
    if name == "fast_path":  # the test has power: the untruncated softmax is rejected
        assert g_test_p_value(counts, torch.softmax(row[0].double(), dim=-1)) < 1e-6


def test_seeded_row_ignores_its_batch():
    """A seeded request draws the same tokens alone or in the middle of a batch of strangers."""
    vocab, steps = 3000, 40
    # different candidate set sizes, so the row can take the fast path in one batch and the fallback in the other
    alone = SamplingChain(temperature=torch.tensor([0.9]), top_p=torch.tensor([0.95]), min_p=torch.tensor([0.0]),
                          candidates=64)
    crowd = SamplingChain(temperature=torch.tensor([0.5, 1.2, 0.9, 0.0, 1.0]),
                          top_p=torch.tensor([0.5, 0.99, 0.95, 0.9, 0.7]),
                          min_p=torch.tensor([0.1, 0.0, 0.0, 0.05, 0.2]), candidates=256)
    rng_alone, rng_crowd = RowRNG(torch.tensor([42])), RowRNG(torch.tensor([7, 8, 42, 9, 10]))
    paths = set()
    for step in range(steps):
        scores = logits(5, vocab, 1000 + step, 0.2, 6.0)
        own = scores[2:3].clone()
        token_alone = alone.sample(None, own.clone(), rng_alone)
        token_crowd = crowd.sample(None, scores, rng_crowd)
        assert token_alone.item() == token_crowd[2].item(), f"step {step}"
        paths.add(bool((alone.plan(None, own).fallback == 0).any()))
    assert paths == {True, False}  # the row took both the candidate path and the fallback


def test_generate_with_chain_seeded_rows(tiny_gpt2):
    prompts = torch.tensor([[5, 17, 5, 33], [9, 9, 21, 40]])
    chain2 = SamplingChain(temperature=torch.tensor([0.9, 1.1]), top_p=torch.tensor([0.9, 0.8]))
    chain1 = SamplingChain(temperature=torch.tensor([0.9]), top_p=torch.tensor([0.9]))
    both = generate(tiny_gpt2, prompts, sampler=chain2, max_new_tokens=10, generator=[3, 4])
    one = generate(tiny_gpt2, prompts[:1], sampler=chain1, max_new_tokens=10, generator=[3])
    assert torch.equal(both.sequences[0], one.sequences[0])
    greedy = generate(tiny_gpt2, prompts, sampler=Greedy(), max_new_tokens=10)
    cold = generate(tiny_gpt2, prompts, sampler=SamplingChain(temperature=0.0, top_k=5), max_new_tokens=10,
                    generator=[1, 2])
    assert torch.equal(greedy.sequences, cold.sequences)


def test_chain_errors():
    with pytest.raises(ValueError, match="repetition_window needs repetition_penalty"):
        SamplingChain(repetition_window=128)
    with pytest.raises(ValueError, match=r"top_p must be a number in \(0.0, 1.0\]"):
        SamplingChain(top_p=0.0)
    with pytest.raises(ValueError, match="temperature has 3 per-row values but scores has 4 rows"):
        SamplingChain(temperature=torch.ones(3), top_p=0.9).sample(None, logits(4, 100, 0), RowRNG(torch.arange(4)))
    bad = logits(2, 100, 0)
    bad[1, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        SamplingChain(top_p=0.9, candidates=8).sample(None, bad, RowRNG(torch.arange(2)))


@pytest.mark.parametrize("kwargs, match", [
    (dict(typical_p=1.0), r"typical_p must be a number in \(0.0, 1.0\)"),
    (dict(repetition_penalty=0.0), r"repetition_penalty must be a number in \(0.0, 3.403e\+38\]"),
    (dict(repetition_penalty=1.2, repetition_window=0), r"repetition_window must be None or an integer >= 1"),
    (dict(temperature=math.inf), r"temperature must be a number in \[0.0, 3.403e\+38\], got inf"),
    (dict(top_k=torch.tensor([2, 0])), r"top_k must be an integer .* got \[0"),
])
def test_chain_errors_name_the_chain_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingChain(**kwargs)


def test_chain_checks_input_ids_and_scores():
    rng = RowRNG(torch.arange(2))
    chain = SamplingChain(temperature=0.7, top_p=0.9, repetition_penalty=1.2)
    with pytest.raises(ValueError, match=r"input_ids has 3 rows but scores has 2"):
        chain.sample(torch.zeros(3, 4, dtype=torch.long), torch.randn(2, 50), rng)
    with pytest.raises(ValueError, match=r"input_ids must be an integer tensor"):
        chain.sample(torch.zeros(2, 4), torch.randn(2, 50), rng)
    with pytest.raises(ValueError, match=r"input_ids: repetition_penalty needs the tokens so far"):
        chain.sample(None, torch.randn(2, 50), rng)
    with pytest.raises(ValueError, match=r"scores: the vocabulary is empty"):
        SamplingChain(top_k=3).sample(None, torch.zeros(2, 0), rng)
    with pytest.raises(ValueError, match=r"temperature: dividing the logits by it leaves no finite logit"):
        SamplingChain(temperature=1e-38, top_k=3).sample(None, torch.tensor([[1e3, -1e3]] * 2), rng)
