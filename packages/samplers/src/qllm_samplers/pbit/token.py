"""Sampling a token with a network of p-bits: one bit per candidate token, a one-hot penalty between them.

The energy of y in {0, 1}^V is

    E(y) = -sum_k z_k y_k + lam (sum_k y_k - 1)^2
         = -1/2 y^T J y - h^T y + lam   with J_ij = -2 lam (i != j), h_k = z_k + lam,

a binary Boltzmann machine (``OneHotNetwork.as_pbit_network`` builds it for the general simulator), whose p-bit
update is P(y_i = 1 | rest) = sigmoid(beta (z_i - lam (2 S - 1))), S = sum_{k != i} y_k. Restricted to one-hot
states the Boltzmann distribution is exactly softmax(beta z) for every lam; lam only sets how much mass sits
on the other states and how high the barriers between one-hot states are.

Every mode but ``original`` first recentres the logits by their log-sum-exp, z' = z - logsumexp(beta z) / beta,
so beta z' is the log-probability of each token: adding a constant to z changes nothing, one-hot states carry
almost all the mass (the empty state has relative weight e^{-beta lam}, all two-hot states together about
e^{-beta lam} / 2) and the barrier out of token k, beta lam + log p_k, is lowest for the tokens the chain should
leave most often. Only beta z' and beta lam enter the dynamics.

Modes (``PBitSampler(mode=...)``):
- ``original``: qllm-pbits' own protocol (Farx1/qllm_pbits ``PBitOneHotSampler``), exactly: raw logits beta z
  (not recentred), each attempt from a uniformly chosen one-hot state, ``sweeps + sweeps // 2`` = 150 random
  single-bit updates (its n_gibbs_steps = 100 plus burn-in 50), ``max_retries + 1`` = 3 fresh attempts, then the
  argmax. At lam >= 10 the chain never leaves its first hot bit within 150 updates, so the draw is uniform over
  the candidates (TV(uniform, softmax) = 0.371 for its V=32 logits); see docs/pbit.md.
- ``gibbs`` (ours): the same single-bit p-bit network on recentred logits, run long enough to mix. ``sweeps``
  sweeps of single-bit p-bit updates (``update=
  "random"`` scan by default, or ``"sequential"``, which mixes far slower because the hot bit drifts along
  the scan order) from the empty state; when the final state is not one-hot the chain runs
  another ``sweeps`` sweeps, up to ``max_retries`` times, then a counted fallback. Exact only in the limit of
  many sweeps: single flips must cross the barrier above.
- ``swap``: the hot bit moves i -> j (j uniform over the candidates) with the p-bit probability
  sigmoid(beta (z_j - z_i)) (Barker's rule): always one-hot, and its stationary law is exactly softmax. The
  chain starts on the most likely token; a sweep is K proposals.
- ``shifted``: with the log-sum-exp shift and ``lam = 0`` the p-bits decouple: bit k is on with probability
  sigmoid(log p_k) = p_k / (1 + p_k), independently, so one parallel update is an exact draw from the product
  law, and conditioned on exactly one bit on it is exactly softmax (accepted with probability
  1 / prod_k (1 + p_k) >= 1/e). Draws that are not one-hot are redrawn (``max_retries``), then a counted
  fallback. ``lam`` must be 0 here (and in ``swap``, whose states are one-hot by construction).
- ``tempering``: replica exchange over a ladder of ``replicas`` penalties lam_r = lam (r / (R-1))^3 (0 to lam).
  The lam_0 replica is the exact decoupled network, redrawn each round; the others do one p-bit sweep per
  round (sequential scan by default); then neighbours (0,1), (1,2), ... swap states with the Metropolis
  probability min(1, exp(beta (lam_r+1 - lam_r)(P_r+1 - P_r))), P = (S - 1)^2. A one-hot draw of the lam_0
  replica climbs the whole ladder in one round, so the target replica mixes at any lam (lam = 100 included).
  ``sweeps`` counts rounds. The lam_0 replica is one-hot with probability 1 / prod_k (1 + p_k) >= 1/e and a
  swap between two one-hot states is always accepted (their penalties are equal), so with the default two
  rungs {0, lam} the chance that the target was never refreshed in the default 12 rounds is at most
  (1 - 1/e)^12 = 0.4%; more rungs add p-bit networks at intermediate lam but are not needed for mixing.

Vocabulary reduction (``top_k``, ``top_p``, and any -inf logit from upstream warpers) removes tokens from the
network instead of giving them -inf energies. ``sample(logits, num_samples)`` runs ``num_samples``
independent chains per row, all rows at once (the state of every chain is a column of one tensor), on the
logits' device. ``select(scores, state, rng)`` makes the sampler a ``TokenSampler`` for ``generate()``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from qllm_samplers.lm import check_logits
from qllm_samplers.pbit.network import PBitNetwork, UniformSource
from qllm_samplers.rng import RowRNG, splitmix64
from qllm_samplers.warpers import apply_top_k, top_p_fast

MODES = ("gibbs", "swap", "shifted", "tempering", "original")
# Tempering rungs at lam * (r / (R-1))^3: crowded near 0, where the network still mixes, so that states
# converted from invalid to one-hot by the p-bit sweeps are nearly exact before they climb.
LADDER_POWER = 3.0
SCAN_UPDATES = ("sequential", "random")
FALLBACKS = ("softmax", "argmax", "none")
# (lam, sweeps, max_retries) when not given. swap has no penalty (one-hotness is a hard constraint).
MODE_DEFAULTS = {
    "gibbs": (5.0, 100, 3),
    "swap": (0.0, 8, 0),
    "shifted": (0.0, 1, 64),
    "tempering": (20.0, 12, 10),
    "original": (10.0, 100, 2),  # qllm-pbits' PBitOneHotSampler defaults: lam 10, n_gibbs_steps 100, 3 attempts
}
# The largest network (one p-bit per candidate token) a sampler builds; a 49,152-token vocabulary would need
# 4.9M sequential single-bit updates per token in gibbs mode. Reduce it with top_k (default 50) or top_p.
MAX_BITS = 4096
DEFAULT_TOP_K = 50  # as the original's text generation (qllm-pbits generate --top-k 50)


@dataclass
class PBitStats:
    """Counters accumulated over ``sample``/``select`` calls (``PBitSampler.reset_stats()`` clears them)."""

    draws: int = 0              # tokens returned
    attempts: int = 0           # final network states read (one per draw, plus one per retry)
    invalid_attempts: int = 0   # of those, states that were not one-hot
    fallbacks: int = 0          # draws that gave up on the network and used the fallback
    sweeps: int = 0             # network sweeps (or swap-proposal sweeps, or tempering rounds) per chain, summed

    @property
    def invalid_rate(self) -> float:
        return self.invalid_attempts / self.attempts if self.attempts else 0.0

    @property
    def fallback_rate(self) -> float:
        return self.fallbacks / self.draws if self.draws else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "invalid_rate": self.invalid_rate, "fallback_rate": self.fallback_rate}


# ---------------------------------------------------------------------------------------------- logits
def reduce_vocabulary(logits: torch.Tensor, beta: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The candidate tokens of each row: ``(logits [B, K], token_ids [B, K], valid [B, K])``, best first.

    Tokens with -inf logits are never candidates; ``top_k`` and ``top_p`` are transformers' (the warpers'
    truncation core, applied in that order to beta * z, so a tie with the k-th token is kept). K is the largest
    candidate count of any row; ``valid`` marks the real candidates (rows with fewer are padded at the end).
    """
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an int >= 1 or None, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    batch, vocab = logits.shape
    kept = logits if beta == 1.0 else logits * beta
    if kept is not logits and not torch.isfinite(kept.amax(dim=-1)).all() and torch.isfinite(logits.amax(dim=-1)).all():
        raise ValueError(f"beta={beta}: beta * logits overflows {logits.dtype}; allowed: a beta for which "
                         "beta * max|logit| stays finite")
    if top_k is not None and top_k < vocab:
        kept = apply_top_k(kept, top_k, top_k, -math.inf)
    if top_p is not None and top_p < 1.0:
        kept = top_p_fast(kept, torch.full((batch,), float(top_p), dtype=torch.float64, device=logits.device),
                          1, -math.inf)
    counts = torch.isfinite(kept).sum(dim=-1)
    if (counts == 0).any():
        raise ValueError("vocabulary is empty after reduction (top_k / top_p / -inf logits) in some row")
    width = int(counts.max())
    _, token_ids = torch.topk(kept, width, dim=-1, sorted=True)
    values = logits.gather(1, token_ids)
    valid = torch.arange(width, device=logits.device)[None, :] < counts[:, None]
    return values, token_ids, valid


def beta_logits(values: torch.Tensor, valid: torch.Tensor, beta: float) -> torch.Tensor:
    """beta * z over each row's candidates (float64), 0 on padding: the original package's energies."""
    return torch.where(valid, beta * values.to(torch.float64), 0.0)


def centred_log_probs(values: torch.Tensor, valid: torch.Tensor, beta: float) -> torch.Tensor:
    """beta * z' = log softmax(beta z) over each row's candidates (float64 log-sum-exp), 0 on padding."""
    scaled = torch.where(valid, beta * values.to(torch.float64), -math.inf)
    return torch.where(valid, torch.log_softmax(scaled, dim=-1), 0.0)


# ---------------------------------------------------------------------------------------------- network
class OneHotNetwork:
    """The one-hot penalty energy on a batch of chains, with O(1) local fields from a running bit count.

    ``log_probs`` [C, K] are beta z' (centred), ``valid`` [C, K] marks real bits (None: all), ``penalty`` is
    beta lam, a scalar or one value per chain [C]. The state is kept transposed, y [K, C] (float 0/1), with
    S [C] = number of bits on, so each single-bit update touches contiguous memory.
    """

    def __init__(self, log_probs: torch.Tensor, valid: torch.Tensor | None, penalty: float | torch.Tensor):
        self.log_probs_t = log_probs.T.contiguous().to(torch.float32)          # [K, C]
        self.valid_t = None if valid is None or bool(valid.all()) else valid.T.contiguous()
        self.counts = (torch.full((log_probs.shape[0],), log_probs.shape[1], device=log_probs.device)
                       if self.valid_t is None else valid.sum(dim=1))
        penalty = torch.as_tensor(penalty, dtype=torch.float32, device=log_probs.device)
        self.penalty = penalty
        self.field_base = self.log_probs_t + penalty                           # beta (z' + lam)
        self.two_penalty = 2.0 * penalty
        self._on_probability: torch.Tensor | None = None  # sigmoid(log p), for decoupled draws

    @property
    def num_bits(self) -> int:
        return self.log_probs_t.shape[0]

    @property
    def num_chains(self) -> int:
        return self.log_probs_t.shape[1]

    def empty_state(self) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.log_probs_t.device
        return (torch.zeros(self.num_bits, self.num_chains, device=device),
                torch.zeros(self.num_chains, device=device))

    def decoupled_state(self, uniform: UniformSource) -> tuple[torch.Tensor, torch.Tensor]:
        """An exact draw from the lam = 0 network: every bit on with probability sigmoid(log p_k)."""
        if self._on_probability is None:
            self._on_probability = torch.sigmoid(self.log_probs_t)
        y = uniform.columns(self.num_bits) < self._on_probability
        if self.valid_t is not None:
            y &= self.valid_t
        y = y.to(torch.float32).contiguous()
        return y, y.sum(dim=0)

    def sweep(self, y: torch.Tensor, s: torch.Tensor, uniform: UniformSource, update: str = "random",
              steps: int | None = None) -> None:
        """One sweep of single p-bit updates of every chain, in place on (y [K, C], S [C]).

        A sweep is K updates; ``steps`` sets another count for the random scan (e.g. the original package's
        150 updates). A p-bit with input x turns on when u < sigmoid(x): one sigmoid per update is cheaper
        than turning a whole sweep of uniforms into logistic noise.
        """
        steps = self.num_bits if steps is None else steps
        if update == "sequential" and steps != self.num_bits:
            raise ValueError(f"steps must equal the number of bits ({self.num_bits}) for a sequential sweep")
        u = uniform.columns(steps)                                             # [steps, C]
        if update == "sequential":
            for i in range(self.num_bits):
                old = y[i]
                on = u[i] < torch.sigmoid(self.field_base[i] - self.two_penalty * (s - old))
                if self.valid_t is not None:
                    on &= self.valid_t[i]
                new = on.to(torch.float32)
                s += new - old
                y[i] = new
            return
        # Random scan: each chain updates its own uniformly chosen (valid) bit at every step.
        sites = uniform.integers(self.counts, steps).T                         # [steps, C]
        flat_y = y.view(-1)
        field_base = self.field_base.reshape(-1)
        chains = torch.arange(self.num_chains, device=y.device)
        for step in range(steps):
            # Flat offsets into the [K, C] layout; index_select/index_copy_ are the fast paths on CPU.
            offsets = sites[step] * self.num_chains + chains
            old = flat_y.index_select(0, offsets)
            field = field_base.index_select(0, offsets) - self.two_penalty * (s - old)
            new = (u[step] < torch.sigmoid(field)).to(torch.float32)
            s += new - old
            flat_y.index_copy_(0, offsets, new)

    def as_pbit_network(self, chain: int = 0, beta: float = 1.0) -> PBitNetwork:
        """The same energy as a general binary ``PBitNetwork`` (dense J) for chain ``chain``'s valid bits.

        With ``beta`` = 1 the network's energy is in the units of beta z' (the default here); the
        distribution is the same for any split of beta between the energy and the temperature.
        """
        keep = slice(None) if self.valid_t is None else self.valid_t[:, chain]
        log_probs = self.log_probs_t[keep, chain]
        penalty = float(self.penalty if self.penalty.dim() == 0 else self.penalty[chain]) / beta
        n = log_probs.shape[0]
        couplings = -2.0 * penalty * (1.0 - torch.eye(n, device=log_probs.device))
        return PBitNetwork(couplings, log_probs / beta + penalty, states="binary", beta=beta, offset=penalty)


def _failures(index: torch.Tensor, pending: torch.Tensor) -> torch.Tensor:
    """[C] bool: the chains that never reached a one-hot state."""
    failed = torch.zeros_like(index, dtype=torch.bool)
    failed[pending] = True
    return failed


def _one_hot_index(y: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(is one-hot [C], index of the largest on-bit [C]) of states y [K, C]."""
    return s == 1, y.argmax(dim=0)


# ---------------------------------------------------------------------------------------------- randomness
def _chain_uniforms(generator, rows: int, chains_per_row: int, device: torch.device) -> UniformSource:
    """A uniform source for rows * chains_per_row chains (row-major: row b's chains are consecutive).

    A ``RowRNG`` with one chain per row drives the chains directly; with several chains per row each chain
    gets its own stream seeded from its row's stream (one draw of the row), so a row's tokens still depend
    only on that row's seed.
    """
    num_chains = rows * chains_per_row
    if isinstance(generator, RowRNG) and chains_per_row > 1:
        if generator.batch_size != rows:
            raise ValueError(f"generator: RowRNG has {generator.batch_size} rows, logits have {rows}")
        row_keys = (generator.uniform(1)[:, 0] * 2.0 ** 53).to(torch.int64)
        chain_offsets = torch.arange(chains_per_row, dtype=torch.int64, device=row_keys.device)
        seeds = splitmix64(row_keys[:, None] * chains_per_row + chain_offsets[None, :]).reshape(-1)
        generator = RowRNG(seeds)
    elif isinstance(generator, RowRNG) and generator.batch_size != rows:
        raise ValueError(f"generator: RowRNG has {generator.batch_size} rows, logits have {rows}")
    return UniformSource(num_chains, generator, device=device)


# ---------------------------------------------------------------------------------------------- sampler
class PBitSampler:
    """Draw tokens with a simulated p-bit network; see the module docstring for the modes.

    ``PBitSampler(mode="gibbs", lam=None, beta=1.0, sweeps=None, ...)``: ``lam``, ``sweeps`` and
    ``max_retries`` default per mode (``MODE_DEFAULTS``). ``update``: single-bit scan order of the gibbs and
    tempering sweeps, ``"random"`` or ``"sequential"`` (default: random for gibbs, sequential for
    tempering). ``replicas``: tempering ladder size. ``fallback``: what a draw that never reached a one-hot
    state returns: an exact ``softmax`` draw (default; ``argmax`` in ``original`` mode, the original package's
    choice), the ``argmax``, or ``none`` (-1, so experiments can see failures). ``top_k`` (default 50, as the
    original's text generation) and ``top_p`` reduce the vocabulary before the network is built: one p-bit per
    candidate token; a network of more than ``max_bits`` (4096) p-bits is refused, with the way to reduce it.
    Counters: ``counters`` (a ``PBitStats``) and ``stats()`` (a dict, which ``generate()`` reports).
    """

    def __init__(self, mode: str = "gibbs", lam: float | None = None, beta: float = 1.0, sweeps: int | None = None,
                 *, update: str | None = None, max_retries: int | None = None, replicas: int = 2,
                 top_k: int | None = DEFAULT_TOP_K, top_p: float | None = None, fallback: str | None = None,
                 max_bits: int = MAX_BITS):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        default_lam, default_sweeps, default_retries = MODE_DEFAULTS[mode]
        lam = default_lam if lam is None else lam
        sweeps = default_sweeps if sweeps is None else sweeps
        max_retries = default_retries if max_retries is None else max_retries
        if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
            raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
        if mode in ("swap", "shifted") and lam != 0:
            raise ValueError(f"lam must be 0 (or None) for mode {mode!r}: swap keeps one-hot states exactly "
                             f"(no penalty) and shifted samples the decoupled lam = 0 network; got {lam!r}")
        if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
            raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
        if isinstance(sweeps, bool) or not isinstance(sweeps, int) or sweeps < 1:
            raise ValueError(f"sweeps must be an int >= 1, got {sweeps!r}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an int >= 0, got {max_retries!r}")
        # Random scan mixes the gibbs network much faster than a fixed order (a sequential sweep drifts the
        # hot bit along the scan order); the tempering rungs only need a cheap sweep, so they scan in order.
        update = ("sequential" if mode == "tempering" else "random") if update is None else update
        if update not in SCAN_UPDATES:
            raise ValueError(f"update must be one of {SCAN_UPDATES}, got {update!r}")
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 2:
            raise ValueError(f"replicas must be an int >= 2, got {replicas!r}")
        fallback = ("argmax" if mode == "original" else "softmax") if fallback is None else fallback
        if isinstance(max_bits, bool) or not isinstance(max_bits, int) or max_bits < 1:
            raise ValueError(f"max_bits must be an int >= 1, got {max_bits!r}")
        self.max_bits = max_bits
        if fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
        reduce_vocabulary(torch.zeros(1, 1), 1.0, top_k, top_p)  # validates top_k / top_p now, not at decode
        self.mode, self.lam, self.beta, self.sweeps = mode, float(lam), float(beta), sweeps
        self.update, self.max_retries, self.replicas = update, max_retries, replicas
        self.top_k, self.top_p, self.fallback = top_k, top_p, fallback
        self.counters = PBitStats()

    def __repr__(self) -> str:
        return (f"PBitSampler(mode={self.mode!r}, lam={self.lam}, beta={self.beta}, sweeps={self.sweeps}, "
                f"update={self.update!r}, max_retries={self.max_retries}, top_k={self.top_k}, "
                f"top_p={self.top_p}, fallback={self.fallback!r}, max_bits={self.max_bits})")

    def stats(self) -> dict:
        """The counters as a dict (``generate()`` puts this in ``GenerateOutput.stats``)."""
        return self.counters.as_dict()

    def reset_stats(self) -> None:
        self.counters = PBitStats()

    # ------------------------------------------------------------------------------------------ public
    def target_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The exact distribution the sampler targets, over the full vocabulary ([V] or [B, V], float64)."""
        squeeze = logits.dim() == 1
        rows = self._check(logits)
        values, token_ids, valid = reduce_vocabulary(rows, self.beta, self.top_k, self.top_p)
        probs = centred_log_probs(values, valid, self.beta).exp() * valid
        full = torch.zeros(rows.shape, dtype=torch.float64, device=rows.device).scatter(1, token_ids, probs)
        return full[0] if squeeze else full

    @torch.no_grad()
    def sample(self, logits: torch.Tensor, num_samples: int = 1, generator=None) -> torch.Tensor:
        """Token ids drawn from ``logits`` [V] -> [num_samples], or [B, V] -> [B, num_samples].

        ``generator``: None (torch's global RNG), an int seed, a ``torch.Generator``, or a ``RowRNG`` with B
        rows (each row's draws then depend only on its own seed).
        """
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
        squeeze = logits.dim() == 1
        rows = self._check(logits)
        values, token_ids, valid = reduce_vocabulary(rows, self.beta, self.top_k, self.top_p)
        if values.shape[1] > self.max_bits:
            raise ValueError(f"PBitSampler: the network would have {values.shape[1]} p-bits (one per candidate "
                             f"token), more than max_bits={self.max_bits}; reduce the vocabulary with top_k (e.g. "
                             f"top_k={DEFAULT_TOP_K}, the default) or top_p, or raise max_bits")
        # "original" runs on the raw logits beta * z (qllm-pbits does not recentre them); every other mode on
        # the log-probabilities beta * z' (see the module docstring)
        log_probs = (beta_logits(values, valid, self.beta) if self.mode == "original"
                     else centred_log_probs(values, valid, self.beta))
        batch = rows.shape[0]
        uniform = _chain_uniforms(generator, batch, num_samples, rows.device)
        chain_log_probs = log_probs.repeat_interleave(num_samples, dim=0)
        chain_valid = valid.repeat_interleave(num_samples, dim=0)
        index = self._run(chain_log_probs, chain_valid, uniform)
        chain_ids = token_ids.repeat_interleave(num_samples, dim=0)
        tokens = torch.where(index >= 0, chain_ids.gather(1, index.clamp(min=0)[:, None])[:, 0], -1)
        tokens = tokens.reshape(batch, num_samples)
        return tokens[0] if squeeze else tokens

    def select(self, scores: torch.Tensor, state=None, rng: RowRNG | None = None) -> torch.Tensor:
        """TokenSampler interface for ``generate()``: one token per row of ``scores`` [B, V], drawn via ``rng``."""
        if self.fallback == "none":
            raise ValueError("fallback='none' can return -1, which generate() cannot decode; use 'softmax'")
        return self.sample(scores, 1, generator=rng)[:, 0]

    # ------------------------------------------------------------------------------------------ internals
    def _check(self, logits: torch.Tensor) -> torch.Tensor:
        if not isinstance(logits, torch.Tensor) or logits.dim() not in (1, 2) or logits.shape[-1] < 1:
            raise ValueError(f"logits must be a [V] or [B, V] tensor, got {getattr(logits, 'shape', logits)}")
        rows = logits[None] if logits.dim() == 1 else logits
        if torch.isnan(rows).any():
            raise ValueError("logits contain NaN; cannot sample")
        if torch.isposinf(rows).any():
            raise ValueError("logits contain +inf; cannot sample")
        try:
            check_logits(rows, "logits")
        except ValueError as error:
            raise ValueError(f"{error} (vocabulary is empty)") from None
        # float64 logits stay float64 (the log-sum-exp is float64 anyway); half precision is widened.
        return rows if rows.dtype == torch.float64 else rows.float()

    def _run(self, log_probs: torch.Tensor, valid: torch.Tensor, uniform: UniformSource) -> torch.Tensor:
        num_chains = log_probs.shape[0]
        if self.mode == "swap":
            index = self._swap(log_probs, valid, uniform)
            failed = torch.zeros(num_chains, dtype=torch.bool, device=log_probs.device)
            self.counters.attempts += num_chains
        else:
            kernel = {"gibbs": self._gibbs, "shifted": self._shifted, "tempering": self._tempering,
                      "original": self._original}[self.mode]
            index, failed = kernel(log_probs, valid, uniform)
        self.counters.draws += num_chains
        if failed.any():
            self.counters.fallbacks += int(failed.sum())
            index = index.clone()
            if self.fallback == "argmax":
                index[failed] = 0  # candidates are sorted best first
            elif self.fallback == "none":
                index[failed] = -1
            else:
                chains = torch.nonzero(failed).flatten()
                child = uniform.subset(chains)
                u = child(1)[:, 0].to(torch.float64)
                uniform.advance(child)
                cdf = (log_probs[chains].exp() * valid[chains]).cumsum(dim=1)
                drawn = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
                index[chains] = torch.minimum(drawn, valid[chains].sum(dim=1) - 1)
        return index

    def _gibbs(self, log_probs, valid, uniform):
        network = OneHotNetwork(log_probs, valid, self.beta * self.lam)
        y, s = network.empty_state()
        index = torch.full((network.num_chains,), -1, dtype=torch.long, device=log_probs.device)
        pending = torch.arange(network.num_chains, device=log_probs.device)
        source = uniform
        for attempt in range(self.max_retries + 1):
            for _ in range(self.sweeps):
                network.sweep(y, s, source, self.update)
            one_hot, hot = _one_hot_index(y, s)
            pending = self._settle(index, pending, one_hot, hot)
            uniform.advance(source)
            if pending.numel() == 0 or attempt == self.max_retries:
                break
            # Continue only the chains that are still not one-hot, from where they are.
            network = OneHotNetwork(log_probs[pending], valid[pending], self.beta * self.lam)
            y, s = y[:, ~one_hot].contiguous(), s[~one_hot].contiguous()
            source = uniform.subset(pending)
        return index, _failures(index, pending)

    def _settle(self, index: torch.Tensor, pending: torch.Tensor, one_hot: torch.Tensor,
                hot: torch.Tensor) -> torch.Tensor:
        """Count one attempt of the ``pending`` chains, keep the tokens of those that reached a one-hot state
        (in ``index``, in place), and return the chains still pending."""
        self.counters.sweeps += self.sweeps * pending.numel()
        self.counters.attempts += pending.numel()
        self.counters.invalid_attempts += int((~one_hot).sum())
        index[pending[one_hot]] = hot[one_hot]
        return pending[~one_hot]

    def _original(self, logits, valid, uniform):
        """qllm-pbits' PBitOneHotSampler: each attempt starts from a uniformly chosen one-hot state and makes
        ``sweeps + sweeps // 2`` random single-bit updates (its n_gibbs_steps plus burn-in n_gibbs_steps // 2);
        ``max_retries + 1`` fresh attempts, then the fallback (argmax). ``logits`` are beta * z, not recentred."""
        updates = self.sweeps + self.sweeps // 2
        index = torch.full((logits.shape[0],), -1, dtype=torch.long, device=logits.device)
        pending = torch.arange(logits.shape[0], device=logits.device)
        source = uniform
        for _ in range(self.max_retries + 1):
            network = OneHotNetwork(logits[pending], valid[pending], self.beta * self.lam)
            y, s = network.empty_state()
            start = source.integers(network.counts)
            y[start, torch.arange(network.num_chains, device=y.device)] = 1.0
            s += 1.0
            network.sweep(y, s, source, "random", steps=updates)
            pending = self._settle(index, pending, *_one_hot_index(y, s))
            uniform.advance(source)
            if pending.numel() == 0:
                break
            source = uniform.subset(pending)
        return index, _failures(index, pending)

    def _shifted(self, log_probs, valid, uniform):
        num_chains = log_probs.shape[0]
        # Decoupled p-bits: bit k is on with probability sigmoid(log p_k), independently of the others.
        on_probability = torch.sigmoid(log_probs).T.to(torch.float32).contiguous()   # [K, C]
        valid_t = None if bool(valid.all()) else valid.T.contiguous()
        index = torch.full((num_chains,), -1, dtype=torch.long, device=log_probs.device)
        pending = torch.arange(num_chains, device=log_probs.device)
        source = uniform
        for _ in range(self.max_retries + 1):
            subset = pending.numel() < num_chains
            threshold = on_probability[:, pending] if subset else on_probability
            # Every parallel update is a fresh exact draw, so only the last of the sweeps counts.
            for _ in range(self.sweeps):
                y = source.columns(threshold.shape[0]) < threshold
            if valid_t is not None:
                y &= valid_t[:, pending] if subset else valid_t
            pending = self._settle(index, pending, y.sum(dim=0) == 1, y.to(torch.uint8).argmax(dim=0))
            uniform.advance(source)
            if pending.numel() == 0:
                break
            source = uniform.subset(pending)
        return index, _failures(index, pending)

    def _swap(self, log_probs, valid, uniform):
        counts = valid.sum(dim=1)
        log_probs = log_probs.to(torch.float32)
        width = log_probs.shape[1]
        # Warm start on the most likely token (candidates are sorted): the initial error is then 1 - p_max,
        # small exactly when the chain is slow (a peaked row), while a flat row mixes within a sweep.
        hot = torch.zeros(log_probs.shape[0], dtype=torch.long, device=log_probs.device)
        hot_log_prob = log_probs[:, 0].clone()
        for _ in range(self.sweeps):
            # One sweep = K proposals per chain: the hot bit hands over to a uniformly chosen candidate j with
            # the p-bit probability sigmoid(log p_j - log p_hot). Proposals are drawn and looked up per sweep.
            partners = uniform.integers(counts, width)
            partner_log_probs = log_probs.gather(1, partners).T.contiguous()
            partners = partners.T.contiguous()
            u = uniform.columns(width)
            for step in range(width):
                accept = u[step] < torch.sigmoid(partner_log_probs[step] - hot_log_prob)
                hot = torch.where(accept, partners[step], hot)
                hot_log_prob = torch.where(accept, partner_log_probs[step], hot_log_prob)
        self.counters.sweeps += self.sweeps * log_probs.shape[0]
        return hot

    def _tempering(self, log_probs, valid, uniform):
        num_chains, width = log_probs.shape
        rungs = self.replicas
        ladder = self.beta * self.lam * torch.linspace(0.0, 1.0, rungs, device=log_probs.device) ** LADDER_POWER
        # Replicas 1..R-1 as one batch of (R-1) * C chains (replica-major); replica 0 is the decoupled network.
        upper_log_probs = log_probs.repeat(rungs - 1, 1)
        upper_valid = valid.repeat(rungs - 1, 1)
        upper_penalty = ladder[1:].repeat_interleave(num_chains)
        upper = OneHotNetwork(upper_log_probs, upper_valid, upper_penalty)
        base = OneHotNetwork(log_probs, valid, 0.0)
        replica_uniform = _replica_source(uniform, rungs - 1)
        y = torch.cat([base.decoupled_state(uniform)[0] for _ in range(rungs - 1)], dim=1)
        s = y.sum(dim=0)
        index = torch.full((num_chains,), -1, dtype=torch.long, device=log_probs.device)
        pending = torch.ones(num_chains, dtype=torch.bool, device=log_probs.device)
        for _attempt in range(self.max_retries + 1):
            for _ in range(self.sweeps):
                upper.sweep(y, s, replica_uniform, self.update)
                y0, s0 = base.decoupled_state(uniform)
                y_all = torch.cat([y0, y], dim=1).reshape(width, rungs, num_chains)
                s_all = torch.cat([s0, s]).reshape(rungs, num_chains)
                _exchange(y_all, s_all, ladder, uniform)
                y = y_all[:, 1:].reshape(width, (rungs - 1) * num_chains).contiguous()
                s = s_all[1:].reshape(-1).contiguous()
            self.counters.sweeps += self.sweeps * int(pending.sum())
            top_y, top_s = y[:, -num_chains:], s[-num_chains:]
            one_hot, hot = _one_hot_index(top_y, top_s)
            newly = pending & one_hot
            self.counters.attempts += int(pending.sum())
            self.counters.invalid_attempts += int((pending & ~one_hot).sum())
            index[newly] = hot[newly]
            pending &= ~one_hot
            if not pending.any():
                break
        return index, pending


def _replica_source(uniform: UniformSource, copies: int) -> UniformSource:
    """Uniforms for ``copies`` replicas of every chain (replica-major), each replica its own stream."""
    # Fresh keys from one draw of each chain's stream, so successive calls never reuse numbers.
    keys = (uniform.generator.uniform(1)[:, 0] * 2.0 ** 53).to(torch.int64)
    replica = torch.arange(copies, dtype=torch.int64, device=keys.device)
    seeds = splitmix64(keys[None, :] * copies + replica[:, None]).reshape(-1)
    return UniformSource(copies * uniform.num_chains, RowRNG(seeds), device=uniform.device)


def _exchange(y: torch.Tensor, s: torch.Tensor, ladder: torch.Tensor, uniform: UniformSource) -> None:
    """Metropolis replica exchange between neighbours (0, 1), (1, 2), ... in that order, in place.

    y [K, R, C], s [R, C]. Swapping the states of penalties b_r < b_r+1 is accepted with probability
    min(1, exp((b_r+1 - b_r) (P_r+1 - P_r))), P = (S - 1)^2: one-hot states never lose against invalid ones
    going up. Sweeping the pairs bottom-up lets a fresh one-hot draw of the decoupled rung climb the whole
    ladder in one round; each swap satisfies detailed balance, so their composition keeps the joint law.
    """
    rungs = s.shape[0]
    u = uniform.columns(rungs - 1)                                             # [pairs, C]
    for lower in range(rungs - 1):
        upper = lower + 1
        gain = (ladder[upper] - ladder[lower]) * ((s[upper] - 1.0) ** 2 - (s[lower] - 1.0) ** 2)
        swap = u[lower].to(gain.dtype) < torch.exp(gain.clamp(max=0.0))
        y_lower, y_upper = y[:, lower].clone(), y[:, upper]
        y[:, lower] = torch.where(swap, y_upper, y_lower)
        y[:, upper] = torch.where(swap, y_lower, y_upper)
        s_lower, s_upper = s[lower].clone(), s[upper]
        s[lower] = torch.where(swap, s_upper, s_lower)
        s[upper] = torch.where(swap, s_lower, s_upper)
