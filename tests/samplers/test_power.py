"""PowerSampler: exactness against an enumerated p^alpha, the MH kernel, cache bookkeeping, batching, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from qllm_samplers.diagnostics.distribution import g_test, total_variation, tv_noise_floor
from qllm_samplers.power import PowerSampler
from qllm_samplers.testing import EOS, PROMPT, all_continuations, continuation_logprobs, toy_lm


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: extra intra-op threads only add synchronisation cost on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _mh_kernel(continuations, lp, lq, alpha: float) -> torch.Tensor:
    """The exact transition matrix of one MH move (uniform cut, suffix from q, ratio with the length term)."""
    size = len(continuations)
    kernel = torch.zeros(size, size, dtype=torch.float64)
    for a, x in enumerate(continuations):
        n = len(x)
        for b, y in enumerate(continuations):
            if a == b:
                continue
            for cut in range(n):
                if len(y) <= cut or y[:cut] != x[:cut]:
                    continue
                log_qy, log_qx = sum(lq[b][cut:]), sum(lq[a][cut:])
                log_r = (alpha * (sum(lp[b][cut:]) - sum(lp[a][cut:])) + log_qx - log_qy
                         + math.log(n) - math.log(len(y)))
                kernel[a, b] += math.exp(log_qy) / n * min(1.0, math.exp(log_r))
        kernel[a, a] = 1.0 - kernel[a].sum()
    return kernel


def _histogram(out, continuations) -> torch.Tensor:
    index = {c: i for i, c in enumerate(continuations)}
    counts = torch.zeros(len(continuations), dtype=torch.float64)
    for row in range(out.sequences.shape[0]):
        counts[index[tuple(out.new_tokens[row, :int(out.lengths[row])].tolist())]] += 1
    return counts


@pytest.mark.parametrize("case", ["no_eos", "eos"])
def test_matches_exact_power_distribution(case):
    """Many independent chains (one per row) match the enumerated p^alpha and not token-wise temperature."""
    if case == "no_eos":
        model, eos, alpha, steps, early, drafts = toy_lm(1, 8.0, 0.0), None, 4.0, 20, False, 0
    else:  # EOS makes lengths differ: the length term log n - log n' is needed for exactness
        model, eos, alpha, steps, early, drafts = toy_lm(1, 12.0, 0.0), EOS, 2.0, 20, None, 8
    max_new, chains = 3, 1200
    conts = all_continuations(max_new, eos)
    lp = continuation_logprobs(model, conts)
    lq = continuation_logprobs(model, conts, temperature=1 / alpha)
    target = torch.softmax(alpha * torch.tensor([sum(r) for r in lp], dtype=torch.float64), dim=0)
    tokenwise = torch.tensor([math.exp(sum(r)) for r in lq], dtype=torch.float64)
    # The test is only meaningful if the two laws differ and the chain has (provably) converged after `steps`.
    assert float(total_variation(target, tokenwise)) > 0.15
    law = tokenwise / tokenwise.sum()
    kernel = _mh_kernel(conts, lp, lq, alpha)
    assert float((target @ kernel - target).abs().max()) < 1e-12  # p^alpha is stationary for the kernel
    for _ in range(steps):
        law = law @ kernel
    assert float(total_variation(law, target)) < 0.003

    sampler = PowerSampler(alpha=alpha, mcmc_steps=steps, num_blocks=1, early_rejection=early, draft_tokens=drafts)
    out = sampler.generate(model, torch.tensor([PROMPT] * chains), max_new, eos_token_id=eos,
                           generator=list(range(chains)))
    counts = _histogram(out, conts)
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
    assert (out.proposed == steps).all()
    assert 0.05 < float(out.acceptance_rate.mean()) < 1.0


def test_zero_steps_is_tokenwise_temperature():
    model = toy_lm(1, 8.0, 0.0)
    conts, chains = all_continuations(3, EOS), 1500
    lq = continuation_logprobs(model, conts, temperature=0.25)
    tokenwise = torch.tensor([math.exp(sum(r)) for r in lq], dtype=torch.float64)
    out = PowerSampler(alpha=4.0, mcmc_steps=0, num_blocks=3).generate(
        model, torch.tensor([PROMPT] * chains), 3, eos_token_id=EOS, generator=list(range(chains)))
    assert g_test(_histogram(out, conts), tokenwise)[1] > 0.01
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
    counts = _histogram(out, conts)
    assert counts[~allowed].sum() == 0
    assert g_test(counts[allowed], target[allowed])[1] > 0.01


class _NoImmediateRepeat:
    """A proposal warper that reads input_ids: the token just before may not come again."""

    def __call__(self, input_ids, scores):
        return scores.scatter(1, input_ids[:, -1:], float("-inf"))


def test_context_warper_sees_each_rows_context(tiny_llama):
    prompts = torch.tensor([[0, 5, 6], [7, 8, 9]])
    sampler = PowerSampler(alpha=4.0, mcmc_steps=6, num_blocks=2, proposal_warpers=[_NoImmediateRepeat()])
    assert not sampler.early_rejection  # unknown warper: the bound is not known to hold
    out = sampler.generate(tiny_llama, prompts, 10, attention_mask=(prompts != 0).long(), generator=[0, 1])
    for row in range(2):
        tokens = out.sequences[row, prompts.shape[1] - 1:].tolist()
        assert all(a != b for a, b in zip(tokens, tokens[1:]))
    assert int(out.proposed.sum()) == 2 * 2 * 6


def _fresh_scores(model, out, temperature: float = 1.0) -> torch.Tensor:
    """log p (or log q at a temperature) of each row's continuation, by one teacher-forced pass."""
    from qllm_samplers.lm import forward_step

    logits, _ = forward_step(model, out.sequences, out.attention_mask)
    logprobs = torch.log_softmax(logits.double() / temperature, dim=-1)[:, out.prompt_length - 1:-1]
    new = out.new_tokens
    picked = logprobs.gather(2, new[:, :, None]).squeeze(2)
    valid = torch.arange(new.shape[1])[None, :] < out.lengths[:, None]
    return (picked * valid).sum(1)


@pytest.mark.parametrize("compaction", ["gather", "prefill"])
def test_cached_logprobs_match_fresh_scoring(tiny_hf_model, compaction):
    """Holes, re-fed tokens and compaction leave every kept cache entry exact (GPT-2 and Llama, left padding)."""
    prompts = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10], [0, 11, 12, 13]])
    mask = (prompts != 0).long()
    sampler = PowerSampler(alpha=2.0, mcmc_steps=10, num_blocks=2, compaction=compaction)
    out = sampler.generate(tiny_hf_model, prompts, 12, attention_mask=mask, eos_token_id=EOS,
                           generator=[3, 4, 5])
    assert out.stats["compactions"] >= 1
    torch.testing.assert_close(out.log_p, _fresh_scores(tiny_hf_model, out), atol=2e-4, rtol=0)
    torch.testing.assert_close(out.log_q, _fresh_scores(tiny_hf_model, out, 0.5), atol=2e-4, rtol=0)
    assert (out.forward_tokens <= out.batch_forward_tokens).all()


def test_chain_does_not_depend_on_batch_mates(tiny_llama):
    sampler = PowerSampler(alpha=4.0, mcmc_steps=4, num_blocks=2)
    alone = sampler.generate(tiny_llama, torch.tensor([[5, 6, 7]]), 8, eos_token_id=EOS, generator=[42])
    prompts = torch.tensor([[0, 0, 9], [5, 6, 7], [0, 3, 4], [5, 6, 7]])
    batch = sampler.generate(tiny_llama, prompts, 8, attention_mask=(prompts != 0).long(), eos_token_id=EOS,
                             generator=[1, 42, 2, 3])
    assert batch.new_tokens[1, :int(batch.lengths[1])].tolist() == alone.new_tokens[0, :int(alone.lengths[0])].tolist()
    assert int(batch.accepted[1]) == int(alone.accepted[0])
    # same prompt, different seed: a different chain
    assert batch.new_tokens[3].tolist() != batch.new_tokens[1].tolist() or int(batch.accepted[3]) != int(
        batch.accepted[1])
    again = sampler.generate(tiny_llama, torch.tensor([[5, 6, 7]]), 8, eos_token_id=EOS, generator=[42])
    assert again.sequences.tolist() == alone.sequences.tolist()


def test_runs_on_tiny_qllm():
    qllm_model = pytest.importorskip("qllm_model")
    torch.manual_seed(0)
    config = qllm_model.QLLMConfig(max_seq_len=64, d_model=32, n_layers=2, n_heads=2, n_global_tokens=4)
    model = qllm_model.QLLM(config).eval()
    prompts = torch.tensor([[0, 0, 72, 105], [65, 66, 67, 68]])
    mask = (prompts != 0).long()
    eos = qllm_model.ByteTokenizer.eos_token_id
    out = PowerSampler(alpha=2.0, mcmc_steps=4, num_blocks=2).generate(
        model, prompts, 16, attention_mask=mask, eos_token_id=eos, generator=[0, 1])
    assert out.stats["compactions"] >= 1  # QLLM's cache goes through the generic re-prefill path
    torch.testing.assert_close(out.log_p, _fresh_scores(model, out), atol=2e-4, rtol=0)
    assert int(out.proposed.sum()) == 2 * 2 * 4


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
    stopped = out.proposed < steps * blocks
    assert stopped.any()
    ends = out.sequences[torch.arange(chains), out.prompt_length + out.lengths - 1]
    assert (ends[stopped] == EOS).all()
    # the exact chain keeps moving in later blocks even when its state already ended with EOS
    assert (exact.generate(model, ids, 3, eos_token_id=EOS, generator=list(range(chains))).proposed
            == steps * blocks).all()


def test_block_budgets():
    assert PowerSampler(num_blocks=4).budgets(10) == [3, 6, 9, 10]
    assert PowerSampler(block_size=4).budgets(8) == [4, 8]
    assert PowerSampler(num_blocks=16).budgets(3) == [1, 2, 3]
