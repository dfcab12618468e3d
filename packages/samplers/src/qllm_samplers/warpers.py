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


# ----------------------------------------------------------------------------------------------------------------
# parameters and checks


def _param(value: ParamLike, name: str, *, low: float, high: float = math.inf, low_open: bool = False,
           high_open: bool = False, integer: bool = False) -> float | int | torch.Tensor:
    """Validate a scalar or per-row parameter once (at construction, never in the hot path)."""
    lo, hi = ("(" if low_open else "["), (")" if high_open or high == math.inf else "]")
    allowed = f"{lo}{low}, {'inf' if high == math.inf else high}{hi}"
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
    bad = torch.isnan(tensor) | too_low | too_high
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
    if row_max is None:
        row_max = scores.amax(dim=-1)
    if not torch.isfinite(row_max).all():
        check_logits(scores, "scores")
        raise ValueError("scores: a logit is +inf; allowed: finite values or -inf")


# ----------------------------------------------------------------------------------------------------------------
# functional cores (per-row parameters as [B] tensors); the classes below validate and call these


def keep_argmax(scores: torch.Tensor, filter_value: float = -math.inf) -> torch.Tensor:
    """Each row keeps only its first maximal logit (greedy)."""
    best = scores.argmax(dim=-1, keepdim=True)
    return torch.full_like(scores, filter_value).scatter_(1, best, scores.gather(1, best))


def apply_temperature(scores: torch.Tensor, temperature: torch.Tensor, any_greedy: bool = True) -> torch.Tensor:
    greedy = temperature == 0
    scaled = scores / torch.where(greedy, 1.0, temperature).to(scores.dtype)[:, None]
    if not any_greedy:
        return scaled
    return torch.where(greedy[:, None], keep_argmax(scores), scaled)


def apply_top_k(scores: torch.Tensor, top_k: torch.Tensor, k_max: int, filter_value: float) -> torch.Tensor:
    """``top_k`` already includes min_tokens_to_keep (transformers keeps max(top_k, min_tokens_to_keep))."""
    vocab = scores.shape[-1]
    values = scores.topk(min(k_max, vocab), dim=-1).values
    check_scores(scores, values[:, 0])
    kth = values.gather(1, (top_k.clamp(max=min(k_max, vocab)) - 1)[:, None])  # transformers clamps k to V
    return scores.masked_fill(scores < kth, filter_value)


def canonical_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest logits per row, ordered by (value descending, token id ascending): the tie rule."""
    values, ids = scores.topk(k, dim=-1)
    ids, order = ids.sort(dim=-1)
    values = values.gather(1, order)
    values, order = values.sort(dim=-1, descending=True, stable=True)
    return values, ids.gather(1, order)


def top_p_threshold(top_p: torch.Tensor) -> torch.Tensor:
    """transformers compares float32 cumulative sums with the Python float 1 - top_p, cast to float32."""
    return (1.0 - top_p.to(torch.float64)).to(torch.float32)


def top_p_sorted(scores: torch.Tensor, threshold: torch.Tensor, min_tokens_to_keep: int,
                 filter_value: float) -> torch.Tensor:
    """transformers' algorithm (sort, softmax, cumulative sum from the low end), with our tie rule.

    The ascending sequence of values is the same whatever order the sort gives tied logits, so the float32
    softmax and cumsum are bit-identical to transformers'. Only where tied logits straddle the cut do we fix
    which of them stay: the lowest ids.
    """
    vocab = scores.shape[-1]
    values, ids = scores.sort(dim=-1)
    cumulative = values.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= threshold.to(cumulative.dtype)[:, None]
    remove[:, vocab - min(min_tokens_to_keep, vocab):] = False
    remove_by_id = torch.empty_like(remove).scatter_(1, ids, remove)
    # the cumulative sum is non-decreasing, so the removed tokens are a prefix of the ascending order
    cut = remove.sum(-1).clamp(min=1, max=vocab - 1)[:, None]
    straddles = (values.gather(1, cut - 1) == values.gather(1, cut))[:, 0] & remove.any(-1) & ~remove.all(-1)
    rows = straddles.nonzero().squeeze(-1)
    if rows.numel():
        tied = scores[rows] == values[rows].gather(1, cut[rows])
        kept_tied = (tied & ~remove_by_id[rows]).sum(-1, keepdim=True)
        remove_by_id[rows] = torch.where(tied, tied.cumsum(-1) > kept_tied, remove_by_id[rows])
    return scores.masked_fill(remove_by_id, filter_value)


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
    ok = ~uncertain & _prefix_inside(values, count)
    return count, ok, uncertain


def _prefix_inside(values: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
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


def top_p_fast(scores: torch.Tensor, top_p: torch.Tensor, min_tokens_to_keep: int, filter_value: float,
               candidates: int = 512) -> torch.Tensor:
    """transformers' top-p without sorting the vocabulary.

    The nucleus is a prefix of the tokens in descending order, so it is found among the ``torch.topk``
    candidates once each row's full normaliser is known (one softmax pass). Rows whose nucleus is not inside
    the candidates try a 16x larger candidate set (if it could hold the nucleus at all); rows that are still
    undecided (flat rows, a boundary within rounding distance) go through the exact sort path, so the kept set is
    always transformers'.
    """
    batch, vocab = scores.shape
    threshold = top_p_threshold(top_p)
    out = torch.full_like(scores, filter_value)
    pending = torch.arange(batch, device=scores.device)
    to_sort = []
    k = max(candidates, min_tokens_to_keep + 1)
    checked = False
    while scores.dtype == torch.float32 and pending.numel() and 2 * k < vocab:
        rows = scores if pending.numel() == batch else scores[pending]
        values, ids = canonical_topk(rows, k)
        if not checked:
            check_scores(scores, values[:, 0])
            checked = True
        probs, tail = candidate_probs(rows, ids)
        count, ok, uncertain = nucleus_count(values, probs, tail, vocab, threshold[pending], min_tokens_to_keep)
        kept = torch.arange(k, device=scores.device)[None, :] < count[:, None]
        out[pending[ok][:, None], ids[ok]] = values[ok].masked_fill(~kept[ok], filter_value)
        # Tokens outside the candidates are no more probable than the last one, which bounds what a 16x larger
        # candidate set could hold; rows that cannot reach top_p there go straight to the sort, and so do rows
        # whose candidates hold less than a third of top_p (flat rows: a speed heuristic, never a correctness one).
        larger = 16 * k
        mass = 1 - tail
        reachable = (mass + (larger - k) * probs[:, -1] >= top_p[pending] - 1e-6) & (mass >= top_p[pending] / 3)
        retry = ~ok & ~uncertain & reachable & (2 * larger < vocab)
        to_sort.append(pending[~ok & ~retry])
        pending, k = pending[retry], larger
    to_sort.append(pending)
    sort_rows = torch.cat(to_sort)
    if not checked:
        check_scores(scores)
    if sort_rows.numel() == batch:
        return top_p_sorted(scores, threshold, min_tokens_to_keep, filter_value)
    if sort_rows.numel():
        out[sort_rows] = top_p_sorted(scores[sort_rows], threshold[sort_rows], min_tokens_to_keep, filter_value)
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
    factor = penalty.to(scores.dtype)[:, None]
    seen = torch.where(seen < 0, seen * factor, seen / factor)
    return padded.scatter(1, input_ids, seen)[:, :vocab]


# ----------------------------------------------------------------------------------------------------------------
# the warpers


class Temperature:
    """``scores / temperature``; a temperature of 0 (per row) keeps only the row's argmax (greedy)."""

    def __init__(self, temperature: ParamLike):
        self.temperature = _param(temperature, "temperature", low=0.0)
        self.any_greedy = bool((torch.as_tensor(self.temperature) == 0).any())

    def __call__(self, input_ids: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor:
        check_scores(scores)
        return apply_temperature(scores, rows(self.temperature, scores.shape[0], scores.device, "temperature"),
                                 self.any_greedy)


class TopK:
    """Keep the tokens whose logit is >= the k-th largest (ties with the k-th are all kept, as in transformers)."""

    def __init__(self, top_k: ParamLike, filter_value: float = -math.inf, min_tokens_to_keep: int = 1):
        self.top_k = _param(top_k, "top_k", low=1, integer=True)
        self.min_tokens_to_keep = _min_tokens(min_tokens_to_keep)
        self.filter_value = filter_value
        k = torch.as_tensor(self.top_k).clamp(min=self.min_tokens_to_keep)
        self.k_max = int(k.max())
        self._k = int(k) if isinstance(self.top_k, int) else k

    def __call__(self, input_ids: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor:
        if scores.dim() != 2:
            check_scores(scores)
        k = rows(self._k, scores.shape[0], scores.device, "top_k")
        return apply_top_k(scores, k, self.k_max, self.filter_value)


class TopP:
    """Nucleus filtering with transformers' exact kept set, found without sorting the vocabulary.

    ``candidates``: size of the ``torch.topk`` candidate set searched before falling back to a full sort for
    rows whose nucleus is not inside it.
    """

    def __init__(self, top_p: ParamLike, filter_value: float = -math.inf, min_tokens_to_keep: int = 1, *,
                 candidates: int = 512):
        self.top_p = _param(top_p, "top_p", low=0.0, high=1.0, low_open=True)
        self.min_tokens_to_keep = _min_tokens(min_tokens_to_keep)
        self.filter_value = filter_value
        if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
            raise ValueError(f"candidates must be an integer >= 1, got {candidates!r}")
        self.candidates = candidates

    def __call__(self, input_ids: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor:
        if scores.dim() != 2:
            check_scores(scores)
        top_p = rows(self.top_p, scores.shape[0], scores.device, "top_p")
        return top_p_fast(scores, top_p, self.min_tokens_to_keep, self.filter_value, self.candidates)


class MinP:
    """Drop tokens whose probability is below ``min_p`` times the row's top probability."""

    def __init__(self, min_p: ParamLike, filter_value: float = -math.inf, min_tokens_to_keep: int = 1):
        self.min_p = _param(min_p, "min_p", low=0.0, high=1.0)
        self.min_tokens_to_keep = _min_tokens(min_tokens_to_keep)
        self.filter_value = filter_value

    def __call__(self, input_ids: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor:
        if scores.dim() != 2:
            check_scores(scores)
        min_p = rows(self.min_p, scores.shape[0], scores.device, "min_p")
        return apply_min_p(scores, min_p, self.min_tokens_to_keep, self.filter_value)


class Typical:
    """Locally typical sampling (Meister et al. 2022): keep the tokens whose surprise is closest to the entropy."""

    def __init__(self, mass: ParamLike = 0.9, filter_value: float = -math.inf, min_tokens_to_keep: int = 1):
        self.mass = _param(mass, "mass", low=0.0, high=1.0, low_open=True, high_open=True)
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

    def __init__(self, penalty: ParamLike, window: int | None = None):
        self.penalty = _param(penalty, "penalty", low=0.0, low_open=True)
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"window must be None or an integer >= 1, got {window!r}")
        self.window = window

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        check_scores(scores)
        if input_ids is None:
            raise ValueError("input_ids: the repetition penalty needs the tokens so far, got None")
        penalty = rows(self.penalty, scores.shape[0], scores.device, "penalty")
        return apply_repetition_penalty(input_ids, scores, penalty, self.window)
