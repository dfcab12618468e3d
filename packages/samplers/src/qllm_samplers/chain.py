"""The classic sampler: warpers in transformers' order, then one categorical draw per row.

``SamplingChain`` applies, in the order transformers' ``generate`` documents and uses, the repetition penalty,
temperature, top-k, top-p, min-p and typical filtering, and draws one token per row through a ``RowRNG``, so a
seeded request gets the same tokens whatever else shares its batch. Every parameter may be a per-row tensor [B].

Calling the chain (``chain(input_ids, scores)``) returns the warped scores exactly as the transformers processors
would. ``select`` (the TokenSampler method used by ``qllm_samplers.generate``) draws from that same distribution
without materialising it when top-k, top-p or min-p is set: all three keep a prefix of the tokens in descending
order, so the draw only needs the ``torch.topk`` candidates. Rows whose kept set is not certainly inside the
candidates are warped in full (the exact path), so the support is always transformers'.

The draw is an inverse-CDF draw over the kept tokens in token-id order with one uniform per row; removed tokens
have no mass, so the candidate path and the full path pick the same token for the same uniform (up to float64
rounding of the normaliser). The drawn token therefore depends only on the row's warped distribution, its seed and
the step, never on the batch or on which path a row took.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .rng import RowRNG
from .warpers import (
    FLOAT32_ROUNDOFF,
    PARAMETER_RANGES,
    SLACK_ROUNDOFFS,
    TINY,
    MinP,
    ParamLike,
    RepetitionPenalty,
    Temperature,
    TopK,
    TopP,
    Typical,
    apply_min_p,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_typical,
    candidate_probs,
    canonical_topk,
    check_input_ids,
    check_scaled,
    check_scores,
    divide_rows,
    keep_argmax,
    nucleus_count,
    prefix_inside,
    rows,
    top_p_fast,
    top_p_threshold,
    validate_parameter,
)


class Greedy:
    """Argmax decoding (the first maximal logit on ties)."""

    def select(self, scores: torch.Tensor, state, rng: RowRNG) -> torch.Tensor:
        check_scores(scores)
        return scores.argmax(dim=-1)

    def __call__(self, input_ids: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor:
        check_scores(scores)
        return keep_argmax(scores)


@dataclass
class DrawPlan:
    """What ``SamplingChain.select`` draws from (exposed so tests can compare it with the full warp).

    ``logits``/``ids`` [B, N]: the candidate logits (-inf when removed) and their token ids, in token-id order;
    ``ids`` is None when ``logits`` are whole rows. ``fallback``: rows drawn instead from ``fallback_logits``
    [R, V] (full warped rows). ``greedy``: [B] bool, rows with temperature 0 (they take ``argmax``).
    """

    logits: torch.Tensor
    ids: torch.Tensor | None
    fallback: torch.Tensor
    fallback_logits: torch.Tensor | None
    greedy: torch.Tensor | None
    argmax: torch.Tensor | None


@dataclass(frozen=True)
class RowParameters:
    """Per-row sampling parameters, already valid: [B] tensors (or None: the stage is off).

    What ``sample_rows`` / ``plan_draw`` need, with nothing left to check: ``SamplingChain`` builds one from its
    validated arguments; the adaptive samplers (``AlphaSampler``, ``EntropixSampler``) compute the tensors every
    step from their maps, whose ranges are valid by construction, so the hot path has no validation and no host
    sync for it. ``k_max``: an upper bound of ``top_k`` (a Python int, so the candidate count is static);
    ``top_k`` already includes ``min_tokens_to_keep``. ``any_greedy``: whether some temperature may be 0.
    """

    temperature: torch.Tensor | None = None
    top_k: torch.Tensor | None = None
    top_p: torch.Tensor | None = None
    min_p: torch.Tensor | None = None
    typical_p: torch.Tensor | None = None
    repetition_penalty: torch.Tensor | None = None
    repetition_window: int | None = None
    k_max: int = 0
    min_tokens_to_keep: int = 1
    candidates: int = 512
    any_greedy: bool = False

    def select(self, rows: torch.Tensor) -> RowParameters:
        """The parameters of a subset of rows."""
        names = ("temperature", "top_k", "top_p", "min_p", "typical_p", "repetition_penalty")
        return replace(self, **{n: getattr(self, n)[rows] for n in names if getattr(self, n) is not None})


def truncate_rows(scores: torch.Tensor, params: RowParameters) -> torch.Tensor:
    """The exact warp after penalty and temperature (full rows): top-k, top-p, min-p, typical."""
    m = params.min_tokens_to_keep
    if params.top_k is not None:
        scores = apply_top_k(scores, params.top_k, params.k_max, -math.inf)
    if params.top_p is not None:
        scores = top_p_fast(scores, params.top_p, m, -math.inf, params.candidates)
    if params.min_p is not None:
        scores = apply_min_p(scores, params.min_p, m, -math.inf)
    if params.typical_p is not None:
        check_scores(scores)
        scores = apply_typical(scores, params.typical_p, m, -math.inf)
    return scores


def warp_rows(input_ids: torch.Tensor | None, scores: torch.Tensor, params: RowParameters) -> torch.Tensor:
    """The full warped scores [B, V] (what ``SamplingChain.__call__`` returns), from already valid parameters."""
    raw = scores
    if params.repetition_penalty is not None:
        check_input_ids(input_ids, scores.shape[0], "repetition_penalty")
        scores = apply_repetition_penalty(input_ids, scores, params.repetition_penalty, params.repetition_window)
    if params.temperature is not None:
        scores = apply_temperature(scores, params.temperature, params.any_greedy)
    if scores is not raw:
        check_scaled(scores, raw, " and ".join(n for n in ("repetition_penalty", "temperature")
                                               if getattr(params, n) is not None))
    return truncate_rows(scores, params)


def plan_draw(input_ids: torch.Tensor | None, scores: torch.Tensor, params: RowParameters) -> DrawPlan:
    """Penalty and temperature on the full row, then either the candidate path or the exact full warp."""
    if scores.dim() != 2 or scores.shape[-1] == 0:
        check_scores(scores)
    batch, vocab = scores.shape
    device = scores.device
    if params.repetition_penalty is not None:
        check_input_ids(input_ids, batch, "repetition_penalty")
        scores = apply_repetition_penalty(input_ids, scores, params.repetition_penalty, params.repetition_window)
    raw = scores
    cause = " and ".join(n for n in ("repetition_penalty", "temperature") if getattr(params, n) is not None)
    greedy = None
    if params.temperature is not None:
        temperature = params.temperature
        if params.any_greedy:
            greedy = temperature == 0
            temperature = torch.where(greedy, 1.0, temperature)
        scores = divide_rows(scores, temperature)
    m = params.min_tokens_to_keep
    # top-k alone needs only k_max + 1 candidates (the extra one detects ties with tokens outside)
    searched = params.candidates if params.top_p is not None or params.min_p is not None else 0
    k = min(vocab, max(searched, m + 1, params.k_max + 1 if params.top_k is not None else 0))
    truncating = params.top_k is not None or params.top_p is not None or params.min_p is not None
    if not truncating or params.typical_p is not None or scores.dtype != torch.float32 or 2 * k >= vocab:
        if cause:
            check_scaled(scores, raw, cause)
        elif not truncating and params.typical_p is None:
            check_scores(scores)
        warped = truncate_rows(scores, params)
        no_rows = torch.zeros(0, dtype=torch.long, device=device)
        return DrawPlan(warped, None, no_rows, None, greedy, scores.argmax(dim=-1) if greedy is not None else None)

    values, ids = canonical_topk(scores, k)
    if cause:
        check_scaled(scores, raw, cause, values[:, 0])
    else:
        check_scores(scores, values[:, 0])
    count = torch.full((batch,), k, dtype=torch.long, device=device)
    ok = torch.ones(batch, dtype=torch.bool, device=device)
    rank = torch.arange(1, k + 1, device=device)
    if params.top_k is not None:
        kth = values.gather(1, (params.top_k.clamp(max=k) - 1)[:, None])
        count = (values >= kth).sum(-1)  # ties with the k-th are kept, as in transformers
        ok &= prefix_inside(values, count)
    if params.top_p is not None:
        threshold = top_p_threshold(params.top_p)
        if params.top_k is not None:
            # The row top-p sees is the top-k survivors only: normalise over them (no tail).
            alive = rank[None, :] <= count[:, None]
            logits64 = values.to(torch.float64).masked_fill(~alive, -math.inf)
            probs, tail = logits64.softmax(dim=-1), torch.zeros(batch, dtype=torch.float64, device=device)
        else:
            probs, tail = candidate_probs(scores, ids)
        nucleus, certain, _ = nucleus_count(values, probs, tail, vocab, threshold, m)
        count = torch.minimum(count, nucleus)
        ok &= certain
    if params.min_p is not None:
        # min-p compares p_i with min_p * p_max: normalisation cancels, so the ratio to the top logit decides.
        min_p = params.min_p.to(torch.float32).to(torch.float64)[:, None]
        ratio = (values.to(torch.float64) - values[:, :1].to(torch.float64)).exp()
        alive = (rank[None, :] > m) & (rank[None, :] <= count[:, None]) & (min_p > 0)
        eps = SLACK_ROUNDOFFS * FLOAT32_ROUNDOFF * min_p + TINY
        ok &= ~((((ratio - min_p).abs() <= eps) & alive).any(-1))
        count = torch.minimum(count, (ratio >= min_p).sum(-1).clamp(min=m))
    ok &= prefix_inside(values, count)
    if greedy is not None:
        ok |= greedy  # greedy rows take the argmax whatever the warp says
    kept = rank[None, :] <= count[:, None]
    ids_by_token, order = ids.sort(dim=-1)
    logits = values.masked_fill(~kept, -math.inf).gather(1, order)
    fallback = (~ok).nonzero().squeeze(-1)
    fallback_logits = None
    if fallback.numel():
        # These rows' nucleus is not among the candidates: top-p goes straight to its histogram path.
        fallback_logits = truncate_rows(scores[fallback], replace(params.select(fallback), candidates=vocab))
    return DrawPlan(logits, ids_by_token, fallback, fallback_logits, greedy, ids[:, 0])


def sample_rows(input_ids: torch.Tensor | None, scores: torch.Tensor, rng: RowRNG,
                params: RowParameters) -> torch.Tensor:
    """One token per row from the warped distribution (the pure function every classic-style sampler calls)."""
    plan = plan_draw(input_ids, scores, params)
    # Sub-streams taken before the batch draw continue at the same counter: every row uses its own
    # uniform of this step whichever path it takes.
    fallback_rng = rng.select(plan.fallback) if plan.fallback.numel() else None
    drawn = rng.categorical(plan.logits)
    tokens = drawn if plan.ids is None else plan.ids.gather(1, drawn[:, None])[:, 0]
    if fallback_rng is not None:
        tokens[plan.fallback] = fallback_rng.categorical(plan.fallback_logits)
    if plan.greedy is not None:
        tokens = torch.where(plan.greedy, plan.argmax, tokens)
    return tokens


class SamplingChain:
    """Repetition penalty -> temperature -> top-k -> top-p -> min-p -> typical, then a categorical draw.

    None switches a stage off; a value (or per-row tensor) switches it on with transformers' semantics, e.g.
    ``top_p=1.0`` is applied (it removes tokens whose float32 probability is exactly 0, as
    ``TopPLogitsWarper(1.0)`` does). Temperature 0 (per row) is greedy. ``candidates``: size of the top-k
    candidate set the fast draw searches. Every argument is validated here, once, under its own name.
    """

    def __init__(self, temperature: ParamLike | None = 1.0, top_k: ParamLike | None = None,
                 top_p: ParamLike | None = None, min_p: ParamLike | None = None,
                 typical_p: ParamLike | None = None, repetition_penalty: ParamLike | None = None,
                 repetition_window: int | None = None, *, min_tokens_to_keep: int = 1, candidates: int = 512):
        if repetition_window is not None and repetition_penalty is None:
            raise ValueError("repetition_window needs repetition_penalty (got repetition_penalty=None)")
        # Validated under the chain's names first, so that a message names the argument the caller passed.
        given = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p, "typical_p": typical_p,
                 "repetition_penalty": repetition_penalty}
        for name, value in given.items():
            if value is not None:
                validate_parameter(value, name, **PARAMETER_RANGES[name])
        if repetition_window is not None and (isinstance(repetition_window, bool)
                                              or not isinstance(repetition_window, int) or repetition_window < 1):
            raise ValueError(f"repetition_window must be None or an integer >= 1, got {repetition_window!r}")
        m = min_tokens_to_keep
        self.penalty = RepetitionPenalty(repetition_penalty, repetition_window) if repetition_penalty is not None \
            else None
        self.temperature = Temperature(temperature) if temperature is not None else None
        self.top_k = TopK(top_k, min_tokens_to_keep=m) if top_k is not None else None
        self.top_p = TopP(top_p, min_tokens_to_keep=m, candidates=candidates) if top_p is not None else None
        self.min_p = MinP(min_p, min_tokens_to_keep=m) if min_p is not None else None
        self.typical = Typical(typical_p, min_tokens_to_keep=m) if typical_p is not None else None
        self.min_tokens_to_keep = m
        self.candidates = candidates
        self.warpers = [w for w in (self.penalty, self.temperature, self.top_k, self.top_p, self.min_p, self.typical)
                        if w is not None]
        self._cached: tuple[int, torch.device, RowParameters] | None = None

    def __repr__(self) -> str:
        names = ", ".join(type(w).__name__ for w in self.warpers)
        return f"SamplingChain([{names}])"

    def __call__(self, input_ids: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor:
        """The warped scores, exactly as the transformers processors in the same order would return them."""
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        return scores

    def select(self, scores: torch.Tensor, state, rng: RowRNG) -> torch.Tensor:
        """TokenSampler: one token per row from the warped distribution of ``scores`` given ``state.input_ids``."""
        return self.sample(state.input_ids, scores, rng)

    def sample(self, input_ids: torch.Tensor | None, scores: torch.Tensor, rng: RowRNG) -> torch.Tensor:
        return sample_rows(input_ids, scores, rng, self.row_parameters(scores))

    def plan(self, input_ids: torch.Tensor | None, scores: torch.Tensor) -> DrawPlan:
        """What ``sample`` draws from (for tests and benchmarks)."""
        return plan_draw(input_ids, scores, self.row_parameters(scores))

    def row_parameters(self, scores: torch.Tensor) -> RowParameters:
        """This chain's parameters as [B] tensors for a batch like ``scores`` (cached per batch size and device)."""
        if scores.dim() != 2:
            check_scores(scores)
        batch, device = scores.shape[0], scores.device
        if self._cached is not None and self._cached[:2] == (batch, device):
            return self._cached[2]

        def per_row(warper, value, name):
            return None if warper is None else rows(value, batch, device, name)

        temperature = None
        if self.temperature is not None and (isinstance(self.temperature.temperature, torch.Tensor)
                                             or self.temperature.temperature != 1.0):
            temperature = rows(self.temperature.temperature, batch, device, "temperature").to(torch.float64)
        params = RowParameters(
            temperature=temperature,
            top_k=per_row(self.top_k, self.top_k.k if self.top_k else None, "top_k"),
            top_p=per_row(self.top_p, self.top_p.top_p if self.top_p else None, "top_p"),
            min_p=per_row(self.min_p, self.min_p.min_p if self.min_p else None, "min_p"),
            typical_p=per_row(self.typical, self.typical.mass if self.typical else None, "typical_p"),
            repetition_penalty=per_row(self.penalty, self.penalty.penalty if self.penalty else None,
                                       "repetition_penalty"),
            repetition_window=self.penalty.window if self.penalty else None,
            k_max=self.top_k.k_max if self.top_k else 0,
            min_tokens_to_keep=self.min_tokens_to_keep, candidates=self.candidates,
            any_greedy=bool(self.temperature is not None and self.temperature.any_greedy))
        self._cached = (batch, device, params)
        return params
