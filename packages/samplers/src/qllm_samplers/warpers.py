"""Classic logit warpers with transformers' semantics, per-row parameters and a sort-free top-p.

Each warper is a callable ``(input_ids [B, T], scores [B, V]) -> scores [B, V]`` that computes exactly what the
transformers processor of the same name computes (``TemperatureLogitsWarper``, ``TopKLogitsWarper``,
``TopPLogitsWarper``, ``MinPLogitsWarper``, ``TypicalLogitsWarper``, ``RepetitionPenaltyLogitsProcessor``), so
they drop into ``model.generate(logits_processor=LogitsProcessorList([...]))``. Beyond transformers:

- every parameter may be a per-row tensor of shape [B] (one request per row, as vLLM does);
- ``Temperature(0)`` (per row) is greedy: the row keeps only its argmax;
- ``RepetitionPenalty(window=N)`` only looks at the last N tokens;
- ``TopP`` does not sort the vocabulary (see ``top_p_fast``).

Tie rule: among exactly tied logits, the lower token id counts as the more probable one (as ``argmax`` does).
transformers leaves this to the order ``torch.sort`` happens to produce; it only matters when tied tokens
straddle a cut-off (top-p's nucleus boundary, ``min_tokens_to_keep``, typical's sorted order).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .lm import check_logits

ParamLike = float | int | Sequence[float] | torch.Tensor

FLOAT32_ROUNDOFF = 2.0**-24
# The fast top-p path reproduces the float32 arithmetic of transformers' sorted softmax + cumsum only up to a
# bound; rows whose nucleus boundary lies inside that bound are recomputed with the exact sort path. The bound
# on transformers' float32 sum assumes its softmax kernel accumulates in >= 8 vector lanes (true for PyTorch's
# CPU kernels: 8 lanes on AVX2/NEON, 16 on AVX512).
SUM_LANES = 8
SLACK_ROUNDOFFS = 64  # per-element exp / rounding / our own float32 tail sum, generously
TINY = 1e-30  # absolute slack: float32 underflow to 0 or denormals
# The histogram top-p path compares float64 masses (renormalised exactly) with transformers' float32 ones, whose
# normaliser is the float32 sum of the *sorted* (ascending) row: measured within 7.6e-7 relative of the exact sum
# over 240 rows (V = 32,000 to 151,936, flat to peaked). Boundaries closer than this bound go to the sort. (A
# worst-case bound for float32 summation, ~V/8 ulps, would send every flat row to the sort.) PyTorch's CPU cumsum
# accumulates float32 in float64, so the normaliser is the only float32 sum whose order matters.
NORMALISER_RELATIVE_ERROR = 2e-6
HISTOGRAM_BINS = 4096
MAX_BOUNDARY_TOKENS = 4096  # a boundary bin with more tokens than this (near-constant rows) is sorted instead
EXP_UNDERFLOW = 104.0  # exp(x) is exactly 0 in float32 below -103.97


# ----------------------------------------------------------------------------------------------------------------
# parameters and checks


FLOAT32_MAX = float(torch.finfo(torch.float32).max)

# Allowed ranges, keyed by the name SamplingChain (and the sampler specs) use; each warper validates its own
# constructor argument with the same range under its own name (Typical's ``mass``, RepetitionPenalty's ``penalty``).
# Temperature and penalty must be finite in float32: above that their float32 value is inf, and -inf / inf is NaN.
PARAMETER_RANGES: dict[str, dict] = {
    "temperature": dict(low=0.0, high=FLOAT32_MAX),
    "top_k": dict(low=1, integer=True),
    "top_p": dict(low=0.0, high=1.0, low_open=True),
    "min_p": dict(low=0.0, high=1.0),
    "typical_p": dict(low=0.0, high=1.0, low_open=True, high_open=True),
    "repetition_penalty": dict(low=0.0, high=FLOAT32_MAX, low_open=True),
}


def validate_parameter(value: ParamLike, name: str, *, low: float, high: float = math.inf, low_open: bool = False,
                       high_open: bool = False, integer: bool = False) -> float | int | torch.Tensor:
    """Validate a scalar or per-row parameter once (at construction, never in the hot path).

    Returns a Python number, or a CPU [B] tensor (float64, or int64 for integers). NaN, inf and values outside
    the range raise a ValueError naming ``name`` and the allowed range.
    """
    lo, hi = ("(" if low_open else "["), (")" if high_open or high == math.inf else "]")
    allowed = f"{lo}{low}, {'inf' if high == math.inf else (high if high < 1e6 else f'{high:.4g}')}{hi}"
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool):
        raise ValueError(f"{name} must be {kind} in {allowed}, got {value!r}")
    if isinstance(value, (int, float)):
        tensor = torch.tensor([value], dtype=torch.float64)
        scalar = True
    else:
        try:
            tensor = torch.as_tensor(value).detach().cpu()
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"{name} must be {kind} or a per-row 1-D tensor, got {type(value).__name__}") from err
        if tensor.dim() != 1 or tensor.numel() == 0:
            raise ValueError(f"{name}: a per-row value must be a non-empty 1-D tensor [B], got shape "
                             f"{tuple(tensor.shape)}")
        scalar = False
    if integer and (tensor.is_floating_point() and not torch.equal(tensor, tensor.round())):
        raise ValueError(f"{name} must be {kind} in {allowed}, got {value!r}")
    tensor = tensor.to(torch.float64)
    too_low = tensor <= low if low_open else tensor < low
    too_high = tensor >= high if high_open else tensor > high
    bad = torch.isnan(tensor) | too_low | too_high | torch.isinf(tensor)
    if bad.any():
        shown = value if scalar else tensor[bad].tolist()
        raise ValueError(f"{name} must be {kind} in {allowed}, got {shown}")
    if scalar:
        return int(value) if integer else float(value)
    return tensor.to(torch.int64) if integer else tensor


def _min_tokens(min_tokens_to_keep: int) -> int:
    if isinstance(min_tokens_to_keep, bool) or not isinstance(min_tokens_to_keep, int) or min_tokens_to_keep < 1:
        raise ValueError(f"min_tokens_to_keep must be an integer >= 1, got {min_tokens_to_keep!r}")
    return min_tokens_to_keep


def rows(param: float | int | torch.Tensor, batch: int, device: torch.device, name: str) -> torch.Tensor:
    """A parameter as a [B] tensor (float64 or int64) on ``device``."""
    if isinstance(param, torch.Tensor):
        if param.shape[0] != batch:
            raise ValueError(f"{name} has {param.shape[0]} per-row values but scores has {batch} rows")
        return param.to(device)
    dtype = torch.int64 if isinstance(param, int) else torch.float64
    return torch.full((batch,), param, dtype=dtype, device=device)


def check_scores(scores: torch.Tensor, row_max: torch.Tensor | None = None) -> None:
    """ValueError on a non-[B, V] tensor, NaN, a row with no finite logit, or +inf.

    Uses the row maximum (which NaN propagates into and which the caller often has already), so the check costs
    at most one pass; only when it fails do we run ``check_logits`` for its message.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be a [batch, vocab] tensor, got shape {tuple(scores.shape)}")
    if scores.shape[1] == 0:
        raise ValueError("scores: the vocabulary is empty (shape [batch, 0]); allowed: at least one token")
    if not scores.is_floating_point():
        raise ValueError(f"scores must be a floating-point tensor of logits, got {scores.dtype}")
    if row_max is None:
        row_max = scores.amax(dim=-1)
    if not torch.isfinite(row_max).all():
        check_logits(scores, "scores")
        raise ValueError("scores: a logit is +inf; allowed: finite values or -inf")


def check_scaled(scaled: torch.Tensor, raw: torch.Tensor, cause: str, row_max: torch.Tensor | None = None) -> None:
    """``check_scores`` for logits after division by a temperature or penalty: when ``raw`` was fine, a NaN,
    +inf or all -inf row in ``scaled`` is the parameter's fault, and the message names it."""
    if row_max is None and scaled.dim() == 2 and scaled.shape[1] > 0:
        row_max = scaled.amax(dim=-1)
    if row_max is not None and torch.isfinite(row_max).all():
        return
    check_scores(raw)
    raise ValueError(f"{cause}: dividing the logits by it leaves no finite logit in some row ({scaled.dtype} "
                     f"overflows, max |logit| {float(raw[torch.isfinite(raw)].abs().max()):.4g}); allowed: a value "
                     f"for which |logit| / {cause} stays below {float(torch.finfo(scaled.dtype).max):.4g}")


def check_input_ids(input_ids: torch.Tensor | None, batch: int, needed_by: str, *, values: bool = True) -> None:
    """ValueError unless ``input_ids`` are integer token ids >= 0 with one row per row of scores.
    ``values=False`` checks only the shape and dtype (no host sync), for callers whose ids reach a full check
    later in the same step."""
    if input_ids is None:
        raise ValueError(f"input_ids: {needed_by} needs the tokens so far, got None")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() not in (1, 2):
        raise ValueError(f"input_ids must be a [batch, length] tensor of token ids, got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    if input_ids.is_floating_point() or input_ids.dtype == torch.bool or input_ids.is_complex():
        raise ValueError(f"input_ids must be an integer tensor of token ids, got {input_ids.dtype}")
    if input_ids.shape[0] != batch:
        raise ValueError(f"input_ids has {input_ids.shape[0]} rows but scores has {batch}; allowed: one row of "
                         "token ids per row of scores")
    if values and input_ids.numel() and bool((input_ids < 0).any()):
        raise ValueError(f"input_ids must be token ids >= 0, got {int(input_ids.min())}")


# ----------------------------------------------------------------------------------------------------------------
# functional cores (per-row parameters as [B] tensors); the classes below validate and call these


def keep_argmax(scores: torch.Tensor, filter_value: float = -math.inf) -> torch.Tensor:
    """Each row keeps only its first maximal logit (greedy)."""
    best = scores.argmax(dim=-1, keepdim=True)
    return torch.full_like(scores, filter_value).scatter_(1, best, scores.gather(1, best))


def divide_rows(scores: torch.Tensor, divisor: torch.Tensor) -> torch.Tensor:
    """``scores / divisor[:, None]`` computed as transformers computes ``scores / python_float``.

    PyTorch divides a tensor by a Python scalar in the dtype's "opmath" type: float32 for float16/bfloat16 (the
    result rounded once to the scores' dtype), the dtype itself otherwise (a float32 tensor divides by the scalar
    rounded to float32). Rounding the divisor to float16 first, as ``divisor.to(scores.dtype)`` would, changes
    the result by up to 0.03 at temperature 0.7.
    """
    compute = torch.float32 if scores.dtype in (torch.float16, torch.bfloat16) else scores.dtype
    return (scores.to(compute) / divisor.to(compute)[:, None]).to(scores.dtype)


def multiply_rows(scores: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``scores * factor[:, None]`` in transformers' arithmetic (see ``divide_rows``)."""
    compute = torch.float32 if scores.dtype in (torch.float16, torch.bfloat16) else scores.dtype
    return (scores.to(compute) * factor.to(compute)[:, None]).to(scores.dtype)


def apply_temperature(scores: torch.Tensor, temperature: torch.Tensor, any_greedy: bool = True) -> torch.Tensor:
    greedy = temperature == 0
    scaled = divide_rows(scores, torch.where(greedy, 1.0, temperature))
    if not any_greedy:
        return scaled
    return torch.where(greedy[:, None], keep_argmax(scores), scaled)


def apply_top_k(scores: torch.Tensor, top_k: torch.Tensor | int, k_max: int, filter_value: float) -> torch.Tensor:
    """``top_k`` already includes min_tokens_to_keep (transformers keeps max(top_k, min_tokens_to_keep)).

    One ``torch.topk`` and one select, the work transformers does. With one k for every row the k-th value is the
    minimum of an unsorted top-k (no sort of the k values); per-row k needs them sorted to pick each row's k-th.
    """
    vocab = scores.shape[-1]
    if isinstance(top_k, int):
        values = scores.topk(min(top_k, vocab), dim=-1, sorted=False).values
        check_scores(scores, values.amax(dim=-1))
        kth = values.amin(dim=-1, keepdim=True)
    else:
        values = scores.topk(min(k_max, vocab), dim=-1).values
        check_scores(scores, values[:, 0])
        kth = values.gather(1, (top_k.clamp(max=min(k_max, vocab)) - 1)[:, None])  # transformers clamps k to V
    # where(keep) is one fused pass; `scores < kth` + masked_fill is two (NaN never gets here: check_scores).
    return torch.where(scores >= kth, scores, filter_value)


def canonical_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest logits per row, ordered by (value descending, token id ascending): the tie rule."""
    values, ids = scores.topk(k, dim=-1)
    ids, order = ids.sort(dim=-1)
    values = values.gather(1, order)
    values, order = values.sort(dim=-1, descending=True, stable=True)
    return values, ids.gather(1, order)


def top_p_threshold(top_p: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float64 value transformers' comparison ``cumulative_probs <= 1 - top_p`` effectively uses.

    PyTorch compares a tensor with a Python float in the tensor's dtype, so 1 - top_p is rounded to float32 for
    float32 scores (and to float16/bfloat16 for those) but kept exact for float64 scores.
    """
    return (1.0 - top_p.to(torch.float64)).to(dtype).to(torch.float64)


def top_p_sorted(scores: torch.Tensor, threshold: torch.Tensor, min_tokens_to_keep: int,
                 filter_value: float) -> torch.Tensor:
    """transformers' algorithm itself (sort, softmax, cumulative sum from the low end, same kernels).

    Which of several exactly tied tokens straddling the cut stay is whatever ``torch.sort`` (not stable) puts
    last; the fast paths send such rows here, so kept sets are transformers' ties included.
    """
    vocab = scores.shape[-1]
    values, ids = scores.sort(dim=-1)
    cumulative = values.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= threshold.to(cumulative.dtype)[:, None]  # exact: threshold is already in that dtype
    remove[:, vocab - min(min_tokens_to_keep, vocab):] = False
    return scores.masked_fill(remove.scatter(1, ids, remove), filter_value)


def cut_splits_tie(values: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Whether keeping the first ``count`` of the descending ``values`` [B, K] separates exactly tied tokens
    (then which of them transformers keeps depends on its sort's order, and only the sort path reproduces it)."""
    k = values.shape[1]
    inside = (count >= 1) & (count < k)
    last = values.gather(1, (count.clamp(min=1, max=k) - 1)[:, None])[:, 0]
    first_out = values.gather(1, count.clamp(min=0, max=k - 1)[:, None])[:, 0]
    return inside & (last == first_out)


def nucleus_count(values: torch.Tensor, probs: torch.Tensor, tail: torch.Tensor, vocab: int,
                  threshold: torch.Tensor, min_tokens_to_keep: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """How many of the canonically ordered candidates transformers' top-p keeps, and whether that is certain.

    ``values`` [B, K]: candidate logits (canonical order); ``probs`` [B, K] and ``tail`` [B]: float64
    probabilities of the candidates and total probability of everything else, in the row being filtered.
    Returns (count, ok, uncertain): ``ok`` rows are decided; ``uncertain`` rows have their boundary within
    rounding distance (only the exact sort path can decide them); other rows need more candidates.

    transformers keeps the token at descending rank r iff float32(mass of ranks >= r) > float32(1 - top_p),
    with the mass summed in float32 from the low end over its own float32 softmax. We compute that mass in
    float64 and call a row certain when no rank's mass is within ``eps`` of the threshold, where ``eps`` bounds
    the difference between the two computations: the error of transformers' float32 softmax denominator
    (recursive summation in SUM_LANES lanes over the ascending sort: at most u * sum_i p_i * (rank_i / lanes + 1)
    plus the lane reduction; tokens outside the candidates have rank <= V) plus per-element rounding. top_p = 1
    rows (where only float32 underflow decides) are always left to the sort path.
    """
    batch, k = values.shape
    rank = torch.arange(1, k + 1, device=values.device, dtype=torch.float64)
    mass_below = tail[:, None] + probs.flip(-1).cumsum(-1).flip(-1)  # mass of rank r and everything below it
    sum_error = FLOAT32_ROUNDOFF * (5 + (probs * (rank / SUM_LANES + 1)).sum(-1) + tail * (vocab / SUM_LANES + 1))
    thr = threshold.to(torch.float64)[:, None]
    eps = (mass_below + thr) * (sum_error[:, None] + SLACK_ROUNDOFFS * FLOAT32_ROUNDOFF) + TINY
    keep = mass_below > thr
    # ranks below min_tokens_to_keep are kept whatever their mass; a zero mass is exact in both computations
    matters = (rank > min_tokens_to_keep) & (mass_below > 0)
    uncertain = (((mass_below - thr).abs() <= eps) & matters).any(-1) | (threshold <= 0)
    count = keep.sum(-1).clamp(min=min_tokens_to_keep)
    ok = ~uncertain & prefix_inside(values, count) & ~cut_splits_tie(values, count)
    return count, ok, uncertain


def prefix_inside(values: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Whether the first ``count`` candidates are exactly the row's top ``count`` tokens with nothing outside the
    candidates tied to the last one: true when the last kept value is strictly above the smallest candidate."""
    k = values.shape[1]
    last = values.gather(1, (count.clamp(min=1, max=k) - 1)[:, None])[:, 0]
    return (count < k) & (last > values[:, -1])


def candidate_probs(scores: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 probabilities of the candidate ids and the total probability of all other tokens.

    Uses the same float32 softmax kernel transformers uses (so the per-token exponentials agree); the tail is
    summed on its own so that its rounding error is relative to the tail, not to the whole row.
    """
    probs = scores.softmax(dim=-1)
    picked = probs.gather(1, ids).to(torch.float64)
    tail = probs.scatter_(1, ids, 0.0).sum(-1).to(torch.float64)
    total = tail + picked.sum(-1)
    return picked / total[:, None], tail / total


_SCRATCH = threading.local()


def scratch(name: str, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A per-thread scratch tensor kept between calls (its contents are garbage): the hot path's large
    temporaries reuse mapped memory instead of faulting in fresh pages each step."""
    buffer = getattr(_SCRATCH, name, None)
    if buffer is None or buffer.shape != shape or buffer.dtype != dtype or buffer.device != device:
        buffer = torch.empty(shape, dtype=dtype, device=device)
        setattr(_SCRATCH, name, buffer)
    return buffer


def nucleus_by_histogram(scores: torch.Tensor, threshold: torch.Tensor, min_tokens_to_keep: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' top-p removal mask of float32 rows without sorting: ``(remove [B, V], ok [B])``.

    One softmax and one histogram of the probability mass over ``HISTOGRAM_BINS`` equal-width logit bins (a
    scatter-add, since the logit order is the probability order) locate the bin holding the nucleus boundary.
    Only that bin's tokens are ordered (a ``torch.topk`` of a few hundred values on flat rows): every token below
    it is removed, every token above it kept, and inside it transformers' rule (remove while the float32
    cumulative mass from the low end is <= 1 - top_p, ties broken by the tie rule) is applied to float64 masses.

    ``ok`` is False where the answer is not certain to be transformers': a boundary mass within
    ``NORMALISER_RELATIVE_ERROR`` of the threshold (transformers normalises by a float32 sum of the sorted row,
    a few ulps from the exact sum we use), a boundary bin with more than ``MAX_BOUNDARY_TOKENS`` tokens, or fewer kept
    tokens than ``min_tokens_to_keep``. The caller sorts those rows.
    """
    batch, vocab = scores.shape
    probs = scores.softmax(dim=-1)
    row_max = scores.amax(dim=-1, keepdim=True)
    # Tokens more than EXP_UNDERFLOW below the maximum have probability exactly 0: they all share bin 0.
    low = torch.maximum(scores.amin(dim=-1, keepdim=True), row_max - EXP_UNDERFLOW)
    scale = HISTOGRAM_BINS / (row_max - low).clamp(min=1e-30)
    # copy_ into reused buffers: a fresh [B, V] 64-bit tensor costs ~10 ms of page faults per call on a CPU.
    bins = scratch("top_p_bins", scores.shape, torch.int64, scores.device).copy_(
        (scores - low).mul_(scale).clamp_(0, HISTOGRAM_BINS - 1))  # truncation: monotone in the logit
    probs64 = scratch("top_p_probs64", scores.shape, torch.float64, scores.device).copy_(probs)
    mass = torch.zeros(batch, HISTOGRAM_BINS, dtype=torch.float64, device=scores.device)
    cumulative = mass.scatter_add_(1, bins, probs64).cumsum(dim=-1)
    # Our float32 normaliser (the row summed as given, large and small values mixed) can be off by 1e-5; the
    # exponentials themselves are transformers', so renormalising in float64 leaves only its normaliser's error.
    total = cumulative[:, -1:]
    cumulative = cumulative / total
    thr = threshold[:, None]
    boundary = (cumulative <= thr).sum(dim=-1).clamp(max=HISTOGRAM_BINS - 1)
    below = torch.where(boundary > 0, cumulative.gather(1, (boundary - 1).clamp(min=0)[:, None])[:, 0], 0.0)
    in_bin = bins == boundary[:, None]
    counts = in_bin.sum(dim=-1)
    width = max(1, min(int(counts.max()), MAX_BOUNDARY_TOKENS))
    values, ids = canonical_topk(torch.where(in_bin, scores, -math.inf), width)
    valid = torch.arange(width, device=scores.device)[None, :] < counts[:, None]
    picked = probs.gather(1, ids).to(torch.float64) * valid / total
    # Canonical order is descending, so the ascending mass up to and including candidate i is everything after it.
    mass_through = below[:, None] + picked.flip(-1).cumsum(-1).flip(-1)
    remove_in_bin = (mass_through <= thr) & valid
    kept_in_bin = counts - remove_in_bin.sum(dim=-1)
    margin = NORMALISER_RELATIVE_ERROR + 4 * FLOAT32_ROUNDOFF
    close = ((mass_through - thr).abs() <= margin * mass_through + TINY) & valid
    ok = ~close.any(dim=-1) & ((below - threshold).abs() > margin * below + TINY) & (counts <= MAX_BOUNDARY_TOKENS)
    ok &= threshold > 0  # top_p = 1: only float32 underflow decides, which only the sort reproduces
    ok &= ~cut_splits_tie(values.masked_fill(~valid, -math.inf), kept_in_bin) | (kept_in_bin == counts)
    remove = bins < boundary[:, None]
    remove.scatter_(1, ids, remove_in_bin | remove.gather(1, ids))
    if min_tokens_to_keep > 1:
        ok &= vocab - remove.sum(dim=-1) >= min_tokens_to_keep
    return remove, ok


def top_p_fast(scores: torch.Tensor, top_p: torch.Tensor, min_tokens_to_keep: int, filter_value: float,
               candidates: int = 512) -> torch.Tensor:
    """transformers' top-p without sorting the vocabulary (float32 rows; other dtypes take the sort).

    Peaked rows: the nucleus is a prefix of the tokens in descending order, so it is found among the
    ``torch.topk`` candidates once the row's normaliser is known (``nucleus_count``). Other rows (flat rows,
    whose nucleus holds thousands of tokens): ``nucleus_by_histogram``. Rows neither can decide with certainty
    go through the exact sort path, so the kept set is always transformers'.
    """
    batch, vocab = scores.shape
    if scores.dtype != torch.float32:
        check_scores(scores)
        return top_p_sorted(scores, top_p_threshold(top_p, scores.dtype), min_tokens_to_keep, filter_value)
    threshold = top_p_threshold(top_p)
    out = torch.full_like(scores, filter_value)
    k = max(candidates, min_tokens_to_keep + 1)
    # Flat rows: when even k tokens at the row's largest probability cannot reach the nucleus mass, the candidate
    # search must fail; skip it when that holds for every row (only the speed depends on this test).
    if 2 * k < vocab and bool((k * (scores.amax(dim=-1) - scores.logsumexp(dim=-1)).exp()
                               >= (1 - threshold) * (1 - 1e-3)).any()):
        values, ids = canonical_topk(scores, k)
        check_scores(scores, values[:, 0])
        probs, tail = candidate_probs(scores, ids)
        count, ok, _ = nucleus_count(values, probs, tail, vocab, threshold, min_tokens_to_keep)
        kept = torch.arange(k, device=scores.device)[None, :] < count[:, None]
        out[ok.nonzero()[:, 0][:, None], ids[ok]] = values[ok].masked_fill(~kept[ok], filter_value)
        pending = (~ok).nonzero()[:, 0]
    else:
        check_scores(scores)
        pending = torch.arange(batch, device=scores.device)
    if pending.numel() and 2 * MAX_BOUNDARY_TOKENS < vocab:
        rows = scores if pending.numel() == batch else scores[pending]
        remove, ok = nucleus_by_histogram(rows, threshold[pending], min_tokens_to_keep)
        out[pending[ok]] = rows[ok].masked_fill(remove[ok], filter_value)
        pending = pending[~ok]
    if pending.numel() == batch:
        return top_p_sorted(scores, threshold, min_tokens_to_keep, filter_value)
    if pending.numel():
        out[pending] = top_p_sorted(scores[pending], threshold[pending], min_tokens_to_keep, filter_value)
    return out


def apply_min_p(scores: torch.Tensor, min_p: torch.Tensor, min_tokens_to_keep: int,
                filter_value: float) -> torch.Tensor:
    probs = scores.softmax(dim=-1)
    top = probs.amax(dim=-1, keepdim=True)
    check_scores(scores, top[:, 0])
    remove = probs < min_p.to(probs.dtype)[:, None] * top
    if min_tokens_to_keep > 1:  # with one token, the most probable is never below min_p * its own probability
        _, keep = canonical_topk(probs, min(min_tokens_to_keep, probs.shape[-1]))
        remove.scatter_(1, keep, False)
    return scores.masked_fill(remove, filter_value)


def apply_typical(scores: torch.Tensor, mass: torch.Tensor, min_tokens_to_keep: int,
                  filter_value: float) -> torch.Tensor:
    log_probs = F.log_softmax(scores, dim=-1)
    probs = log_probs.exp()
    entropy = -(log_probs * probs).nansum(-1, keepdim=True)
    surprise_gap = (-log_probs - entropy).abs()
    sorted_gap, order = surprise_gap.sort(dim=-1, stable=True)  # tie rule: lower id first
    cumulative = scores.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
    last = (cumulative < mass.to(cumulative.dtype)[:, None]).sum(dim=1).clamp(max=sorted_gap.shape[-1] - 1)
    remove = sorted_gap > sorted_gap.gather(1, last[:, None])
    remove[:, :min_tokens_to_keep] = False
    return scores.masked_fill(remove.scatter(1, order, remove), filter_value)


def apply_repetition_penalty(input_ids: torch.Tensor, scores: torch.Tensor, penalty: torch.Tensor,
                             window: int | None) -> torch.Tensor:
    vocab = scores.shape[-1]
    if input_ids.dim() == 1:
        input_ids = input_ids[:, None]
    if window is not None:
        input_ids = input_ids[:, -window:]
    # Ids beyond the output vocabulary (embedding tables can be larger) land in a scratch column we drop.
    input_ids = input_ids.clamp(max=vocab)
    padded = F.pad(scores, (0, 1))
    seen = padded.gather(1, input_ids)
    seen = torch.where(seen < 0, multiply_rows(seen, penalty), divide_rows(seen, penalty))
    return padded.scatter(1, input_ids, seen)[:, :vocab]


# ----------------------------------------------------------------------------------------------------------------
# the warpers


class Temperature:
    """``scores / temperature``; a temperature of 0 (per row) keeps only the row's argmax (greedy)."""

    truncating = False  # changes the logits of kept tokens
    reads_input_ids = False

    def __init__(self, temperature: ParamLike):
        self.temperature = validate_parameter(temperature, "temperature", **PARAMETER_RANGES["temperature"])
        self.any_greedy = bool((torch.as_tensor(self.temperature) == 0).any())

    def __call__(self, input_ids: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor:
        if scores.dim() != 2 or scores.shape[-1] == 0:
            check_scores(scores)
        scaled = apply_temperature(scores, rows(self.temperature, scores.shape[0], scores.device, "temperature"),
                                   self.any_greedy)
        check_scaled(scaled, scores, "temperature")
        return scaled


class TopK:
    """Keep the tokens whose logit is >= the k-th largest (ties with the k-th are all kept, as in transformers)."""

    truncating = True  # only removes tokens from the distribution it is given
    reads_input_ids = False

    def __init__(self, top_k: ParamLike, filter_value: float = -math.inf, min_tokens_to_keep: int = 1):
        self.top_k = validate_parameter(top_k, "top_k", **PARAMETER_RANGES["top_k"])
        self.min_tokens_to_keep = _min_tokens(min_tokens_to_keep)
        self.filter_value = filter_value
        k = torch.as_tensor(self.top_k).clamp(min=self.min_tokens_to_keep)
        self.k_max = int(k.max())
        self.k = int(k) if isinstance(self.top_k, int) else k  # max(top_k, min_tokens_to_keep), per row or not

    def __call__(self, input_ids: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor:
        if scores.dim() != 2 or scores.shape[-1] == 0:
            check_scores(scores)
        k = self.k if isinstance(self.k, int) else rows(self.k, scores.shape[0], scores.device, "top_k")
        return apply_top_k(scores, k, self.k_max, self.filter_value)


class TopP:
    """Nucleus filtering with transformers' exact kept set, found without sorting the vocabulary.

    ``candidates``: size of the ``torch.topk`` candidate set searched before falling back to a full sort for
    rows whose nucleus is not inside it.
    """

    truncating = True  # only removes tokens from the distribution it is given
    reads_input_ids = False

    def __init__(self, top_p: ParamLike, filter_value: float = -math.inf, min_tokens_to_keep: int = 1, *,
                 candidates: int = 512):
        self.top_p = validate_parameter(top_p, "top_p", **PARAMETER_RANGES["top_p"])
        self.min_tokens_to_keep = _min_tokens(min_tokens_to_keep)
        self.filter_value = filter_value
        if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
            raise ValueError(f"candidates must be an integer >= 1, got {candidates!r}")
        self.candidates = candidates

    def __call__(self, input_ids: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor:
        if scores.dim() != 2 or scores.shape[-1] == 0:
            check_scores(scores)
        top_p = rows(self.top_p, scores.shape[0], scores.device, "top_p")
        return top_p_fast(scores, top_p, self.min_tokens_to_keep, self.filter_value, self.candidates)


class MinP:
    """Drop tokens whose probability is below ``min_p`` times the row's top probability."""

    truncating = True  # only removes tokens from the distribution it is given
    reads_input_ids = False

    def __init__(self, min_p: ParamLike, filter_value: float = -math.inf, min_tokens_to_keep: int = 1):
        self.min_p = validate_parameter(min_p, "min_p", **PARAMETER_RANGES["min_p"])
        self.min_tokens_to_keep = _min_tokens(min_tokens_to_keep)
        self.filter_value = filter_value

    def __call__(self, input_ids: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor:
        if scores.dim() != 2 or scores.shape[-1] == 0:
            check_scores(scores)
        min_p = rows(self.min_p, scores.shape[0], scores.device, "min_p")
        return apply_min_p(scores, min_p, self.min_tokens_to_keep, self.filter_value)


class Typical:
    """Locally typical sampling (Meister et al. 2022): keep the tokens whose surprise is closest to the entropy."""

    truncating = True  # only removes tokens from the distribution it is given
    reads_input_ids = False

    def __init__(self, mass: ParamLike = 0.9, filter_value: float = -math.inf, min_tokens_to_keep: int = 1):
        self.mass = validate_parameter(mass, "mass", **PARAMETER_RANGES["typical_p"])
        self.min_tokens_to_keep = _min_tokens(min_tokens_to_keep)
        self.filter_value = filter_value

    def __call__(self, input_ids: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor:
        check_scores(scores)
        mass = rows(self.mass, scores.shape[0], scores.device, "mass")
        return apply_typical(scores, mass, self.min_tokens_to_keep, self.filter_value)


class RepetitionPenalty:
    """CTRL's repetition penalty: a seen token's logit is divided by ``penalty`` (multiplied when negative).

    Each token is penalised once however often it occurs. ``window``: only the last ``window`` tokens of
    ``input_ids`` count (None: all of them, prompt included, as in transformers).
    """

    truncating = False  # changes the logits of kept tokens
    reads_input_ids = True

    def __init__(self, penalty: ParamLike, window: int | None = None):
        self.penalty = validate_parameter(penalty, "penalty", **PARAMETER_RANGES["repetition_penalty"])
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"window must be None or an integer >= 1, got {window!r}")
        self.window = window

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        check_scores(scores)
        check_input_ids(input_ids, scores.shape[0], "RepetitionPenalty")
        penalty = rows(self.penalty, scores.shape[0], scores.device, "penalty")
        penalised = apply_repetition_penalty(input_ids, scores, penalty, self.window)
        check_scaled(penalised, scores, "penalty")
        return penalised
