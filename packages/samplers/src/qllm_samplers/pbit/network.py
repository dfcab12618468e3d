"""A simulator of p-bit networks (stochastic Boltzmann machines), batched over independent chains.

A p-bit is a binary stochastic neuron: given its input I_i = sum_j J_ij x_j + h_i it takes the value that
Gibbs sampling of the Boltzmann distribution

    P(x) ∝ exp(-beta E(x)),    E(x) = -1/2 x^T J x - h^T x + offset

asks for. Two state conventions:
- ``"spin"``  x_i in {-1, +1}: P(x_i = +1 | rest) = sigmoid(2 beta I_i)  (the hardware form sgn(tanh(beta I) - u),
  u ~ U(-1, 1));
- ``"binary"`` x_i in {0, 1}:  P(x_i = 1 | rest) = sigmoid(beta I_i).

J must be symmetric with a zero diagonal (a self-coupling is just a bias for binary bits and a constant for
spins). Updates of one chain:
- ``"sequential"``: a sweep updates bits 0..N-1 in order (systematic-scan Gibbs);
- ``"random"``: a sweep is N updates of uniformly chosen bits (random-scan Gibbs), a different bit per chain;
- ``"colored"``: bits of one colour class of the coupling graph share no coupling, so they are conditionally
  independent and update in parallel (chequerboard updates on a lattice); a sweep visits every colour once.
All three leave the Boltzmann distribution invariant. Every chain in the batch is independent: the state is
[C, N] and the biases may differ per chain ([C, N]), which is how the token sampler runs one network per
(logit row, sample). For N <= 16 the exact distribution, magnetisations and correlations come from
enumerating all 2^N states, which is what the tests validate the sampler against.

Randomness comes through ``UniformSource``, built on ``qllm_samplers.rng.RowRNG`` (counter-based per-row streams,
so a decoded request does not depend on its batch) whatever generator the caller holds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from qllm_samplers.rng import RowRNG

STATE_KINDS = ("spin", "binary")
UPDATES = ("sequential", "random", "colored")
MAX_EXACT_BITS = 16


class UniformSource:
    """Uniform [0, 1) numbers shaped [num_chains, *shape], drawn from ``qllm_samplers.rng.RowRNG`` streams.

    The one random-number abstraction of the package: every generator a user may hold becomes a ``RowRNG``.
    ``generator``: None (row seeds drawn from torch's global RNG, so ``torch.manual_seed`` makes runs repeatable),
    an int seed (chain c gets seed + c), a ``torch.Generator`` (one seed per chain drawn from it), or a ``RowRNG``
    with B rows when the chains are B consecutive groups of ``num_chains // B`` (row b's chains draw only from row
    b's stream, so its draws do not depend on the other rows).
    """

    def __init__(self, num_chains: int, generator=None, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.num_chains = num_chains
        self.device = torch.device(device)
        self.dtype = dtype
        if generator is not None and not isinstance(generator, (int, torch.Generator, RowRNG)) \
                or isinstance(generator, bool):
            raise ValueError("generator must be None, an int seed, a torch.Generator or a RowRNG, "
                             f"got {type(generator).__name__}")
        if not isinstance(generator, RowRNG):
            generator = RowRNG.from_generator(generator, num_chains)
        if num_chains % generator.batch_size != 0:
            raise ValueError(f"generator: a RowRNG with {generator.batch_size} rows cannot drive {num_chains} "
                             "chains (the number of chains must be a multiple of the rows)")
        self.generator = generator

    def __call__(self, *shape: int) -> torch.Tensor:
        full = (self.num_chains, *shape)
        per_row = math.prod(full) // self.generator.batch_size
        u = self.generator.uniform(per_row).to(device=self.device)
        if self.dtype != torch.float64:
            # float64 uniforms just below 1 round up to 1.0 in float32; keep [0, 1) half-open
            u = u.to(self.dtype).clamp_(max=1.0 - torch.finfo(self.dtype).eps / 2)
        return u.reshape(full)

    def columns(self, n: int) -> torch.Tensor:
        """Uniforms laid out [n, num_chains] (one row per update step), the same numbers as ``self(n).T``."""
        return self(n).T.contiguous()

    def logistic(self, *shape: int) -> torch.Tensor:
        """Logistic noise L = logit(u): a p-bit with input x is on exactly when L < x (P = sigmoid(x))."""
        u = self(*shape)
        return torch.log(u) - torch.log1p(-u)

    def integers(self, high: torch.Tensor | int, *shape: int) -> torch.Tensor:
        """Uniform integers in [0, high) per chain (``high`` a scalar or a [num_chains] tensor)."""
        high_t = torch.as_tensor(high, device=self.device)
        if high_t.dim() == 1:
            high_t = high_t.reshape(-1, *([1] * len(shape)))
        # float32 uniforms resolve 2^24 values, plenty for vocabulary-sized ranges; wider ranges use float64.
        u = self(*shape)
        if int(high_t.max()) >= 1 << 24:
            u = u.to(torch.float64)
        index = (u * high_t).long()
        return torch.minimum(index, high_t - 1)  # u * high can round up to high

    def subset(self, chains: torch.Tensor) -> UniformSource:
        """Uniforms for a subset of the chains (one chain per row of this source's RowRNG), each keeping its own
        stream and continuing at the current counter (``advance`` moves this source past what the subset used)."""
        if self.generator.batch_size != self.num_chains:
            raise ValueError("subset needs one RowRNG row per chain")
        return UniformSource(chains.numel(), self.generator.select(chains), device=self.device, dtype=self.dtype)

    def advance(self, child: UniformSource) -> None:
        """Move past the numbers a ``subset`` used, so later draws (and later subsets) never repeat them."""
        if child is not self:
            self.generator.counter = max(self.generator.counter, child.generator.counter)


def greedy_coloring(couplings: torch.Tensor) -> list[torch.Tensor]:
    """Colour classes of the graph with an edge wherever J_ij != 0 (greedy, in index order).

    Bits in one class share no coupling, so they can update in parallel. A dense network needs N colours
    (parallel updates degrade to sequential); a bipartite lattice needs 2.
    """
    adjacency = (couplings != 0).cpu()
    n = adjacency.shape[0]
    colours = [-1] * n
    for i in range(n):
        taken = {colours[j] for j in torch.nonzero(adjacency[i]).flatten().tolist() if colours[j] >= 0}
        colours[i] = next(c for c in range(n) if c not in taken)
    colour_tensor = torch.tensor(colours)
    return [torch.nonzero(colour_tensor == c).flatten().to(couplings.device)
            for c in range(max(colours) + 1)]


class PBitNetwork:
    """A Boltzmann machine of N p-bits: couplings J [N, N], biases h [N] (or [C, N], one row per chain).

    ``energy``, ``local_fields``, ``sweep`` and ``sample`` act on batches of states [C, N]. The exact helpers
    (``exact_distribution``, ``exact_moments``) enumerate all 2^N states and need N <= 16 and one bias vector.
    """

    def __init__(self, couplings: torch.Tensor, biases: torch.Tensor, *, states: str = "spin", beta: float = 1.0,
                 offset: float = 0.0):
        couplings = torch.as_tensor(couplings, dtype=torch.float32)
        biases = torch.as_tensor(biases, dtype=torch.float32, device=couplings.device)
        if couplings.dim() != 2 or couplings.shape[0] != couplings.shape[1]:
            raise ValueError(f"couplings must be a square [N, N] matrix, got shape {tuple(couplings.shape)}")
        n = couplings.shape[0]
        if biases.shape[-1] != n or biases.dim() not in (1, 2):
            raise ValueError(f"biases must be [N] or [C, N] with N={n}, got shape {tuple(biases.shape)}")
        if not torch.allclose(couplings, couplings.T, atol=1e-6) or couplings.diagonal().abs().max() > 0:
            raise ValueError("couplings must be symmetric with a zero diagonal")
        if not (torch.isfinite(couplings).all() and torch.isfinite(biases).all()):
            raise ValueError("couplings and biases must be finite")
        if states not in STATE_KINDS:
            raise ValueError(f"states must be one of {STATE_KINDS}, got {states!r}")
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        self.couplings, self.biases = couplings, biases
        self.states, self.beta, self.offset = states, float(beta), float(offset)
        self.num_bits = n
        self._colors: list[torch.Tensor] | None = None

    @property
    def device(self) -> torch.device:
        return self.couplings.device

    @property
    def low(self) -> float:
        """The 'off' value of a bit: -1 for spins, 0 for binary bits."""
        return -1.0 if self.states == "spin" else 0.0

    @property
    def gain(self) -> float:
        """P(on | I) = sigmoid(gain * beta * I): the flip from low to 1 changes the energy by (1 - low) I."""
        return 2.0 if self.states == "spin" else 1.0

    @property
    def colors(self) -> list[torch.Tensor]:
        if self._colors is None:
            self._colors = greedy_coloring(self.couplings)
        return self._colors

    def _bias_rows(self, num_chains: int) -> torch.Tensor:
        if self.biases.dim() == 2 and self.biases.shape[0] != num_chains:
            raise ValueError(f"the network has biases for {self.biases.shape[0]} chains, got {num_chains} states")
        return self.biases if self.biases.dim() == 2 else self.biases.expand(num_chains, -1)

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        """E(x) for states [..., N] (float64)."""
        x = x.to(torch.float64)
        j, h = self.couplings.to(torch.float64), self.biases.to(torch.float64)
        return -0.5 * torch.einsum("...i,ij,...j->...", x, j, x) - (x * h).sum(-1) + self.offset

    def local_fields(self, x: torch.Tensor) -> torch.Tensor:
        """I = x J + h for states [C, N] (J has a zero diagonal, so I_i does not depend on x_i)."""
        return x @ self.couplings + self._bias_rows(x.shape[0])

    def init_states(self, num_chains: int, uniform: UniformSource) -> torch.Tensor:
        """Independent fair coin flips for every bit of every chain."""
        on = uniform(self.num_bits) < 0.5
        return torch.where(on, 1.0, self.low).to(torch.float32)

    def _on(self, field: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The p-bit: on when u < sigmoid(gain * beta * I), as the state value (1 or low)."""
        return torch.where(u < torch.sigmoid(self.gain * self.beta * field), 1.0, self.low)

    def sweep(self, x: torch.Tensor, uniform: UniformSource, update: str = "sequential") -> torch.Tensor:
        """One sweep (N single-bit updates, or one pass over the colours) of every chain, in place."""
        if update not in UPDATES:
            raise ValueError(f"update must be one of {UPDATES}, got {update!r}")
        num_chains = x.shape[0]
        h = self._bias_rows(num_chains)
        u = uniform(self.num_bits)
        if update == "sequential":
            for i in range(self.num_bits):
                x[:, i] = self._on(x @ self.couplings[:, i] + h[:, i], u[:, i])
        elif update == "colored":
            # Whole-state candidates merged under a colour mask: cheaper on CPU than scattering columns.
            for mask in self._color_masks():
                x.copy_(torch.where(mask, self._on(x @ self.couplings + h, u), x))
        else:
            sites = uniform.integers(self.num_bits, self.num_bits)
            flat = x.view(-1)
            base = torch.arange(num_chains, device=x.device) * self.num_bits
            per_chain = self.biases.dim() == 2
            flat_biases = self.biases.reshape(-1)
            for step in range(self.num_bits):
                site = sites[:, step]
                bias = flat_biases.index_select(0, base + site if per_chain else site)
                field = (self.couplings.index_select(0, site) * x).sum(-1) + bias
                flat.index_copy_(0, base + site, self._on(field, u[:, step]))
        return x

    def _color_masks(self) -> list[torch.Tensor]:
        masks = []
        for color in self.colors:
            mask = torch.zeros(self.num_bits, dtype=torch.bool, device=self.device)
            mask[color] = True
            masks.append(mask)
        return masks

    def sample(self, num_chains: int, sweeps: int, *, update: str = "sequential", burn_in: int = 0,
               generator=None, x0: torch.Tensor | None = None, record: bool = False) -> torch.Tensor:
        """Run ``num_chains`` independent chains for ``burn_in + sweeps`` sweeps.

        Returns the final states [C, N], or with ``record=True`` the states after each of the last ``sweeps``
        sweeps, [C, sweeps, N] (correlated along the sweep axis; see qllm_samplers.diagnostics.mcmc).
        """
        if sweeps < 1:
            raise ValueError(f"sweeps must be >= 1, got {sweeps}")
        if burn_in < 0:
            raise ValueError(f"burn_in must be >= 0, got {burn_in}")
        uniform = UniformSource(num_chains, generator, device=self.device)
        x = self.init_states(num_chains, uniform) if x0 is None else x0.to(torch.float32).clone()
        x = x.contiguous()
        for _ in range(burn_in):
            self.sweep(x, uniform, update)
        trace = []
        for _ in range(sweeps):
            self.sweep(x, uniform, update)
            if record:
                trace.append(x.clone())
        return torch.stack(trace, dim=1) if record else x

    # ------------------------------------------------------------------ exact enumeration (N <= 16)
    def all_states(self) -> torch.Tensor:
        """All 2^N states [2^N, N] in the order of ``state_index`` (bit i of the index is x_i on)."""
        _check_exact(self.num_bits)
        return index_to_states(torch.arange(2 ** self.num_bits, device=self.device), self.num_bits, self.low)

    def exact_distribution(self) -> torch.Tensor:
        """P(x) for every state, indexed by ``state_index`` (float64, length 2^N)."""
        if self.biases.dim() != 1:
            raise ValueError("exact_distribution needs one bias vector [N], not per-chain biases")
        return torch.softmax(-self.beta * self.energy(self.all_states()), dim=0)

    def exact_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact magnetisations E[x_i] [N] and second moments E[x_i x_j] [N, N] (float64)."""
        probs = self.exact_distribution()
        states = self.all_states().to(torch.float64)
        return probs @ states, torch.einsum("s,si,sj->ij", probs, states, states)


def _check_exact(num_bits: int) -> None:
    if num_bits > MAX_EXACT_BITS:
        raise ValueError(f"exact enumeration needs N <= {MAX_EXACT_BITS} bits, got {num_bits}")


def state_index(x: torch.Tensor) -> torch.Tensor:
    """The integer sum_i [x_i on] 2^i of states [..., N] (N <= 62): the histogram key of a state."""
    on = (x > 0).to(torch.int64)
    weights = 2 ** torch.arange(x.shape[-1], device=x.device, dtype=torch.int64)
    return (on * weights).sum(-1)


def index_to_states(index: torch.Tensor, num_bits: int, low: float = 0.0) -> torch.Tensor:
    """Inverse of ``state_index``: [..., N] states with 'off' bits set to ``low``."""
    bits = (index[..., None] >> torch.arange(num_bits, device=index.device)) & 1
    return torch.where(bits.bool(), 1.0, low).to(torch.float32)


def ising_lattice(rows: int, cols: int, coupling: float = 1.0, periodic: bool = True) -> torch.Tensor:
    """Nearest-neighbour couplings J [rows*cols, rows*cols] of a 2-D Ising lattice (bit r*cols + c)."""
    if rows < 1 or cols < 1:
        raise ValueError(f"rows and cols must be >= 1, got {rows} x {cols}")
    n = rows * cols
    j = torch.zeros(n, n)
    for r in range(rows):
        for c in range(cols):
            for dr, dc in ((0, 1), (1, 0)):
                r2, c2 = r + dr, c + dc
                if periodic:
                    r2, c2 = r2 % rows, c2 % cols
                elif r2 >= rows or c2 >= cols:
                    continue
                a, b = r * cols + c, r2 * cols + c2
                if a != b:
                    j[a, b] = j[b, a] = coupling
    return j


def spin_glass(num_bits: int, seed: int = 0, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A Sherrington-Kirkpatrick instance: dense Gaussian J_ij ~ N(0, scale^2 / N) and h_i ~ N(0, 0.1^2)."""
    g = torch.Generator().manual_seed(seed)
    upper = torch.triu(torch.randn(num_bits, num_bits, generator=g) * scale / math.sqrt(num_bits), diagonal=1)
    return upper + upper.T, 0.1 * torch.randn(num_bits, generator=g)


def state_histogram(states: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Empirical distribution over the 2^N states of sampled states [..., N] (float64, N <= 16)."""
    _check_exact(num_bits)
    counts = torch.bincount(state_index(states).reshape(-1), minlength=2 ** num_bits).to(torch.float64)
    return counts / counts.sum()


__all__: Sequence[str] = (
    "PBitNetwork", "UniformSource", "greedy_coloring", "state_index", "index_to_states", "ising_lattice",
    "spin_glass", "state_histogram", "STATE_KINDS", "UPDATES",
)
