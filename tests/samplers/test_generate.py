"""The decode loop: token-for-token parity with transformers' generate, padding, EOS, seeding, errors."""

import pytest
import torch

from qllm_samplers.generate import generate
from qllm_samplers.rng import RowRNG


class Argmax:
    def select(self, scores, state, rng):
        return scores.argmax(dim=-1)


def _padded_prompts(vocab: int, lengths=(7, 3, 5), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[row, width - n:] = 1
    return ids, mask


def _hf_greedy(model, ids, mask, max_new_tokens, eos):
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=eos, pad_token_id=eos, top_k=None, top_p=None, temperature=None)
    return out


def test_greedy_matches_transformers_with_left_padding(tiny_hf_model):
    model = tiny_hf_model
    ids, mask = _padded_prompts(model.config.vocab_size)
    ours = generate(model, ids, attention_mask=mask, sampler=Argmax(), max_new_tokens=12)
    theirs = _hf_greedy(model, ids, mask, 12, eos=None)
    assert torch.equal(ours.sequences, theirs)
    assert ours.lengths.tolist() == [12, 12, 12]


def test_per_row_eos_stop_matches_transformers(tiny_hf_model):
    model = tiny_hf_model
    ids, mask = _padded_prompts(model.config.vocab_size, seed=3)
    free = generate(model, ids, attention_mask=mask, sampler=Argmax(), max_new_tokens=10)
    eos = int(free.new_tokens[1, 2])  # a token row 1 emits at step 2: rows stop at different times
    ours = generate(model, ids, attention_mask=mask, sampler=Argmax(), max_new_tokens=10, eos_token_id=eos)
    theirs = _hf_greedy(model, ids, mask, 10, eos=eos)
    assert torch.equal(ours.sequences, theirs[:, : ours.sequences.shape[1]])
    assert int(ours.lengths[1]) <= 3
    for row in range(ids.shape[0]):
        n = int(ours.lengths[row])
        assert (ours.new_tokens[row, n:] == eos).all()  # padded with EOS after the stop, as HF does
        assert (ours.logprobs[row, n:] == 0).all()


def test_logprobs_are_base_model_log_softmax(tiny_gpt2):
    ids, mask = _padded_prompts(tiny_gpt2.config.vocab_size, lengths=(4, 6))
    out = generate(tiny_gpt2, ids, attention_mask=mask, sampler=Argmax(), max_new_tokens=5)
    full_mask = torch.cat([mask, torch.ones(2, 5, dtype=torch.long)], dim=1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    logits = tiny_gpt2(input_ids=out.sequences, attention_mask=full_mask, position_ids=positions).logits
    expected = torch.log_softmax(logits[:, ids.shape[1] - 1:-1].float(), -1).gather(2, out.new_tokens[..., None])
    torch.testing.assert_close(out.logprobs, expected.squeeze(-1), atol=1e-4, rtol=1e-4)


def test_seeded_row_independent_of_batch_mates(tiny_llama):
    """A request seeded with s produces the same tokens alone and in the middle of a different batch."""
    vocab = tiny_llama.config.vocab_size
    target, _ = _padded_prompts(vocab, lengths=(5,), seed=11)
    others, _ = _padded_prompts(vocab, lengths=(5, 5, 5, 5), seed=12)
    batch = torch.cat([others[:2], target, others[2:]])

    def sample_all(scores, state, rng):
        return rng.categorical(scores)

    class Sampler:
        select = staticmethod(sample_all)

    alone = generate(tiny_llama, target, sampler=Sampler(), max_new_tokens=15, generator=[1234])
    mixed = generate(tiny_llama, batch, sampler=Sampler(), max_new_tokens=15, generator=[7, 8, 1234, 9, 10])
    assert torch.equal(alone.new_tokens[0], mixed.new_tokens[2])
    assert not torch.equal(mixed.new_tokens[0], mixed.new_tokens[2])


def test_hf_warper_list_is_accepted(tiny_gpt2):
    from transformers import TopKLogitsWarper

    ids, mask = _padded_prompts(tiny_gpt2.config.vocab_size, lengths=(4,))
    out = generate(tiny_gpt2, ids, sampler=[TopKLogitsWarper(1)], max_new_tokens=6, generator=[0])
    greedy = generate(tiny_gpt2, ids, sampler=Argmax(), max_new_tokens=6)
    assert torch.equal(out.sequences, greedy.sequences)


def test_row_rng_categorical_matches_exact_distribution():
    probs = torch.tensor([0.05, 0.0, 0.15, 0.3, 0.5])
    n = 40000
    rng = RowRNG(torch.arange(n))
    draws = rng.categorical(probs.log().expand(n, -1))
    counts = torch.bincount(draws, minlength=5).double()
    assert counts[1] == 0  # zero-probability token never drawn
    keep = probs > 0
    expected = probs[keep].double() * n
    stat = ((counts[keep] - expected) ** 2 / expected).sum()
    p_value = torch.special.gammaincc((keep.sum() - 1).double() / 2, stat / 2)
    assert p_value > 0.01


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 200}, "context limit"),
    ],
)
def test_bad_arguments(tiny_gpt2, kwargs, match):
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match=match):
        generate(tiny_gpt2, ids, sampler=Argmax(), **kwargs)


def test_nan_logits_raise():
    class NanModel(torch.nn.Module):
        config = None

        def forward(self, input_ids, **kwargs):
            class Out:
                logits = torch.full((*input_ids.shape, 11), float("nan"))
                past_key_values = None

            return Out()

    with pytest.raises(ValueError, match="NaN"):
        generate(NanModel(), torch.tensor([[1, 2]]), sampler=Argmax(), max_new_tokens=3)


def test_output_counts_each_rows_work(tiny_llama):
    """forward_tokens is per row (real prompt tokens + fed tokens, none after a row's end); model_calls sequential."""
    ids, mask = _padded_prompts(tiny_llama.config.vocab_size)
    out = generate(tiny_llama, ids, attention_mask=mask, sampler=Argmax(), max_new_tokens=6)
    assert out.forward_tokens.dtype == torch.long
    assert out.forward_tokens.tolist() == [n + 5 for n in mask.sum(1).tolist()]
    assert out.model_calls == 6
    assert torch.equal(out.attention_mask, torch.cat([mask, torch.ones(3, 6, dtype=mask.dtype)], dim=1))
    torch.testing.assert_close(out.log_p, out.logprobs.double().sum(1))
    eos = int(out.new_tokens[1, 1])  # row 1 stops after 2 tokens: it stops counting there
    stopped = generate(tiny_llama, ids, attention_mask=mask, sampler=Argmax(), max_new_tokens=6, eos_token_id=eos)
    n = int(stopped.lengths[1])
    assert stopped.forward_tokens[1] == int(mask[1].sum()) + n - 1
    assert stopped.attention_mask[1, ids.shape[1]:].tolist() == [1] * n + [0] * (stopped.new_tokens.shape[1] - n)


class _Hooked:
    def __init__(self):
        self.calls = []

    def begin(self, model, batch_size):
        self.calls.append(("begin", batch_size))

    def end(self):
        self.calls.append(("end",))

    def stats(self):
        return {"steps": sum(1 for c in self.calls if c[0] == "select")}

    def select(self, scores, state, rng):
        self.calls.append(("select",))
        return scores.argmax(dim=-1)


def test_optional_hooks_are_called(tiny_gpt2):
    sampler = _Hooked()
    out = generate(tiny_gpt2, torch.tensor([[5, 6]]), sampler=sampler, max_new_tokens=3)
    assert sampler.calls[0] == ("begin", 1) and sampler.calls[-1] == ("end",)
    assert out.stats == {"steps": 3}


def test_sequence_sampler_goes_through_generate(tiny_llama):
    """One entry point and one output type for token and sequence samplers (the sampler contract)."""
    from qllm_samplers.generate import GenerateOutput, SequenceSampler, TokenSampler
    from qllm_samplers.power import PowerSampler
    from qllm_samplers.smc import PowerSMC

    ids = torch.tensor([[0, 5, 6], [7, 8, 9]])
    mask = (ids != 0).long()
    for sampler in (PowerSampler(alpha=2.0, mcmc_steps=2, num_blocks=2), PowerSMC(alpha=2.0, particles=3)):
        assert isinstance(sampler, SequenceSampler) and not isinstance(sampler, TokenSampler)
        direct = sampler.generate(tiny_llama, ids, 8, attention_mask=mask, eos_token_id=2, generator=[1, 2])
        out = generate(tiny_llama, ids, sampler=sampler, max_new_tokens=8, attention_mask=mask, eos_token_id=2,
                       generator=[1, 2], pad_token_id=99)
        assert isinstance(out, GenerateOutput)
        assert out.lengths.tolist() == direct.lengths.tolist()
        for row in range(2):
            n = int(out.lengths[row])
            assert out.new_tokens[row, :n].tolist() == direct.new_tokens[row, :n].tolist()
            assert (out.new_tokens[row, n:] == 99).all()
        assert out.forward_tokens.shape == (2,) and out.model_calls >= 1
        assert out.logprobs.shape == out.new_tokens.shape
    with pytest.raises(ValueError, match="SequenceSampler"):
        generate(tiny_llama, ids, sampler=42, max_new_tokens=2)
