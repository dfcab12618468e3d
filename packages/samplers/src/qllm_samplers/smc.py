"""PowerSMC: sequential Monte Carlo (sequential importance resampling) for p(x)^alpha over whole continuations.

Power-SMC (arXiv 2602.10273) replaces the MH chains of power sampling by a particle system that decodes at
(nearly) the speed of plain sampling. Per input row, ``particles`` continuations advance together, one token per
model call, rows x particles in one batch. Particle i draws x_t from a proposal q (temperature 1/alpha by
default) and its log weight grows by

    alpha * log p(x_t | x_<t) - log q(x_t | x_<t)

(for q = p^alpha renormalised this is log sum_v p(v | x_<t)^alpha: it does not depend on the sampled token).
The product over a whole continuation is p(x)^alpha / q(x), the importance weight of the target p^alpha over
whole continuations (EOS-terminated, or cut at the budget): exactly the target ``PowerSampler`` has. When the
effective sample size (sum w)^2 / sum w^2 of a row falls under ``ess_threshold * particles``, the row's particles
are resampled systematically (one uniform per row) and the KV cache rows are re-indexed (``reorder_cache``: no
recomputation). A particle that emits EOS keeps its weight and leaves the batch (it costs no more forward passes).
At the end one particle per row is drawn by the final weights.

``bridge`` ramps the exponent over the first tokens (alpha_1 <= alpha_2 <= ... <= alpha): step t targets
p(x_1..t)^alpha_t with proposal temperature 1/alpha_t, and the incremental weight
(alpha_t - alpha_{t-1}) * log p(x_<t) + alpha_t * log p(x_t) - log q(x_t) telescopes, so the final target is
p^alpha unchanged (a particle that ends while the ramp is still below alpha gets the missing
(alpha - alpha_t) * log p(x) at its end).

With finitely many particles the output is biased (the final draw from a weighted set has the law of sampling
importance resampling, which is exact only as particles -> infinity); ``scripts/power_family.py`` measures how far
from p^alpha it is against its compute. docs/power.md has the derivation and the measurements.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch

from .generate import GenerateOutput, eos_tensor
from .lm import check_decode_inputs, check_logits, forward_step, length_mask
from .power import (
    check_fraction,
    check_integer,
    check_positive_number,
    lane_rng,
    proposal_logits,
    proposal_settings,
    warpers_read_context,
)
from .rng import GeneratorLike, RowRNG


def _bridge_schedule(bridge, alpha: float) -> tuple[float, ...]:
    """The exponents alpha_1..alpha_L of the ramp (after it: alpha). An int L is our linear ramp alpha*t/L."""
    if bridge is None:
        return ()
    if isinstance(bridge, bool):
        raise ValueError(f"bridge must be None, an integer >= 1 (ramp length) or an increasing sequence of exponents "
                         f"ending at alpha={alpha}, got {bridge!r}")
    if isinstance(bridge, int):
        length = check_integer("bridge", bridge, 1, allow_none=True, note=" (tokens of a linear ramp to alpha)")
        return tuple(alpha * t / length for t in range(1, length + 1))
    try:
        schedule = tuple(float(a) for a in bridge)
    except (TypeError, ValueError):
        schedule = ()
    valid = (len(schedule) >= 1 and all(math.isfinite(a) and a > 0 for a in schedule)
             and all(b >= a for a, b in zip(schedule, schedule[1:])) and abs(schedule[-1] - alpha) <= 1e-9 * alpha)
    if not valid:
        raise ValueError(f"bridge must be None, an integer >= 1 (ramp length) or a non-decreasing sequence of "
                         f"exponents > 0 ending at alpha={alpha}, got {bridge!r}")
    return schedule


def systematic_resample(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Systematic resampling: ancestor indices [R, K] from normalised weights [R, K] and one uniform per row [R].

    Particle k takes the ancestor whose cumulative weight first exceeds (u + k) / K: every ancestor i gets
    floor or ceil of K * w_i copies, the lowest-variance unbiased scheme of the usual ones.
    """
    rows, count = weights.shape
    cdf = weights.to(torch.float64).cumsum(dim=1)
    cdf[:, -1] = 1.0  # rounding must not leave a position past the last ancestor
    positions = (uniforms.to(torch.float64)[:, None] + torch.arange(count, dtype=torch.float64,
                                                                    device=weights.device)[None, :]) / count
    return torch.searchsorted(cdf, positions, right=True).clamp(max=count - 1)


class PowerSMC:
    """Sequential Monte Carlo sampler for p(x)^alpha over whole continuations (see module docstring).

    ``particles`` continuations per row; resampling when ESS / particles < ``ess_threshold`` (1: every step;
    a tiny value: almost never, i.e. plain importance sampling). ``proposal_temperature`` defaults to 1/alpha
    (1/alpha_t during a ``bridge``); ``proposal_warpers`` (HF-style callables) and ``proposal_top_k`` /
    ``proposal_top_p`` shape q; weights always use the warped q, so a truncation restricts the target to what q
    can produce. ``bridge``: None, an int L (linear ramp alpha*t/L over the first L tokens; our choice of schedule)
    or an explicit non-decreasing sequence of exponents ending at alpha. ``return_particles=True`` adds the whole
    final weighted set to ``stats["particle_set"]`` (tokens, lengths, log weights, log p, log q per particle).
    """

    def __init__(self, alpha: float = 4.0, particles: int = 8, ess_threshold: float = 0.5,
                 proposal_temperature: float | None = None, proposal_warpers: Callable | Sequence[Callable] = (),
                 bridge: int | Sequence[float] | None = None, proposal_top_k: int | None = None,
                 proposal_top_p: float | None = None, return_particles: bool = False, pad_token_id: int | None = None):
        self.alpha = check_positive_number("alpha", alpha)
        self.particles = check_integer("particles", particles, 1)
        self.ess_threshold = check_fraction("ess_threshold", ess_threshold,
                                            note=" (resample when ESS/particles falls under it)")
        temperature, self.proposal_warpers = proposal_settings(
            self.alpha, proposal_temperature, proposal_warpers, proposal_top_k, proposal_top_p)
        # None: the proposal follows the (bridged) exponent, 1/exponent at each step
        self.fixed_temperature = None if proposal_temperature is None else temperature
        self.bridge = _bridge_schedule(bridge, self.alpha)
        if not isinstance(return_particles, bool):
            raise ValueError(f"return_particles must be True or False, got {return_particles!r}")
        self.return_particles = return_particles
        self.pad_token_id = check_integer("pad_token_id", pad_token_id, 0, allow_none=True)

    def exponent(self, step: int) -> float:
        """The target exponent after ``step`` new tokens (1-based): the bridge's, then alpha."""
        return self.bridge[step - 1] if step <= len(self.bridge) else self.alpha

    def proposal_scores(self, scores: torch.Tensor, input_ids: torch.Tensor, exponent: float) -> torch.Tensor:
        """Logits of the proposal q from the base model's raw logits (temperature 1/exponent unless fixed)."""
        temperature = 1.0 / exponent if self.fixed_temperature is None else self.fixed_temperature
        return proposal_logits(scores, input_ids, temperature, self.proposal_warpers)

    @torch.no_grad()
    def generate(self, model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *,
                 attention_mask: torch.Tensor | None = None, eos_token_id: int | Sequence[int] | None = None,
                 generator: GeneratorLike = None) -> GenerateOutput:
        """One draw per row of (left-padded) ``input_ids`` from its final weighted particle set.

        ``generator`` seeds the per-row streams (``RowRNG.from_generator``): per-row seeds make a row's result
        independent of its batch-mates. ``eos_token_id=None``: every continuation runs to the budget.
        """
        attention_mask = check_decode_inputs(model, input_ids, attention_mask, max_new_tokens)
        batch, prompt_length = input_ids.shape
        device, count, alpha = input_ids.device, self.particles, self.alpha
        eos = eos_tensor(eos_token_id, device)
        pad = self.pad_token_id if self.pad_token_id is not None else (int(eos[0]) if eos is not None else 0)
        rng = RowRNG.from_generator(generator, batch, device)
        final_rng = RowRNG(rng.seeds, rng.counter)  # its own stream: the final draw ignores how long others ran
        rng.uniform()
        particle_rng = lane_rng(rng, count)
        needs_context = warpers_read_context(self.proposal_warpers)
        start = time.perf_counter()

        logits, cache = forward_step(model, input_ids, attention_mask, None)
        calls = 1
        forward_tokens = attention_mask.sum(dim=1).long()  # the prompt runs once per row, not once per particle
        slots = batch * count  # particle k of row b is slot b*count + k
        row_of = torch.arange(batch, device=device).repeat_interleave(count)
        cache.reorder_cache(row_of)  # each row's prompt cache, copied to its particles
        scores = logits[:, -1].repeat_interleave(count, dim=0)
        prompt_mask, prompt_ids = attention_mask[row_of], input_ids[row_of]
        tokens = torch.full((slots, max_new_tokens), pad, dtype=torch.long, device=device)
        token_logp = torch.zeros((slots, max_new_tokens), dtype=torch.float32, device=device)
        log_w = torch.zeros(slots, dtype=torch.float64, device=device)
        log_p = torch.zeros(slots, dtype=torch.float64, device=device)
        log_q = torch.zeros(slots, dtype=torch.float64, device=device)
        lengths = torch.zeros(slots, dtype=torch.long, device=device)
        finished = torch.zeros(slots, dtype=torch.bool, device=device)
        active = torch.arange(slots, device=device)  # slots whose particle is in the cache, in cache order
        resamples = torch.zeros(batch, dtype=torch.long, device=device)
        ess_history = []
        previous_exponent = 0.0
        for step in range(max_new_tokens):
            exponent = self.exponent(step + 1)
            log_normalizer = torch.logsumexp(scores, dim=-1)  # NaN or +-inf exactly when a row is unusable
            if not bool(torch.isfinite(log_normalizer).all()):
                check_logits(scores, where=f"model logits at step {step}")
            raw_logp = scores - log_normalizer[:, None]
            context = (torch.cat([prompt_ids[active], tokens[active, :step]], dim=1) if needs_context
                       else prompt_ids[:0, :0])
            proposal = self.proposal_scores(scores, context, exponent)
            streams = particle_rng.select(active)
            chosen = streams.categorical(proposal)
            particle_rng.counter = streams.counter
            chosen_logp = raw_logp.gather(1, chosen[:, None]).squeeze(1).double()
            chosen_logq = torch.log_softmax(proposal, dim=-1).gather(1, chosen[:, None]).squeeze(1).double()
            log_w[active] += (exponent * chosen_logp - chosen_logq
                              + (exponent - previous_exponent) * log_p[active])
            log_p[active] += chosen_logp
            log_q[active] += chosen_logq
            tokens[active, step] = chosen
            token_logp[active, step] = chosen_logp.float()
            lengths[active] += 1
            ended = torch.isin(chosen, eos) if eos is not None else torch.zeros_like(chosen, dtype=torch.bool)
            if step == max_new_tokens - 1:
                ended = torch.ones_like(ended)
            # a whole continuation's target is p^alpha: a particle ending inside the ramp gets the rest now
            done_now = active[ended]
            log_w[done_now] += (alpha - exponent) * log_p[done_now]
            finished[done_now] = True
            previous_exponent = exponent
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            weights = torch.softmax(log_w.view(batch, count), dim=1)
            ess = 1.0 / (weights ** 2).sum(dim=1)
            ess_history.append(ess)
            uniforms = rng.uniform()  # drawn every step for every row: a row's stream ignores its batch-mates
            has_active = (~finished).view(batch, count).any(dim=1)
            resample = has_active & (ess < self.ess_threshold * count)
            ancestors = torch.arange(slots, device=device)
            resampled = bool(resample.any())
            if resampled:
                rows = resample.nonzero().squeeze(1)
                picked = systematic_resample(weights[rows], uniforms[rows]) + (rows * count)[:, None]
                ancestors.view(batch, count)[rows] = picked
                tokens, token_logp = tokens[ancestors], token_logp[ancestors]
                log_p, log_q, lengths, finished = (log_p[ancestors], log_q[ancestors], lengths[ancestors],
                                                   finished[ancestors])
                # after resampling every particle carries the row's mean weight (keeps the evidence estimate)
                mean = torch.logsumexp(log_w.view(batch, count)[rows], dim=1) - math.log(count)
                log_w.view(batch, count)[rows] = mean[:, None].expand(-1, count)
                resamples += resample.long()
            # the cache keeps the unfinished particles, each on a copy of its ancestor's row
            position = torch.full((slots,), -1, dtype=torch.long, device=device)
            position[active] = torch.arange(active.numel(), device=device)
            keep = (~finished).nonzero().squeeze(1)
            source = position[ancestors[keep]]
            # Without resampling, ancestors are the identity and the source is too unless a particle ended.
            if resampled or source.numel() != active.numel():
                cache.reorder_cache(source)
            active = keep
            mask = torch.cat([prompt_mask[active], torch.ones((active.numel(), step + 1), dtype=prompt_mask.dtype,
                                                              device=device)], dim=1)
            logits, cache = forward_step(model, tokens[active, step:step + 1], mask, cache)
            calls += 1
            forward_tokens += (~finished).view(batch, count).sum(dim=1)  # the active slots, counted per row
            scores = logits[:, -1]

        final = final_rng.categorical(log_w.view(batch, count)) + torch.arange(batch, device=device) * count
        used = int(lengths[final].max())
        new_mask = length_mask(lengths[final], used).to(attention_mask.dtype)
        stats = {
            "log_p": log_p[final],  # [B] of the draw
            "log_q": log_q[final],
            "ess": (torch.stack(ess_history, dim=1) if ess_history
                    else torch.zeros((batch, 0), dtype=torch.float64, device=device)),  # [B, steps] before resampling
            "resamples": resamples,  # [B]
            "log_evidence": torch.logsumexp(log_w.view(batch, count), dim=1) - math.log(count),  # [B] log mean w
            "particles": count,
        }
        if self.return_particles:
            stats["particle_set"] = {
                "tokens": tokens.view(batch, count, -1)[:, :, :int(lengths.max())],
                "lengths": lengths.view(batch, count),
                "log_weights": log_w.view(batch, count),
                "log_p": log_p.view(batch, count),
                "log_q": log_q.view(batch, count),
            }
        return GenerateOutput(
            sequences=torch.cat([input_ids, tokens[final, :used]], dim=1),
            attention_mask=torch.cat([attention_mask, new_mask], dim=1),
            logprobs=token_logp[final, :used],
            lengths=lengths[final],
            prompt_length=prompt_length,
            forward_tokens=forward_tokens,
            model_calls=calls,
            seconds=time.perf_counter() - start,
            stats=stats,
        )
