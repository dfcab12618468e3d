"""Power sampling: Metropolis-Hastings over whole continuations with target p(x)^alpha.

Karan & Du, "Reasoning with Sampling: Your Base Model is Smarter Than You Think" (arXiv 2510.14901),
Algorithm 1. The continuation grows in blocks; after each block, ``mcmc_steps`` MH moves each cut the state at a
uniform position of its generated part, resample the suffix from a proposal q (the base model at temperature
1/alpha, optionally truncated) and accept with

    log r = alpha*[log p(y) - log p(x_suffix)] + [log q(x_suffix) - log q(y)] + log n - log n',

where n and n' are the lengths of the current and proposed states (the probability of drawing the same cut from
either side). The target is p^alpha over *whole* continuations of the current budget: EOS-terminated, or cut at
the budget. docs/power.md derives this and lists where the official code differs.

Multiple-try MH (``proposals=K``): from one cut, K suffixes are drawn in the same batched calls (K lanes per
chain), one is selected by its weight w = p^alpha / q and accepted with min(1, n/n' * W / (W - w(y) + w(x))),
W the sum of the K weights (the multiple-try independence sampler: exact, no extra reference draws).
The result of ``generate`` is the ``GenerateOutput`` every sampler returns (MH counters in ``stats``).

How it stays fast (every row is an independent chain):

- One batched KV cache holds, per row, the prompt, the current state and the proposal being generated. A row's
  attention mask selects the entries that are its context; entries that stop being needed (a rejected proposal,
  the replaced suffix of an accepted one) become holes, exactly like left padding in the middle. Positions come
  from the mask (cumsum), so a kept prefix is never recomputed, whatever the row's cut point.
- Rows are not synchronised: every model call feeds one token per row (plus drafts), and a row that finishes a move
  starts its next one on the next call (re-feeding the token before its cut to get the proposal's first
  distribution). No row waits for the slowest proposal in the batch.
- Per-token log p and log q of the current state are kept, so the current suffix is never re-run.
- Exact early rejection: for the temperature-1/alpha proposal (or a truncation of it), each proposal token adds
  alpha*log p - log q = (alpha - beta)*log p + log sum_S p^beta <= 0 to log r, so once the running sum plus
  the largest possible length term is below log u, the move is rejected without generating the rest.
- The current suffix as a free draft: while an MH proposal still equals the current state's suffix, the next
  ``draft_tokens`` tokens of that suffix are fed in the same call; draft d is kept with probability q(d), else a
  token is drawn from q without d. That is an exact draw from q (speculative sampling with a point-mass draft),
  and at temperature 1/alpha proposals often repeat the current suffix for many tokens.
- Holes are squeezed out now and then: by gathering the cache tensors (HF ``DynamicCache``), or for any other
  cache by cropping to the prompt and re-running the kept tokens in two batched calls.

Randomness comes from ``RowRNG``: each call draws the same number of values for every row, and a row's
trajectory depends only on its own draws, so a chain's result does not depend on its batch-mates.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch

from . import hf_compat
from .generate import GenerateOutput
from .lm import check_decode_inputs, check_logits, forward_step, length_mask
from .rng import GeneratorLike, RowRNG, splitmix64

# float32 log-softmax can put a near-certain token's log p a hair above 0: slack per remaining token in the bound.
_BOUND_SLACK = 1e-4


_LANE_DOMAIN = 0x5DEECE66D  # salt: lane streams never coincide with the row streams they derive from


def lane_rng(rng: RowRNG, lanes: int) -> RowRNG:
    """``lanes`` random streams per row, row-major (row b's lane k is row b*lanes + k of the result).

    Each lane's seed is a hash of its row's seed and k only, so lanes (SMC particles, multiple-try proposals) keep
    the batch invariance of ``RowRNG``: a request's draws never depend on what else shares its batch.
    """
    lane = torch.arange(lanes, dtype=torch.int64, device=rng.device)
    seeds = splitmix64(rng.seeds[:, None] ^ splitmix64(lane + _LANE_DOMAIN)[None, :]).reshape(-1)
    return RowRNG(seeds, rng.counter)


# ---- argument checks shared with PowerSMC (bools are not numbers here: True is not an alpha of 1) ---------------
def check_positive_number(name: str, value, *, allow_none: bool = False, note: str = "") -> float | None:
    """``value`` as a float if it is a finite real number > 0 (None allowed if ``allow_none``), else ValueError."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0{note}, got {value!r}")
    return float(value)


def check_fraction(name: str, value, *, allow_none: bool = False, note: str = "") -> float | None:
    """``value`` as a float if it is a real number in (0, 1] (None allowed if ``allow_none``), else ValueError."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value <= 1):
        extra = " (or None)" if allow_none else ""
        raise ValueError(f"{name} must be a number in (0, 1]{extra}{note}, got {value!r}")
    return float(value)


def check_integer(name: str, value, minimum: int, *, allow_none: bool = False, note: str = "") -> int | None:
    """``value`` if it is an integer >= ``minimum`` (None allowed if ``allow_none``), else ValueError."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        extra = " (or None)" if allow_none else ""
        raise ValueError(f"{name} must be an integer >= {minimum}{extra}{note}, got {value!r}")
    return value


def proposal_settings(alpha: float, proposal_temperature, proposal_warpers, proposal_top_k,
                      proposal_top_p) -> tuple[float, list[Callable]]:
    """Validated proposal temperature (None: 1/alpha) and warper list (``proposal_top_k``/``_top_p`` appended)."""
    from .warpers import TopK, TopP

    temperature = check_positive_number("proposal_temperature", proposal_temperature, allow_none=True,
                                        note=" (None: 1/alpha)")
    warpers = [proposal_warpers] if callable(proposal_warpers) else list(proposal_warpers)
    if not all(callable(w) for w in warpers):
        raise ValueError("proposal_warpers must be callables (input_ids, scores) -> scores, got "
                         f"{[type(w).__name__ for w in warpers]}")
    if proposal_top_k is not None:
        warpers.append(TopK(check_integer("proposal_top_k", proposal_top_k, 1, allow_none=True)))
    if proposal_top_p is not None:
        warpers.append(TopP(check_fraction("proposal_top_p", proposal_top_p, allow_none=True)))
    return (1.0 / alpha if temperature is None else temperature), warpers


def proposal_logits(scores: torch.Tensor, input_ids: torch.Tensor, temperature: float,
                    warpers: Sequence[Callable]) -> torch.Tensor:
    """The proposal q's logits: the base model's raw logits at ``temperature``, then the warpers in order."""
    scores = scores / temperature
    for warper in warpers:
        scores = warper(input_ids, scores)
    return scores


def early_rejection_bound_holds(alpha: float, proposal_temperature: float, warpers: Sequence[Callable]) -> bool:
    """Each proposal token adds alpha*log p - log q <= 0 to log r when q is p^beta (1 <= beta <= alpha),
    renormalised, or a truncation of it: warpers that only remove tokens (``truncating``) keep that true."""
    beta = 1.0 / proposal_temperature
    return (1.0 - 1e-9 <= beta <= alpha * (1 + 1e-9)
            and all(hf_compat.warper_capabilities(w).truncating for w in warpers))


def warpers_read_context(warpers: Sequence[Callable]) -> bool:
    """Whether any warper reads input_ids (then each row's context tensor must be built for it)."""
    return any(hf_compat.warper_capabilities(w).reads_input_ids for w in warpers)


class _Chain:
    """One row's MH chain: the current state, the move in progress and its counters (plain Python lists)."""

    def __init__(self, row: int, prompt_token: int, first_budget: int, mcmc_steps: int, alpha: float):
        self.row, self.alpha = row, alpha
        self.prompt_token = prompt_token  # last prompt token: re-fed when a move cuts at position 0
        self.tokens: list[int] = []
        self.logp: list[float] = []
        self.logq: list[float] = []
        self.weight: list[float] = []  # alpha*logp - logq per token
        self.loc: list[int] = []  # cache column of each state token (-1: not in the cache)
        self.finished = False  # the state ends with EOS
        self.done = False
        self.waiting = False  # multiple-try lane idle until its group decides (or while the leader extends)
        self.block, self.budget, self.steps_left = 0, first_budget, mcmc_steps
        self.proposed = self.accepted = self.early_rejected = 0
        self.forward_tokens = 0
        # the move in progress
        self.is_mh = False
        self.cut = 0
        self.log_u = 0.0
        self.current_weight = 0.0  # sum of weight over the current suffix tokens[cut:]
        self.refeed_loc = -1
        self.new_tokens: list[int] = []
        self.new_logp: list[float] = []
        self.new_logq: list[float] = []
        self.new_loc: list[int] = []
        self.new_weight = 0.0
        self.new_finished = False
        self.matching = False  # the proposal so far equals tokens[cut:cut+len(new_tokens)]
        # what the row fed in the last call: count, draft tokens after the first, cache columns
        self.fed_count, self.fed_drafts, self.fed_columns = 0, [], []

    def begin_move(self, is_mh: bool, cut: int, log_u: float) -> None:
        self.is_mh, self.cut, self.log_u = is_mh, cut, log_u
        self.matching = is_mh
        self.current_weight = math.fsum(self.weight[cut:])
        self.refeed_loc = -1
        self.new_tokens, self.new_logp, self.new_logq, self.new_loc = [], [], [], []
        self.new_weight = 0.0
        self.new_finished = False

    def refeed_token(self) -> int:
        return self.prompt_token if self.cut == 0 else self.tokens[self.cut - 1]

    def log_ratio(self) -> float:
        n, n_new = len(self.tokens), self.cut + len(self.new_tokens)
        return self.new_weight - self.current_weight + math.log(n) - math.log(n_new)

    def rejection_bound(self) -> float:
        """An upper bound on log r whatever the rest of the proposal is (valid when every weight is <= 0)."""
        n, generated = len(self.tokens), self.cut + len(self.new_tokens)
        return (self.new_weight - self.current_weight + math.log(n) - math.log(generated + 1)
                + _BOUND_SLACK * (self.budget - generated))

    def commit(self) -> None:
        """Replace the suffix from the cut with the proposal (always done for a block extension)."""
        c = self.cut
        if c >= 1:
            # The re-fed copy of token c-1 saw exactly tokens[:c-1]: a valid entry for it in the new state.
            self.loc[c - 1] = self.refeed_loc
        self.tokens = self.tokens[:c] + self.new_tokens
        self.logp = self.logp[:c] + self.new_logp
        self.logq = self.logq[:c] + self.new_logq
        self.weight = self.weight[:c] + [self.alpha * lp - lq for lp, lq in zip(self.new_logp, self.new_logq)]
        # every proposal token but the last was fed back, so it has a cache entry
        self.loc = self.loc[:c] + self.new_loc + [-1] * (len(self.new_tokens) - len(self.new_loc))
        self.finished = self.new_finished


class PowerSampler:
    """Exact Metropolis-Hastings sampler for p(x)^alpha over whole continuations (see module docstring).

    ``block_size`` (or, when None, ``ceil(max_new_tokens / num_blocks)``) sets how much the continuation grows
    between rounds of ``mcmc_steps`` MH moves; the last block may be shorter. ``proposal_temperature`` defaults
    to 1/alpha. ``proposal_warpers`` (HF-style ``(input_ids, scores) -> scores`` callables, applied after the
    temperature) shape q; the ratio always uses the warped q, so the chain stays exact for the target restricted
    to sequences the warped proposal can produce (a truncation such as top-k changes that support; see
    docs/power.md). ``early_rejection`` (None: on whenever the bound is valid) stops a proposal as soon as it
    can no longer be accepted. ``stop_at_eos=True`` reproduces the official code's early exit (a chain stops
    after the block in which its state reached EOS); it is not exact for the full-budget target.
    ``draft_tokens`` guesses from the current suffix are fed per call while a proposal still repeats it (exact;
    0 turns it off). ``compaction`` picks how holes leave the cache ("auto": gather for HF DynamicCache,
    re-prefill otherwise). ``proposals`` (K > 1) turns each move into a multiple-try move over K candidates drawn
    in parallel lanes (exact; early rejection off). ``proposal_top_k`` / ``proposal_top_p`` append our TopK / TopP
    to ``proposal_warpers`` (so that spec strings can set them).
    """

    def __init__(self, alpha: float = 4.0, mcmc_steps: int = 10, block_size: int | None = None,
                 num_blocks: int = 16, proposal_temperature: float | None = None,
                 proposal_warpers: Callable | Sequence[Callable] = (), early_rejection: bool | None = None,
                 stop_at_eos: bool = False, pad_token_id: int | None = None, compaction: str = "auto",
                 draft_tokens: int = 8, proposals: int = 1, proposal_top_k: int | None = None,
                 proposal_top_p: float | None = None):
        self.alpha = check_positive_number("alpha", alpha)
        self.mcmc_steps = check_integer("mcmc_steps", mcmc_steps, 0)
        self.block_size = check_integer("block_size", block_size, 1, allow_none=True)
        self.num_blocks = check_integer("num_blocks", num_blocks, 1)
        self.draft_tokens = check_integer("draft_tokens", draft_tokens, 0, note=" (0: no drafts)")
        self.proposals = check_integer("proposals", proposals, 1, note=" (1: plain MH, K > 1: multiple-try MH)")
        if compaction not in ("auto", "gather", "prefill"):
            raise ValueError(f"compaction must be 'auto', 'gather' or 'prefill', got {compaction!r}")
        self.proposal_temperature, self.proposal_warpers = proposal_settings(
            self.alpha, proposal_temperature, proposal_warpers, proposal_top_k, proposal_top_p)
        for name, value in (("early_rejection", early_rejection), ("stop_at_eos", stop_at_eos)):
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False{' (or None)' if name == 'early_rejection' else ''}, "
                                 f"got {value!r}")
        if pad_token_id is not None:
            check_integer("pad_token_id", pad_token_id, 0, allow_none=True)
        bound_valid = early_rejection_bound_holds(self.alpha, self.proposal_temperature, self.proposal_warpers)
        if early_rejection and not bound_valid:
            raise ValueError(
                "early_rejection=True needs 1 <= 1/proposal_temperature <= alpha and only truncating proposal "
                f"warpers (top-k/top-p/min-p/typical); got alpha={alpha}, proposal_temperature="
                f"{self.proposal_temperature}, warpers={[type(w).__name__ for w in self.proposal_warpers]}. "
                "Use None or False"
            )
        if early_rejection and self.proposals > 1:
            raise ValueError("early_rejection=True needs proposals=1: a multiple-try move weighs all K complete "
                             "proposals, so none can be rejected early. Use None or False")
        self.early_rejection = (bound_valid and self.proposals == 1) if early_rejection is None else early_rejection
        self.stop_at_eos = stop_at_eos
        self.pad_token_id = pad_token_id
        self.compaction = compaction

    def budgets(self, max_new_tokens: int) -> list[int]:
        """The length budget of each block: block_size, 2*block_size, ..., max_new_tokens."""
        size = self.block_size or -(-max_new_tokens // self.num_blocks)
        return [min(k * size, max_new_tokens) for k in range(1, -(-max_new_tokens // size) + 1)]

    def proposal_scores(self, scores: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits of the proposal q from the base model's raw logits."""
        return proposal_logits(scores, input_ids, self.proposal_temperature, self.proposal_warpers)

    @torch.no_grad()
    def generate(self, model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *,
                 attention_mask: torch.Tensor | None = None, eos_token_id: int | Sequence[int] | None = None,
                 generator: GeneratorLike = None) -> GenerateOutput:
        """Run one chain per row of (left-padded) ``input_ids`` and return the final states.

        ``generator`` seeds the per-row streams (``RowRNG.from_generator``; per-row seeds make each chain
        independent of its batch-mates). ``eos_token_id=None``: continuations always run to the budget.
        """
        attention_mask = check_decode_inputs(model, input_ids, attention_mask, max_new_tokens)
        batch, prompt_length = input_ids.shape
        device = input_ids.device
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("attention_mask: prompts must be left padded (every row's last position is a token)")
        eos = set() if eos_token_id is None else ({eos_token_id} if isinstance(eos_token_id, int)
                                                   else set(eos_token_id))
        pad = self.pad_token_id if self.pad_token_id is not None else (min(eos) if eos else 0)
        rng = RowRNG.from_generator(generator, batch, device)
        start = time.perf_counter()
        run = _Run(self, model, input_ids, attention_mask, max_new_tokens, eos, pad, rng)
        run.loop()
        return run.output(time.perf_counter() - start)


class _Run:
    """The state of one ``generate`` call: the batched cache, the per-row context masks and the chains."""

    def __init__(self, sampler: PowerSampler, model, input_ids, attention_mask, max_new_tokens, eos, pad, rng):
        self.sampler, self.model, self.eos, self.pad = sampler, model, eos, pad
        self.device = input_ids.device
        self.groups, self.prompt_length = input_ids.shape
        # Multiple-try MH: K lanes (batch rows) per chain, row b*K + k; lane 0 (the leader) holds the chain's
        # counters and its uniforms drive the chain's cut, acceptance and selection.
        self.lanes = lanes = sampler.proposals
        self.batch = self.groups * lanes
        lane_rows = torch.arange(self.groups, device=self.device).repeat_interleave(lanes)
        self.input_ids = input_ids[lane_rows] if lanes > 1 else input_ids
        self.rng = lane_rng(rng, lanes) if lanes > 1 else rng
        # per call: [cut, accept, (select, if K > 1), one per draft position]
        self.draft_offset = 2 if lanes == 1 else 3
        self.call_uniforms: list[list[float]] = []
        self.pending_copies: dict[int, int] = {}  # cache row -> the row it must become a copy of
        self.budgets = sampler.budgets(max_new_tokens)
        self.max_new_tokens = max_new_tokens
        self.prompt_mask = attention_mask.bool().cpu()[lane_rows.cpu()]
        self.prompt_real = self.prompt_mask.sum(dim=1).tolist()
        # Compact when the cache has this many columns past the prompt (holes included).
        self.compact_at = 3 * max_new_tokens + 16
        # Which cache columns each row's next fed token may attend to (kept on the CPU: updated per chain).
        self.ctx = torch.zeros((self.batch, self.prompt_length + self.compact_at + sampler.draft_tokens + 2),
                               dtype=torch.bool)
        self.ctx[:, :self.prompt_length] = self.prompt_mask
        self.width = self.prompt_length  # cache columns
        self.calls = 0
        self.batch_forward_tokens = 0
        self.compactions = 0
        self.needs_context = warpers_read_context(sampler.proposal_warpers)
        # Drafts need the warped q at several positions of a row at once: only for context-free warpers.
        self.draft_len = 0 if self.needs_context else sampler.draft_tokens
        prompt_last = self.input_ids[:, -1].tolist()
        self.chains = [_Chain(b, prompt_last[b], self.budgets[0], sampler.mcmc_steps, sampler.alpha)
                       for b in range(self.batch)]
        for chain in self.chains:
            leader = chain.row % lanes == 0
            chain.forward_tokens = self.prompt_real[chain.row] if leader else 0
            # The first move extends the empty state by block 1; the prompt's last position plays the re-fed token.
            chain.begin_move(is_mh=False, cut=0, log_u=0.0)
            chain.refeed_loc = self.prompt_length - 1
            chain.fed_count, chain.fed_drafts, chain.fed_columns = 1, [], [self.prompt_length - 1]
            chain.waiting = not leader  # only the leader extends a state; the other lanes get copies of it
        logits, self.cache = forward_step(model, input_ids, attention_mask, None)
        if lanes > 1:
            self.cache.reorder_cache(lane_rows)  # each prompt's cache, copied to its lanes (run once per chain)
            logits = logits[lane_rows]
        self.calls += 1
        self.batch_forward_tokens += self.groups * self.prompt_length
        self.logits = logits[:, -1:]

    # ---- the main loop -------------------------------------------------------------------------------------
    def loop(self) -> None:
        sampler, draft_len = self.sampler, self.draft_len
        while True:
            batch, width, vocab = self.logits.shape
            real = torch.tensor([[not (c.done or c.waiting) and j < c.fed_count for j in range(width)]
                                 for c in self.chains], device=self.device)
            check_logits(self.logits[real], where=f"model logits at call {self.calls}")
            raw_logp = torch.log_softmax(self.logits, dim=-1)
            # position by position, so that warpers with per-row parameters ([B] tensors) see B rows
            context = self._context_ids()
            proposal = torch.stack([sampler.proposal_scores(self.logits[:, j], context) for j in range(width)], 1)
            logq = torch.log_softmax(proposal, dim=-1)
            # Score every fed draft token (a guess for the next proposal token) under p and q in one go.
            drafts = torch.tensor([c.fed_drafts + [0] * (width - len(c.fed_drafts)) for c in self.chains],
                                  device=self.device)
            draft_logp, draft_logq = torch.stack([raw_logp.gather(2, drafts[..., None]).squeeze(2),
                                                  logq.gather(2, drafts[..., None]).squeeze(2)]).tolist()
            # The same draws for every row on every call, so that a row's randomness ignores its batch-mates:
            # [cut, accept, (select), one per draft position], then one categorical draw.
            uniforms = self.call_uniforms = self.rng.uniform(self.draft_offset + draft_len).tolist()
            stops = [None if c.done or c.waiting
                     else self._walk_drafts(c, draft_logp[c.row], draft_logq[c.row], uniforms[c.row])
                     for c in self.chains]
            rows = torch.arange(batch, device=self.device)
            position = torch.tensor([s[0] if s else 0 for s in stops], device=self.device)
            excluded = torch.tensor([s[1] if s else -1 for s in stops], device=self.device)
            # A rejected draft token d is resampled from q without d: together that is an exact draw from q.
            scores = proposal[rows, position]
            scores = torch.where(torch.arange(vocab, device=self.device)[None, :] == excluded[:, None],
                                 float("-inf"), scores)
            tokens = self.rng.categorical(scores)
            token_logp = raw_logp[rows, position].gather(1, tokens[:, None]).squeeze(1)
            token_logq = logq[rows, position].gather(1, tokens[:, None]).squeeze(1)
            # one host transfer for the three (token ids are exact in float64)
            tokens, token_logp, token_logq = torch.stack([tokens.double(), token_logp.double(),
                                                          token_logq.double()]).tolist()
            tokens = [int(t) for t in tokens]
            for chain, stop in zip(self.chains, stops):
                if stop is not None:
                    b = chain.row
                    self._record(chain, tokens[b], token_logp[b], token_logq[b], None, uniforms[b])
            if all(c.done for c in self.chains):
                break
            feeds = [[] if c.done or c.waiting else self._next_feed(c) for c in self.chains]
            self._apply_copies()
            if self.width - self.prompt_length + max(len(f) for f in feeds) > self.compact_at:
                self._compact()
            self._call(feeds)

    def _walk_drafts(self, chain: _Chain, draft_logp, draft_logq, uniforms) -> tuple[int, int] | None:
        """Accept the chain's fed draft tokens one by one (draft d is kept with probability q(d)).

        Returns (position, excluded token) where a fresh token must be drawn (excluded = the rejected draft,
        or -1 after the last draft), or None when the move ended on a draft token.
        """
        for j, token in enumerate(chain.fed_drafts):
            if uniforms[self.draft_offset + j] < math.exp(draft_logq[j]):
                if self._record(chain, token, draft_logp[j], draft_logq[j], chain.fed_columns[j + 1], uniforms):
                    return None
            else:
                # the rejected draft and the drafts after it (they saw it) are not part of the proposal: holes
                self.ctx[chain.row, chain.fed_columns[j + 1:chain.fed_count]] = False
                return j, token
        return len(chain.fed_drafts), -1

    def _record(self, chain: _Chain, token: int, logp: float, logq: float, column: int | None,
                uniforms) -> bool:
        """Append a proposal token (``column``: its cache entry if it was fed); True if the move is over."""
        position = chain.cut + len(chain.new_tokens)
        chain.matching = chain.matching and position < len(chain.tokens) and chain.tokens[position] == token
        chain.new_tokens.append(token)
        chain.new_logp.append(logp)
        chain.new_logq.append(logq)
        chain.new_weight += self.sampler.alpha * logp - logq
        if column is not None:
            chain.new_loc.append(column)
        if token in self.eos or position + 1 >= chain.budget:
            chain.new_finished = token in self.eos
            if self.lanes > 1:
                self._lane_complete(chain)
                return True
            if not chain.is_mh:
                chain.commit()
            else:
                chain.proposed += 1
                if chain.log_u < chain.log_ratio():
                    chain.accepted += 1
                    chain.commit()
        elif chain.is_mh and self.sampler.early_rejection and chain.rejection_bound() < chain.log_u:
            chain.proposed += 1
            chain.early_rejected += 1
        else:
            return False
        self._next_move(chain, uniforms[0], uniforms[1])
        return True

    # ---- multiple-try MH: K lanes per chain ----------------------------------------------------------------
    def _lane_complete(self, lane: _Chain) -> None:
        """A lane's proposal (or the leader's block extension) is complete; decide when the whole group is."""
        first = lane.row - lane.row % self.lanes
        group = self.chains[first:first + self.lanes]
        leader = group[0]
        u_cut, u_accept, u_select = self.call_uniforms[leader.row][:3]
        if not lane.is_mh:  # the leader extended the state: every lane continues from a copy of it
            lane.commit()
            self._copy_state(group, lane)
        else:
            lane.waiting = True
            if not all(other.waiting for other in group):
                return
            self._multiple_try_step(group, u_select)
        for other in group:
            other.waiting = False
            self._next_move(other, u_cut, u_accept)
        if not leader.done and not leader.is_mh:
            for other in group[1:]:
                other.waiting = True

    def _multiple_try_step(self, group: list[_Chain], u_select: float) -> None:
        """Multiple-try Metropolis with independent proposals given the prefix (docs/power.md derives it).

        Weights w_j = p(y_j)^alpha / q(y_j) over the K suffixes; y_J is selected with probability w_J / W and
        accepted with min(1, n / n_J * W / (W - w_J + w(x))), n and n_J the lengths of the state and of y_J.
        """
        leader = group[0]
        log_w = torch.tensor([lane.new_weight for lane in group], dtype=torch.float64)
        chosen = min(int(torch.searchsorted(torch.softmax(log_w, 0).cumsum(0), torch.tensor(u_select,
                                                                                         dtype=torch.float64),
                                            right=True)), self.lanes - 1)
        selected = group[chosen]
        others = torch.cat([log_w[:chosen], log_w[chosen + 1:]])
        log_reverse = float(torch.logaddexp(torch.logsumexp(others, 0), torch.tensor(leader.current_weight,
                                                                                     dtype=torch.float64)))
        n, n_new = len(leader.tokens), selected.cut + len(selected.new_tokens)
        log_ratio = float(torch.logsumexp(log_w, 0)) - log_reverse + math.log(n) - math.log(n_new)
        leader.proposed += 1
        if leader.log_u < log_ratio:
            leader.accepted += 1
            selected.commit()
            self._copy_state(group, selected)

    def _copy_state(self, group: list[_Chain], source: _Chain) -> None:
        """Every lane of the group takes ``source``'s state (token lists and cache row, copied before the next call)."""
        for lane in group:
            if lane is source:
                continue
            lane.tokens, lane.logp, lane.logq = list(source.tokens), list(source.logp), list(source.logq)
            lane.weight, lane.loc, lane.finished = list(source.weight), list(source.loc), source.finished
            self.pending_copies[lane.row] = source.row

    def _apply_copies(self) -> None:
        if not self.pending_copies:
            return
        index = torch.arange(self.batch)
        for row, source in self.pending_copies.items():
            index[row] = source
        self.cache.reorder_cache(index.to(self.device))
        self.pending_copies = {}

    def _next_feed(self, chain: _Chain) -> list[int]:
        """The tokens a chain feeds next: the re-fed token or its last proposal token, then draft guesses.

        While an MH proposal still equals the current state's suffix, the rest of that suffix is the natural
        guess for what it samples next (at temperature 1/alpha it often is): feeding it in the same call scores
        several proposal tokens for the price of one sequential step.
        """
        first = chain.new_tokens[-1] if chain.new_tokens else chain.refeed_token()
        start = chain.cut + len(chain.new_tokens)
        drafts = chain.tokens[start:start + self.draft_len] if chain.matching else []
        return [first] + drafts

    def _next_move(self, chain: _Chain, u_cut: float, u_accept: float) -> None:
        """Start the chain's next MH move or block extension (or mark it done), and reset its context mask."""
        sampler = self.sampler
        while True:
            if chain.steps_left > 0:
                chain.steps_left -= 1
                n = len(chain.tokens)
                cut = min(int(u_cut * n), n - 1)
                chain.begin_move(is_mh=True, cut=cut, log_u=math.log(u_accept) if u_accept > 0 else -math.inf)
                break
            if chain.block + 1 >= len(self.budgets) or (chain.finished and sampler.stop_at_eos):
                chain.done = True
                break
            chain.block += 1
            chain.budget = self.budgets[chain.block]
            chain.steps_left = sampler.mcmc_steps
            if not chain.finished:
                chain.begin_move(is_mh=False, cut=len(chain.tokens), log_u=0.0)
                break
            # An EOS-terminated state has nothing to extend, but the larger budget lets MH moves propose longer
            # continuations: the next block's target differs, so its moves still run.
        self._reset_context(chain)

    def _reset_context(self, chain: _Chain) -> None:
        """The context of the chain's next fed token: prompt + tokens before its cut (+ the move's own entries)."""
        row = self.ctx[chain.row]
        row[:] = False
        row[:self.prompt_length] = self.prompt_mask[chain.row]
        if chain.done:
            return
        if chain.cut == 0:
            row[self.prompt_length - 1] = False  # the re-fed copy of the last prompt token replaces it
        if chain.cut >= 2:
            row[chain.loc[:chain.cut - 1]] = True
        if chain.refeed_loc >= 0:
            row[chain.refeed_loc] = True
        if chain.new_loc:
            row[chain.new_loc] = True

    def _call(self, feeds: list[list[int]]) -> None:
        width, column = max(len(f) for f in feeds), self.width
        for chain, fed in zip(self.chains, feeds):
            chain.fed_count, chain.fed_drafts = len(fed), fed[1:]
            chain.fed_columns = list(range(column, column + len(fed)))
            if not fed:
                continue
            self.ctx[chain.row, column:column + len(fed)] = True
            chain.forward_tokens += len(fed)
            if chain.refeed_loc < 0:
                chain.refeed_loc = column
            else:
                chain.new_loc.append(column)
        ids = torch.tensor([f + [self.pad] * (width - len(f)) for f in feeds], device=self.device)
        mask = self.ctx[:, :column + width].to(self.device, torch.long)
        self.logits, self.cache = forward_step(self.model, ids, mask, self.cache)
        self.width += width
        self.calls += 1
        self.batch_forward_tokens += ids.numel()

    def _context_ids(self) -> torch.Tensor:
        """Each row's context tokens (left padded) for warpers that read input_ids, else an empty tensor."""
        if not self.needs_context:
            return self.input_ids[:, :0]
        rows = []
        for chain in self.chains:
            prompt = self.input_ids[chain.row].tolist()
            rows.append(prompt + chain.tokens[:chain.cut] + chain.new_tokens)
        width = max(len(r) for r in rows)
        padded = [[self.pad] * (width - len(r)) + r for r in rows]
        return torch.tensor(padded, device=self.device)

    # ---- squeezing the holes out of the cache ------------------------------------------------------------
    def _compact(self) -> None:
        self.compactions += 1
        gather_ok = hf_compat.is_plain_dynamic_cache(self.cache)
        mode = self.sampler.compaction
        if mode == "gather" and not gather_ok:
            raise ValueError("compaction='gather' needs an HF DynamicCache; use 'auto' or 'prefill'")
        if gather_ok and mode != "prefill":
            self._compact_by_gather()
        else:
            self._compact_by_prefill()

    def _kept_columns(self, chain: _Chain) -> list[int]:
        kept = [loc for loc in chain.loc if loc >= 0]
        if chain.refeed_loc >= self.prompt_length:
            kept.append(chain.refeed_loc)
        return sorted(kept + chain.new_loc)

    def _compact_by_gather(self) -> None:
        P = self.prompt_length
        kept = [[] if c.done else self._kept_columns(c) for c in self.chains]
        new_width = P + max(len(k) for k in kept)
        index = torch.zeros((self.batch, new_width), dtype=torch.long)
        index[:, :P] = torch.arange(P)
        for chain, columns in zip(self.chains, kept):
            if chain.done:
                self._forget_cache(chain)
                continue
            remap = {old: P + i for i, old in enumerate(columns)}
            index[chain.row, P:P + len(columns)] = torch.tensor(columns, dtype=torch.long)
            chain.loc = [remap[loc] if loc >= 0 else -1 for loc in chain.loc]
            if chain.refeed_loc >= P:
                chain.refeed_loc = remap[chain.refeed_loc]
            chain.new_loc = [remap[loc] for loc in chain.new_loc]
        hf_compat.gather_cache_columns(self.cache, index.to(self.device))
        self._after_compaction(new_width)

    @staticmethod
    def _forget_cache(chain: _Chain) -> None:
        """A finished chain keeps no cache entries (its result is in its token lists)."""
        chain.loc = [-1] * len(chain.tokens)
        chain.refeed_loc, chain.new_loc = -1, []

    def _compact_by_prefill(self) -> None:
        """For caches we cannot index: crop to the prompt, re-run each row's state, then its move's branch."""
        P = self.prompt_length
        if self.width > P:
            self.cache.crop(-(self.width - P))  # negative: drop that many (transformers 5 refuses a positive size)
        # Call 1: the state tokens that must be cached (all but the last), right padded.
        states = [[] if c.done else c.tokens[:max(len(c.tokens) - 1, 0)] for c in self.chains]
        width1 = max(len(s) for s in states)
        for chain, state in zip(self.chains, states):
            if chain.done:
                self._forget_cache(chain)
                continue
            chain.loc = [P + j for j in range(len(state))] + [-1] * (len(chain.tokens) - len(state))
        base = torch.zeros((self.batch, P + width1), dtype=torch.bool)
        base[:, :P] = self.prompt_mask
        for b, state in enumerate(states):
            base[b, P:P + len(state)] = True
        if width1:
            self._prefill([s + [self.pad] * (width1 - len(s)) for s in states], base, [len(s) for s in states])
        # Call 2: each active move's re-fed token and fed proposal tokens, seeing only the prefix before the cut.
        branches = []
        for chain in self.chains:
            fed = chain.refeed_loc >= 0 and not chain.done
            branches.append(([chain.refeed_token()] + chain.new_tokens[:len(chain.new_loc)]) if fed else [])
        width2 = max(len(s) for s in branches)
        mask = torch.zeros((self.batch, P + width1 + width2), dtype=torch.bool)
        for chain, branch in zip(self.chains, branches):
            row = mask[chain.row]
            row[:P] = self.prompt_mask[chain.row]
            if not branch:
                continue
            if chain.cut == 0:
                row[P - 1] = False
            row[P:P + max(chain.cut - 1, 0)] = True
            row[P + width1:P + width1 + len(branch)] = True
            chain.refeed_loc = P + width1
            chain.new_loc = list(range(P + width1 + 1, P + width1 + len(branch)))
        if width2:
            self._prefill([s + [self.pad] * (width2 - len(s)) for s in branches], mask, [len(s) for s in branches])
        self._after_compaction(P + width1 + width2)

    def _prefill(self, rows: list[list[int]], mask: torch.Tensor, real: list[int]) -> None:
        ids = torch.tensor(rows, device=self.device)
        for chain, count in zip(self.chains, real):
            chain.forward_tokens += count
        _, self.cache = forward_step(self.model, ids, mask.to(self.device, torch.long), self.cache)
        self.calls += 1
        self.batch_forward_tokens += ids.numel()

    def _after_compaction(self, new_width: int) -> None:
        self.width = new_width
        self.ctx[:] = False
        for chain in self.chains:
            self._reset_context(chain)

    # ---- the result ----------------------------------------------------------------------------------------
    def output(self, seconds: float) -> GenerateOutput:
        leaders = self.chains[::self.lanes]
        work = [sum(lane.forward_tokens for lane in self.chains[b * self.lanes:(b + 1) * self.lanes])
                for b in range(self.groups)]
        lengths = [len(c.tokens) for c in leaders]
        width = max(lengths)
        new = torch.full((self.groups, width), self.pad, dtype=torch.long)
        logprobs = torch.zeros((self.groups, width), dtype=torch.float32)
        for b, c in enumerate(leaders):
            new[b, :len(c.tokens)] = torch.tensor(c.tokens, dtype=torch.long)
            logprobs[b, :len(c.tokens)] = torch.tensor(c.logp, dtype=torch.float32)

        def per_row(values, dtype=torch.long):  # on the device of the sequences, like every output tensor
            return torch.tensor(values, dtype=dtype, device=self.device)

        valid = length_mask(per_row(lengths), width)
        return GenerateOutput(
            sequences=torch.cat([self.input_ids[::self.lanes], new.to(self.device)], dim=1),
            attention_mask=torch.cat([self.prompt_mask[::self.lanes].long(), valid.long()], dim=1).to(self.device),
            logprobs=logprobs.to(self.device),
            lengths=per_row(lengths),
            prompt_length=self.prompt_length,
            forward_tokens=per_row(work),
            model_calls=self.calls,
            seconds=seconds,
            stats={
                "proposed": per_row([c.proposed for c in leaders]),  # [B] MH moves attempted
                "accepted": per_row([c.accepted for c in leaders]),  # [B] MH moves accepted
                "early_rejected": per_row([c.early_rejected for c in leaders]),  # [B] stopped before the end
                "log_p": per_row([math.fsum(c.logp) for c in leaders], torch.float64),  # [B] exact sums
                "log_q": per_row([math.fsum(c.logq) for c in leaders], torch.float64),  # [B] under q
                "batch_forward_tokens": self.batch_forward_tokens,  # positions run, padding and idle rows included
                "compactions": self.compactions,
                "budgets": self.budgets,
            },
        )
