"""Parity of qllm_samplers.warpers with transformers' logits processors, per-row parameters, errors."""

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

from qllm_samplers.warpers import (
    MinP,
    RepetitionPenalty,
    Temperature,
    TopK,
    TopP,
    Typical,
    candidate_probs,
    canonical_topk,
    nucleus_count,
    top_p_threshold,
)

B, V = 6, 300


def make_logits(kind: str, seed: int, batch: int = B, vocab: int = V) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, vocab, generator=g) * 3
    if kind == "tied":  # few distinct values: many exact ties
        x = (x / 1.5).round() * 1.5
    elif kind == "partly_inf":
        x = x.masked_fill(torch.rand(batch, vocab, generator=g) < 0.4, -math.inf)
        x[0, 1:], x[0, 0] = -math.inf, 1.0  # a row with a single finite logit
    elif kind == "large":
        x = x * 1e4 / 3
    elif kind == "small":
        x = x * 1e-4 / 3
    return x


KINDS = ["random", "tied", "partly_inf", "large", "small"]


def input_ids_for(batch: int = B, vocab: int = V, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, 40), generator=g)


def assert_same_kept(ours: torch.Tensor, ref: torch.Tensor, scores: torch.Tensor, ties_may_differ: bool) -> None:
    """Identical outputs; with ``ties_may_differ``, rows where exactly tied logits straddle the cut-off (where
    transformers' choice depends on sort order) only need the same number of kept tokens and the same values."""
    if not ties_may_differ:
        assert torch.equal(ours, ref)
        return
    kept_ours, kept_ref = torch.isfinite(ours), torch.isfinite(ref)
    assert torch.equal(kept_ours.sum(-1), kept_ref.sum(-1))
    for b in range(scores.shape[0]):
        lowest_kept = scores[b][kept_ref[b]].min()
        straddles = ((scores[b] == lowest_kept) & ~kept_ref[b]).any()
        if not straddles:
            assert torch.equal(ours[b], ref[b]), f"row {b}"
        else:
            assert torch.equal(ours[b].sort().values, ref[b].sort().values), f"row {b}"


# (ours, transformers', tie-straddling allowed to differ)
CASES = {
    "temperature": (lambda: Temperature(0.7), lambda: TemperatureLogitsWarper(0.7), False),
    "top_k": (lambda: TopK(10), lambda: TopKLogitsWarper(10), False),
    "top_k_min_keep": (lambda: TopK(2, min_tokens_to_keep=5), lambda: TopKLogitsWarper(2, min_tokens_to_keep=5),
                       False),
    "top_p_sort": (lambda: TopP(0.8), lambda: TopPLogitsWarper(0.8), False),
    "top_p_fast": (lambda: TopP(0.8, candidates=16), lambda: TopPLogitsWarper(0.8), False),
    "top_p_fast_min_keep": (lambda: TopP(0.3, min_tokens_to_keep=3, candidates=16),
                            lambda: TopPLogitsWarper(0.3, min_tokens_to_keep=3), False),
    "top_p_one": (lambda: TopP(1.0, candidates=16), lambda: TopPLogitsWarper(1.0), False),
    "min_p": (lambda: MinP(0.1), lambda: MinPLogitsWarper(0.1), False),
    "min_p_min_keep": (lambda: MinP(0.5, min_tokens_to_keep=3), lambda: MinPLogitsWarper(0.5, min_tokens_to_keep=3),
                       True),
    "typical": (lambda: Typical(0.9), lambda: TypicalLogitsWarper(0.9), True),
    "typical_low": (lambda: Typical(0.2, min_tokens_to_keep=2), lambda: TypicalLogitsWarper(0.2, min_tokens_to_keep=2),
                    True),
    "repetition": (lambda: RepetitionPenalty(1.3), lambda: RepetitionPenaltyLogitsProcessor(1.3), False),
    "repetition_reward": (lambda: RepetitionPenalty(0.8), lambda: RepetitionPenaltyLogitsProcessor(0.8), False),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_transformers(case, kind):
    ours_factory, ref_factory, ties_may_differ = CASES[case]
    for seed in range(3):
        scores = make_logits(kind, seed)
        ids = input_ids_for(seed=seed)
        ref = ref_factory()(ids, scores.clone())
        ours = ours_factory()(ids, scores.clone())
        assert_same_kept(ours, ref, scores, ties_may_differ)


PER_ROW = {
    "temperature": (lambda v: Temperature(v), lambda v: TemperatureLogitsWarper(v), [0.5, 1.0, 1.7, 0.05, 3.0, 0.9]),
    "top_k": (lambda v: TopK(v), lambda v: TopKLogitsWarper(v), [1, 5, 50, 299, 300, 2]),
    "top_p": (lambda v: TopP(v, candidates=16), lambda v: TopPLogitsWarper(v), [0.1, 0.5, 0.9, 1.0, 0.99, 0.7]),
    "min_p": (lambda v: MinP(v), lambda v: MinPLogitsWarper(v), [0.0, 0.05, 0.2, 1.0, 0.5, 0.01]),
    "typical": (lambda v: Typical(v), lambda v: TypicalLogitsWarper(v), [0.1, 0.5, 0.9, 0.99, 0.3, 0.7]),
    "repetition": (lambda v: RepetitionPenalty(v), lambda v: RepetitionPenaltyLogitsProcessor(v),
                   [0.5, 1.0, 1.2, 2.0, 1.05, 3.0]),
}


@pytest.mark.parametrize("kind", ["random", "partly_inf", "large"])
@pytest.mark.parametrize("case", list(PER_ROW))
def test_per_row_parameters_match_transformers_row_by_row(case, kind):
    ours_factory, ref_factory, values = PER_ROW[case]
    scores, ids = make_logits(kind, 11), input_ids_for(seed=11)
    ours = ours_factory(torch.tensor(values))(ids, scores.clone())
    for b, value in enumerate(values):
        ref = ref_factory(float(value) if case not in ("top_k",) else int(value))(ids[b:b + 1], scores[b:b + 1].clone())
        assert torch.equal(ours[b:b + 1], ref), f"row {b} ({case}={value})"


def test_temperature_zero_is_greedy_per_row():
    scores = make_logits("random", 3)
    scores[2, 7] = scores[2, 11] = scores[2].max() + 1  # a tie at the top: the lower id wins
    out = Temperature(torch.tensor([0.0, 2.0, 0.0, 1.0, 0.0, 0.5]))(None, scores)
    for b in (0, 2, 4):
        kept = torch.isfinite(out[b]).nonzero().flatten()
        assert kept.tolist() == [scores[b].argmax().item()]
        assert out[b, kept] == scores[b, kept]
    assert torch.isfinite(out[2]).nonzero().flatten().tolist() == [7]
    assert torch.equal(out[1], scores[1] / 2.0)
    assert torch.equal(Temperature(0.0)(None, scores).isfinite().sum(-1), torch.ones(B, dtype=torch.long))


def test_repetition_window_only_penalises_recent_tokens():
    scores, ids = make_logits("random", 5), input_ids_for(seed=5)
    ours = RepetitionPenalty(1.5, window=7)(ids, scores.clone())
    ref = RepetitionPenaltyLogitsProcessor(1.5)(ids[:, -7:], scores.clone())
    assert torch.equal(ours, ref)
    untouched = torch.ones_like(scores, dtype=torch.bool).scatter_(1, ids[:, -7:], False)
    assert torch.equal(ours[untouched], scores[untouched])
    assert not torch.equal(ours, RepetitionPenalty(1.5)(ids, scores.clone()))


def peaked_logits(batch: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vocab, generator=g) * (4 + 4 * torch.rand(batch, 1, generator=g))


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.97])
def test_fast_top_p_decides_most_rows_and_agrees(top_p):
    """The candidate path must actually be used (not just the fallback) and agree with transformers."""
    scores = peaked_logits(64, 20_000, seed=int(top_p * 100))
    values, ids = canonical_topk(scores, 128)
    probs, tail = candidate_probs(scores, ids)
    threshold = top_p_threshold(torch.full((64,), top_p, dtype=torch.float64))
    count, ok, _ = nucleus_count(values, probs, tail, 20_000, threshold, 1)
    ref = TopPLogitsWarper(top_p)(None, scores.clone())
    assert ok.float().mean() > 0.8
    assert torch.equal(count[ok], torch.isfinite(ref).sum(-1)[ok])
    assert torch.equal(TopP(top_p, candidates=128)(None, scores), ref)


def test_boundary_within_rounding_goes_to_the_sort_path():
    """Rows whose nucleus boundary sits exactly on 1 - top_p: float32 rounding decides, so the fast path must
    hand them to the exact path, and the result must still equal transformers'."""
    vocab, batch = 5_000, 32
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(batch, vocab, generator=g)
    scores[:, :3] = torch.tensor([9.0, 8.5, 8.0])
    # shift the top three so that their exact mass is 0.9: e^shift * top = 9 * rest
    top, rest = scores[:, :3].double().exp().sum(-1), scores[:, 3:].double().exp().sum(-1)
    scores[:, :3] += (9 * rest / top).log().float()[:, None]
    values, ids = canonical_topk(scores, 64)
    probs, tail = candidate_probs(scores, ids)
    _, ok, uncertain = nucleus_count(values, probs, tail, vocab, top_p_threshold(torch.full((batch,), 0.9)), 1)
    assert uncertain.all() and not ok.any()
    ref = TopPLogitsWarper(0.9)(None, scores.clone())
    assert set(torch.isfinite(ref).sum(-1).tolist()) == {3, 4}  # rounding decides, differently per row
    assert torch.equal(TopP(0.9, candidates=64)(None, scores), ref)


def test_top_p_ties():
    # all-equal rows: which tied tokens stay is transformers' own (its sort's order), so kept sets are identical
    for flat, top_p in [(torch.zeros(3, 1000), 0.05), (torch.zeros(3, 1000), 0.5), (torch.zeros(3, 1000), 0.901),
                        (torch.zeros(2, 100_000), 0.3)]:  # torch.sort is not stable on rows this long
        ours = TopP(top_p, candidates=64)(None, flat)
        ref = TopPLogitsWarper(top_p)(None, flat.clone())
        assert torch.equal(ours, ref)
    # ties away from the boundary are kept or dropped together, exactly as transformers does
    scores = peaked_logits(8, 4000, seed=3)
    scores[:, 100:103] = scores.max(dim=-1, keepdim=True).values + 1  # three-way tie at the top
    scores[:, 200:300] = -30.0  # a large tie deep in the tail
    ref = TopPLogitsWarper(0.95)(None, scores.clone())
    assert (torch.isfinite(ref).sum(-1) > 3).all()  # the tie group is inside every nucleus
    for candidates in (16, 512):
        assert torch.equal(TopP(0.95, candidates=candidates)(None, scores), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", ["flat", "peaked", "tied"])
def test_top_p_randomized_parity_without_sorting(shape, dtype):
    """Kept sets identical to TopPLogitsWarper over many rows, including rows wide enough for the histogram path
    (flat rows whose nucleus holds thousands of tokens) and rows with exact ties at the boundary."""
    g = torch.Generator().manual_seed({"flat": 1, "peaked": 2, "tied": 3}[shape])
    rows_checked = 0
    for vocab in (3000, 50_000):
        for top_p in (0.1, 0.5, 0.9, 0.95, 0.999):
            batch = 8
            if shape == "flat":
                scores = torch.randn(batch, vocab, generator=g) * torch.rand(batch, 1, generator=g) * 0.5
            elif shape == "peaked":
                scores = torch.randn(batch, vocab, generator=g) * (2 + 6 * torch.rand(batch, 1, generator=g))
            else:
                scores = (torch.randn(batch, vocab, generator=g) * 4).round() / 4
            scores = scores.to(dtype)
            for m in (1, 5):
                ref = TopPLogitsWarper(top_p, min_tokens_to_keep=m)(None, scores.clone())
                ours = TopP(top_p, min_tokens_to_keep=m)(None, scores.clone())
                assert torch.equal(ours, ref), (vocab, top_p, m)
                rows_checked += batch
    assert rows_checked == 160


def test_histogram_path_decides_flat_rows_without_the_sort():
    """Flat rows are decided by the histogram (not by the sort fallback), and the decision is transformers'."""
    from qllm_samplers.warpers import nucleus_by_histogram

    g = torch.Generator().manual_seed(5)
    scores = torch.randn(16, 60_000, generator=g) * 0.3
    threshold = top_p_threshold(torch.full((16,), 0.9, dtype=torch.float64))
    remove, ok = nucleus_by_histogram(scores, threshold, 1)
    assert ok.float().mean() >= 0.75  # the few boundaries within rounding distance go to the sort
    ref = TopPLogitsWarper(0.9)(None, scores.clone())
    assert torch.equal(~torch.isfinite(ref[ok]), remove[ok])
    assert (torch.isfinite(ref).sum(-1) > 10_000).all()  # nuclei far too wide for the top-k candidates


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.float32])
@pytest.mark.parametrize("case", ["temperature", "repetition", "repetition_reward", "top_p", "top_k", "min_p"])
def test_parity_in_every_dtype(case, dtype):
    """transformers divides by the Python float (computed in float32 for half precision); top-p's threshold is
    compared in the scores' dtype (exact 1 - top_p on float64 rows)."""
    factories = {
        "temperature": (lambda: Temperature(0.7), lambda: TemperatureLogitsWarper(0.7)),
        "repetition": (lambda: RepetitionPenalty(1.3), lambda: RepetitionPenaltyLogitsProcessor(1.3)),
        "repetition_reward": (lambda: RepetitionPenalty(0.8), lambda: RepetitionPenaltyLogitsProcessor(0.8)),
        "top_p": (lambda: TopP(0.9), lambda: TopPLogitsWarper(0.9)),
        "top_k": (lambda: TopK(10), lambda: TopKLogitsWarper(10)),
        "min_p": (lambda: MinP(0.1), lambda: MinPLogitsWarper(0.1)),
    }
    ours_factory, ref_factory = factories[case]
    for seed in range(3):
        scores = (make_logits("random", seed) * 2).to(dtype)
        ids = input_ids_for(seed=seed)
        assert torch.equal(ours_factory()(ids, scores.clone()), ref_factory()(ids, scores.clone()))
    # flat float64 rows: the threshold 1 - 0.9 must not be rounded to float32 (900 vs 901 kept tokens)
    flat = torch.zeros(1, 1000, dtype=dtype)
    assert torch.equal(TopP(0.9)(None, flat), TopPLogitsWarper(0.9)(None, flat.clone()))


def test_top_k_keeps_every_token_tied_with_the_kth():
    scores = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0]])
    assert torch.isfinite(TopK(2)(None, scores)).tolist() == [[True, True, True, True, False]]


def test_drop_in_for_transformers_generate(tiny_gpt2):
    prompt = torch.tensor([[5, 17, 5, 33, 21, 8]])
    common = dict(max_new_tokens=12, pad_token_id=0, top_k=None, top_p=None)
    greedy_ref = tiny_gpt2.generate(prompt, do_sample=False, repetition_penalty=1.8, **common)
    greedy_ours = tiny_gpt2.generate(prompt, do_sample=False, **common,
                                     logits_processor=LogitsProcessorList([RepetitionPenalty(1.8)]))
    assert torch.equal(greedy_ref, greedy_ours)
    torch.manual_seed(123)
    sampled_ref = tiny_gpt2.generate(prompt, do_sample=True, max_new_tokens=12, pad_token_id=0, temperature=0.8,
                                     top_k=20, top_p=0.9, min_p=0.05)
    torch.manual_seed(123)
    processors = LogitsProcessorList([Temperature(0.8), TopK(20), TopP(0.9), MinP(0.05)])
    sampled_ours = tiny_gpt2.generate(prompt, do_sample=True, **common, logits_processor=processors)
    assert torch.equal(sampled_ref, sampled_ours)


def test_scalar_and_tensor_parameters_give_the_same_bits():
    scores = make_logits("random", 8)
    for ours, per_row in [(TopP(0.9, candidates=16), TopP(torch.full((B,), 0.9), candidates=16)),
                          (MinP(0.1), MinP([0.1] * B)), (TopK(7), TopK(torch.full((B,), 7)))]:
        assert torch.equal(ours(None, scores), per_row(None, scores))


@pytest.mark.parametrize("factory, match", [
    (lambda: TopP(0.0), r"top_p must be a number in \(0.0, 1.0\]"),
    (lambda: TopP(1.5), r"top_p must be a number in \(0.0, 1.0\]"),
    (lambda: TopP(torch.tensor([0.5, float("nan")])), r"top_p .* got \[nan\]"),
    (lambda: TopK(0), r"top_k must be an integer in \[1, inf\)"),
    (lambda: TopK(2.5), r"top_k must be an integer"),
    (lambda: TopK(torch.tensor([3, -1])), r"top_k .* got \[-1"),
    (lambda: MinP(-0.1), r"min_p must be a number in \[0.0, 1.0\]"),
    (lambda: MinP(1.01), r"min_p must be a number in \[0.0, 1.0\]"),
    (lambda: Temperature(-1.0), r"temperature must be a number in \[0.0, 3.403e\+38\]"),
    (lambda: Temperature(math.inf), r"temperature must be a number in \[0.0, 3.403e\+38\], got inf"),
    (lambda: Temperature(1e300), r"temperature must be a number in \[0.0, 3.403e\+38\], got 1e\+300"),
    (lambda: Temperature(torch.tensor([1.0, math.inf])), r"temperature .* got \[inf\]"),
    (lambda: RepetitionPenalty(math.inf), r"penalty must be a number in \(0.0, 3.403e\+38\]"),
    (lambda: RepetitionPenalty(0.0), r"penalty must be a number in \(0.0, 3.403e\+38\]"),
    (lambda: RepetitionPenalty(1.2, window=0), r"window must be None or an integer >= 1"),
    (lambda: Typical(1.0), r"mass must be a number in \(0.0, 1.0\)"),
    (lambda: TopK(5, min_tokens_to_keep=0), r"min_tokens_to_keep must be an integer >= 1"),
    (lambda: TopP(torch.ones(2, 2) * 0.5), r"top_p: a per-row value must be a non-empty 1-D tensor"),
])
def test_bad_parameters_raise(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


@pytest.mark.parametrize("warper", [Temperature(0.7), TopK(3), TopP(0.9), TopP(0.9, candidates=8), MinP(0.1),
                                    Typical(0.9), RepetitionPenalty(1.2)], ids=repr)
def test_bad_logits_raise(warper):
    ids = input_ids_for(batch=2, vocab=50)
    nan = torch.randn(2, 50)
    nan[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        warper(ids, nan)
    dead = torch.randn(2, 50)
    dead[0] = -math.inf
    with pytest.raises(ValueError, match="no finite logit"):
        warper(ids, dead)
    pos_inf = torch.randn(2, 50)
    pos_inf[1, 0] = math.inf
    with pytest.raises(ValueError, match=r"\+inf"):
        warper(ids, pos_inf)


def test_per_row_parameter_batch_mismatch():
    with pytest.raises(ValueError, match="top_p has 3 per-row values but scores has 6 rows"):
        TopP(torch.tensor([0.5, 0.6, 0.7]))(None, make_logits("random", 0))


def test_overflowing_temperature_names_the_temperature():
    scores = torch.tensor([[1e4, -1e4, 0.0]], dtype=torch.float16)
    with pytest.raises(ValueError, match=r"temperature: dividing the logits by it leaves no finite logit"):
        Temperature(1e-3)(None, scores)
    with pytest.raises(ValueError, match=r"penalty: dividing the logits by it"):
        RepetitionPenalty(1e-30)(torch.tensor([[0]]), torch.tensor([[1e10, 0.0]]))
    huge = Temperature(1e38)(None, torch.tensor([[3.0, -math.inf, 1.0]]))  # finite, meaningful: nearly uniform
    assert torch.isfinite(huge[0, [0, 2]]).all() and huge[0, 1] == -math.inf


@pytest.mark.parametrize("input_ids, match", [
    (torch.zeros(3, 4, dtype=torch.long), r"input_ids has 3 rows but scores has 2"),
    (torch.zeros(2, 4), r"input_ids must be an integer tensor of token ids, got torch.float32"),
    (torch.tensor([[0, -1], [1, 2]]), r"input_ids must be token ids >= 0, got -1"),
    (None, r"input_ids: RepetitionPenalty needs the tokens so far"),
])
def test_bad_input_ids_raise(input_ids, match):
    with pytest.raises(ValueError, match=match):
        RepetitionPenalty(1.2)(input_ids, torch.randn(2, 10))


@pytest.mark.parametrize("warper", [Temperature(0.7), TopK(3), TopP(0.9), MinP(0.1), Typical(0.9),
                                    RepetitionPenalty(1.2)], ids=repr)
def test_empty_vocabulary_raises(warper):
    with pytest.raises(ValueError, match=r"scores: the vocabulary is empty"):
        warper(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 0))


def test_capabilities_are_declared():
    assert (Temperature.truncating, Temperature.reads_input_ids) == (False, False)
    for warper in (TopK, TopP, MinP, Typical):
        assert (warper.truncating, warper.reads_input_ids) == (True, False)
    assert (RepetitionPenalty.truncating, RepetitionPenalty.reads_input_ids) == (False, True)
