"""PowerSampler: exactness against an enumerated p^alpha, the MH kernel, cache bookkeeping, batching, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from qllm_samplers.diagnostics.distribution import g_test, total_variation, tv_noise_floor
from qllm_samplers.power import PowerSampler
from qllm_samplers.testing import (
    EOS,
    PROMPT,
    all_continuations,
    continuation_counts,
    continuation_logprobs,
    mh_kernel,
    rescored_log_prob,
    toy_lm,
)


@pytest.mark.parametrize("case, proposals", [
    ("no_eos", 1), ("eos", 1), ("no_eos", 2), ("eos", 2), pytest.param("eos", 4, marks=pytest.mark.slow),
])
def test_matches_exact_power_distribution(case, proposals):
    """Many independent chains (one per row) match the enumerated p^alpha and not token-wise temperature.

    proposals > 1 is multiple-try MH; its exact kernel (K = 2) is checked like K = 1's. For K = 4 the kernel is
    too large to enumerate and the statistical check stands alone.
    """
    steps = 20 if proposals == 1 else 10
    if case == "no_eos":
        model, eos, alpha, early, drafts = toy_lm(1, 8.0, 0.0), None, 4.0, False, 0
    else:  # EOS makes lengths differ: the length term log n - log n' is needed for exactness
        model, eos, alpha, early, drafts = toy_lm(1, 12.0, 0.0), EOS, 2.0, None, 8
    max_new, chains = 3, 1200
    conts = all_continuations(max_new, eos)
    lp = continuation_logprobs(model, conts)
    lq = continuation_logprobs(model, conts, temperature=1 / alpha)
    target = torch.softmax(alpha * torch.tensor([sum(r) for r in lp], dtype=torch.float64), dim=0)
    tokenwise = torch.tensor([math.exp(sum(r)) for r in lq], dtype=torch.float64)
    # The test is only meaningful if the two laws differ and the chain has (provably) converged after `steps`.
    assert float(total_variation(target, tokenwise)) > 0.15
    law = tokenwise / tokenwise.sum()
    if proposals <= 2:
        kernel = mh_kernel(conts, lp, lq, alpha, proposals=proposals)
        assert float((target @ kernel - target).abs().max()) < 1e-12  # p^alpha is stationary for the kernel
        for _ in range(steps):
            law = law @ kernel
        assert float(total_variation(law, target)) < 0.003

    sampler = PowerSampler(alpha=alpha, mcmc_steps=steps, num_blocks=1, early_rejection=early, draft_tokens=drafts,
                           proposals=proposals)
    out = sampler.generate(model, torch.tensor([PROMPT] * chains), max_new, eos_token_id=eos,
                           generator=list(range(chains)))
    counts = continuation_counts(out, conts)
    tv = float(total_variation(counts / chains, target))
    assert tv < 2 * tv_noise_floor(chains, target), (tv, tv_noise_floor(chains, target))
    assert g_test(counts, target)[1] > 0.01
    assert g_test(counts, tokenwise)[1] < 1e-6  # measurably different from temperature 1/alpha
    if eos is not None:
        assert 0 < int((out.lengths < max_new).sum()) < chains  # both short and full-length results occur
    # diagnostics agree with a fresh scoring of the results
    index = {c: i for i, c in enumerate(conts)}
    fresh = [sum(lp[index[tuple(out.new_tokens[r, :int(out.lengths[r])].tolist())]]) for r in range(chains)]
    torch.testing.assert_close(out.log_p, torch.tensor(fresh, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.stats["log_p"], out.log_p, atol=1e-4, rtol=0)
    assert (out.stats["proposed"] == steps).all()
    assert 0.05 < float((out.stats["accepted"] / out.stats["proposed"]).mean()) < 1.0


def test_zero_steps_is_tokenwise_temperature():
    model = toy_lm(1, 8.0, 0.0)
    conts, chains = all_continuations(3, EOS), 1500
    lq = continuation_logprobs(model, conts, temperature=0.25)
    tokenwise = torch.tensor([math.exp(sum(r)) for r in lq], dtype=torch.float64)
    out = PowerSampler(alpha=4.0, mcmc_steps=0, num_blocks=3).generate(
        model, torch.tensor([PROMPT] * chains), 3, eos_token_id=EOS, generator=list(range(chains)))
    assert g_test(continuation_counts(out, conts), tokenwise)[1] > 0.01
    # one prompt pass plus one fed token per new token but the last: nothing is ever recomputed
    assert out.forward_tokens.tolist() == [len(PROMPT) + int(n) - 1 for n in out.lengths]


def test_truncated_proposal_targets_restricted_power():
    """With a top-k proposal the chain is exact for p^alpha restricted to what top-k can produce."""
    from qllm_samplers.warpers import TopK

    model, alpha, chains, top_k = toy_lm(1, 8.0, 0.0), 4.0, 1200, 2
    conts = all_continuations(3, None)
    lp = continuation_logprobs(model, conts)
    with torch.no_grad():
        ids = torch.tensor([PROMPT + list(c) for c in conts])
        logits = model(input_ids=ids).logits[:, len(PROMPT) - 1:-1]
        top = logits.topk(top_k, dim=-1).indices
        allowed = (top == ids[:, len(PROMPT):, None]).any(-1).all(-1)
    target = torch.softmax(alpha * torch.tensor([sum(r) for r in lp], dtype=torch.float64), dim=0) * allowed
    target = target / target.sum()
    sampler = PowerSampler(alpha=alpha, mcmc_steps=20, num_blocks=1,
                           proposal_warpers=[TopK(torch.full((chains,), top_k))])  # per-row parameter
    assert sampler.early_rejection  # a truncation keeps the bound valid
    out = sampler.generate(model, torch.tensor([PROMPT] * chains), 3, generator=list(range(chains)))
    counts = continuation_counts(out, conts)
    assert counts[~allowed].sum() == 0
    assert g_test(counts[allowed], target[allowed])[1] > 0.01


class _NoImmediateRepeat:
    """A proposal warper that reads input_ids: the token just before may not come again."""

    def __call__(self, input_ids, scores):
        return scores.scatter(1, input_ids[:, -1:], float("-inf"))


@pytest.mark.parametrize("proposals", [1, 2])
def test_context_warper_sees_each_rows_context(tiny_llama, proposals):
    prompts = torch.tensor([[0, 5, 6], [7, 8, 9]])
    sampler = PowerSampler(alpha=4.0, mcmc_steps=6, num_blocks=2, proposal_warpers=[_NoImmediateRepeat()],
                           proposals=proposals)
    assert not sampler.early_rejection  # unknown warper: the bound is not known to hold
    out = sampler.generate(tiny_llama, prompts, 10, attention_mask=(prompts != 0).long(), generator=[0, 1])
    for row in range(2):
        tokens = out.sequences[row, prompts.shape[1] - 1:].tolist()
        assert all(a != b for a, b in zip(tokens, tokens[1:]))
    assert int(out.stats["proposed"].sum()) == 2 * 2 * 6


@pytest.mark.parametrize("compaction, proposals", [("gather", 1), ("prefill", 1), ("gather", 3), ("prefill", 3)])
def test_cached_logprobs_match_fresh_scoring(tiny_hf_model, compaction, proposals):
    """Holes, re-fed tokens, compaction and (multiple-try) lane copies leave every kept cache entry exact
    (GPT-2 and Llama, left padding)."""
    prompts = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10], [0, 11, 12, 13]])
    mask = (prompts != 0).long()
    sampler = PowerSampler(alpha=2.0, mcmc_steps=10, num_blocks=2, compaction=compaction, proposals=proposals)
    out = sampler.generate(tiny_hf_model, prompts, 12, attention_mask=mask, eos_token_id=EOS,
                           generator=[3, 4, 5])
    assert out.stats["compactions"] >= 1
    torch.testing.assert_close(out.log_p, rescored_log_prob(tiny_hf_model, out), atol=2e-4, rtol=0)
    torch.testing.assert_close(out.stats["log_q"], rescored_log_prob(tiny_hf_model, out, 0.5), atol=2e-4, rtol=0)
    assert (out.forward_tokens <= out.stats["batch_forward_tokens"]).all()


@pytest.mark.parametrize("proposals", [1, 3])
def test_chain_does_not_depend_on_batch_mates(tiny_llama, proposals):
    sampler = PowerSampler(alpha=4.0, mcmc_steps=4, num_blocks=2, proposals=proposals)
    alone = sampler.generate(tiny_llama, torch.tensor([[5, 6, 7]]), 8, eos_token_id=EOS, generator=[42])
    prompts = torch.tensor([[0, 0, 9], [5, 6, 7], [0, 3, 4], [5, 6, 7]])
    batch = sampler.generate(tiny_llama, prompts, 8, attention_mask=(prompts != 0).long(), eos_token_id=EOS,
                             generator=[1, 42, 2, 3])
    assert batch.new_tokens[1, :int(batch.lengths[1])].tolist() == alone.new_tokens[0, :int(alone.lengths[0])].tolist()
    assert int(batch.stats["accepted"][1]) == int(alone.stats["accepted"][0])
    # same prompt, different seed: a different chain
    accepted = batch.stats["accepted"]
    assert batch.new_tokens[3].tolist() != batch.new_tokens[1].tolist() or int(accepted[3]) != int(accepted[1])
    again = sampler.generate(tiny_llama, torch.tensor([[5, 6, 7]]), 8, eos_token_id=EOS, generator=[42])
    assert again.sequences.tolist() == alone.sequences.tolist()


class _NaNModel(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, **kwargs):
        out = self.model(**kwargs)
        out.logits = torch.full_like(out.logits, float("nan"))
        return out


@pytest.mark.parametrize("kwargs, match", [
    ({"alpha": 0.0}, "alpha"), ({"alpha": -1.0}, "alpha"), ({"alpha": float("nan")}, "alpha"),
    ({"mcmc_steps": -1}, "mcmc_steps"), ({"block_size": 0}, "block_size"), ({"num_blocks": 0}, "num_blocks"),
    ({"proposal_temperature": 0.0}, "proposal_temperature"), ({"compaction": "x"}, "compaction"),
    ({"alpha": 4.0, "proposal_temperature": 2.0, "early_rejection": True}, "early_rejection"),
    ({"alpha": True}, "alpha"), ({"mcmc_steps": True}, "mcmc_steps"), ({"mcmc_steps": 2.0}, "mcmc_steps"),
    ({"num_blocks": False}, "num_blocks"), ({"draft_tokens": -1}, "draft_tokens"), ({"proposals": 0}, "proposals"),
    ({"proposals": True}, "proposals"), ({"proposal_temperature": True}, "proposal_temperature"),
    ({"early_rejection": 1}, "early_rejection"), ({"stop_at_eos": "yes"}, "stop_at_eos"),
    ({"proposal_top_k": 0}, "proposal_top_k"), ({"proposal_top_p": 0.0}, "proposal_top_p"),
    ({"proposals": 4, "early_rejection": True}, "early_rejection"), ({"alpha": "4"}, "alpha"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PowerSampler(**kwargs)


def test_bad_generate_input(tiny_gpt2):
    sampler = PowerSampler(mcmc_steps=1, num_blocks=1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        sampler.generate(tiny_gpt2, torch.tensor([[5, 6]]), 0)
    with pytest.raises(ValueError, match="context limit"):  # n_positions = 128: no silent truncation
        sampler.generate(tiny_gpt2, torch.full((1, 128), 5), 1)
    with pytest.raises(ValueError, match="NaN"):
        sampler.generate(_NaNModel(tiny_gpt2), torch.tensor([[5, 6]]), 4)
    with pytest.raises(ValueError, match="left padded"):
        sampler.generate(tiny_gpt2, torch.tensor([[5, 6]]), 4, attention_mask=torch.tensor([[1, 0]]))


def test_stop_at_eos_ends_a_chain_after_its_eos_block():
    """The official schedule: a chain stops after the block in which its state ended with EOS."""
    model, chains, steps, blocks = toy_lm(1, 12.0, 0.0), 64, 2, 3
    exact = PowerSampler(alpha=2.0, mcmc_steps=steps, num_blocks=blocks)
    official = PowerSampler(alpha=2.0, mcmc_steps=steps, num_blocks=blocks, stop_at_eos=True)
    ids = torch.tensor([PROMPT] * chains)
    out = official.generate(model, ids, 3, eos_token_id=EOS, generator=list(range(chains)))
    stopped = out.stats["proposed"] < steps * blocks
    assert stopped.any()
    ends = out.sequences[torch.arange(chains), out.prompt_length + out.lengths - 1]
    assert (ends[stopped] == EOS).all()
    # the exact chain keeps moving in later blocks even when its state already ended with EOS
    exact_out = exact.generate(model, ids, 3, eos_token_id=EOS, generator=list(range(chains)))
    assert (exact_out.stats["proposed"] == steps * blocks).all()


def test_block_budgets():
    assert PowerSampler(num_blocks=4).budgets(10) == [3, 6, 9, 10]
    assert PowerSampler(block_size=4).budgets(8) == [4, 8]
    assert PowerSampler(num_blocks=16).budgets(3) == [1, 2, 3]


class _UserTopTwo:
    """A user's warper that declares itself truncating (it only masks tokens): it may opt into the bound."""

    truncating, reads_input_ids = True, False

    def __call__(self, input_ids, scores):
        threshold = scores.topk(2, dim=-1).values[:, -1:]
        return scores.masked_fill(scores < threshold, float("-inf"))


def test_warper_capabilities_come_from_attributes_and_the_hf_table():
    from transformers import RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper

    from qllm_samplers.hf_compat import warper_capabilities
    from qllm_samplers.warpers import RepetitionPenalty, TopP

    assert PowerSampler(proposal_warpers=[_UserTopTwo()]).early_rejection
    assert PowerSampler(proposal_warpers=[TopKLogitsWarper(5)]).early_rejection
    assert PowerSampler(proposal_warpers=[TopP(0.9)]).early_rejection
    for warper in (TemperatureLogitsWarper(0.5), RepetitionPenalty(1.2), _NoImmediateRepeat()):
        assert not PowerSampler(proposal_warpers=[warper]).early_rejection
    assert warper_capabilities(RepetitionPenaltyLogitsProcessor(1.2)).reads_input_ids
    assert not warper_capabilities(TopKLogitsWarper(5)).reads_input_ids
    assert warper_capabilities(_NoImmediateRepeat()) == (False, True)  # declares nothing: assume the worst
