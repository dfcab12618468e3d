"""Per-row random streams that do not depend on what else shares the batch.

A batch of requests drawn from one ``torch.Generator`` couples the rows: request 3 sees different random
numbers depending on how many rows precede it (a known vLLM complaint). ``RowRNG`` gives each row its own
counter-based stream: the n-th uniform of a row is a hash of (row seed, draw counter, column), computed for
the whole batch at once with integer tensor ops, so there is no Python loop over rows in the hot path and a
seeded request yields the same tokens whatever batch it is in.

The hash is SplitMix64 (Steele, Lea & Flood 2014), done in int64 with wrap-around multiplication and masked
shifts to emulate unsigned arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)
_DRAW_DOMAIN = _signed(0xD1B54A32D192ED03)


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 values (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser on an int64 tensor (bit-exact with the unsigned reference)."""
    z = x + _GOLDEN
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


GeneratorLike = torch.Generator | Sequence[torch.Generator] | Sequence[int] | torch.Tensor | int | None


class RowRNG:
    """Independent, reproducible random streams, one per batch row.

    Every call advances one shared draw counter, so rows stay in step: row b's numbers depend only on its
    seed and on how many draws were made, never on the other rows.
    """

    def __init__(self, seeds: torch.Tensor, counter: int = 0):
        seeds = torch.as_tensor(seeds)
        if seeds.dim() != 1 or seeds.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"seeds must be a 1-D integer tensor, got shape {tuple(seeds.shape)} {seeds.dtype}")
        self.seeds = seeds.to(torch.int64)
        self._keys = splitmix64(self.seeds)
        self.counter = counter

    @classmethod
    def from_generator(cls, generator: GeneratorLike, batch_size: int, device: torch.device | str = "cpu"):
        """Build row streams from what users usually hold.

        - ``None``: seeds drawn from torch's global RNG (so ``torch.manual_seed`` makes runs repeatable);
        - an ``int``: row b gets seed ``int + b`` (a convenience for a single batch; not batch-invariant);
        - one ``torch.Generator``: B seeds drawn from it once;
        - a sequence of B ``torch.Generator`` (one per row): one seed drawn from each, once, at set-up;
        - a sequence or tensor of B ints: the row seeds themselves (the batch-invariant way to seed requests).
        """
        if isinstance(generator, RowRNG):
            if generator.batch_size != batch_size:
                raise ValueError(f"generator has {generator.batch_size} rows, batch has {batch_size}")
            return generator
        if generator is None:
            seeds = torch.randint(0, 2**62, (batch_size,), dtype=torch.int64)
        elif isinstance(generator, int):
            seeds = torch.arange(batch_size, dtype=torch.int64) + generator
        elif isinstance(generator, torch.Generator):
            seeds = torch.randint(0, 2**62, (batch_size,), dtype=torch.int64, generator=generator,
                                  device=generator.device).cpu()
        else:
            items = list(generator) if not isinstance(generator, torch.Tensor) else generator
            if len(items) != batch_size:
                raise ValueError(f"generator: expected {batch_size} per-row generators or seeds, got {len(items)}")
            if isinstance(items, torch.Tensor):
                seeds = items.to(torch.int64).cpu()
            elif all(isinstance(g, torch.Generator) for g in items):
                seeds = torch.stack([
                    torch.randint(0, 2**62, (1,), dtype=torch.int64, generator=g, device=g.device).cpu()[0]
                    for g in items
                ])
            elif all(isinstance(g, int) for g in items):
                seeds = torch.tensor(items, dtype=torch.int64)
            else:
                raise ValueError("generator: a sequence must hold only torch.Generator objects or only ints")
        return cls(seeds.to(device))

    @property
    def batch_size(self) -> int:
        return self.seeds.shape[0]

    @property
    def device(self) -> torch.device:
        return self.seeds.device

    def to(self, device: torch.device | str) -> RowRNG:
        return RowRNG(self.seeds.to(device), self.counter)

    def select(self, rows: torch.Tensor) -> RowRNG:
        """Streams for a subset (or repetition) of rows, continuing at the current counter."""
        return RowRNG(self.seeds[rows.to(self.device)], self.counter)

    def _bits(self, n: int) -> torch.Tensor:
        # Counter mode: a per-(row, draw) state, then consecutive odd-stride offsets for the columns.
        draw_salt = splitmix64(torch.tensor(self.counter ^ _DRAW_DOMAIN, dtype=torch.int64, device=self.device))
        state = splitmix64(self._keys ^ draw_salt)
        self.counter += 1
        columns = torch.arange(n, dtype=torch.int64, device=self.device) * _GOLDEN
        return splitmix64(state[:, None] + columns[None, :])

    def uniform(self, n: int | None = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Uniforms in [0, 1): shape [B] when n is None, else [B, n]."""
        width = 1 if n is None else n
        u = (_shr(self._bits(width), 11)).to(torch.float64) * (1.0 / (1 << 53))
        u = u.to(dtype)
        return u[:, 0] if n is None else u

    def exponential(self, n: int) -> torch.Tensor:
        """Standard exponential draws [B, n] (for Gumbel/exponential-race sampling)."""
        return -torch.log1p(-self.uniform(n))

    def categorical(self, logits: torch.Tensor) -> torch.Tensor:
        """One draw per row from softmax(logits) by inverse CDF, using a single uniform per row.

        -inf logits have probability zero and are never drawn. The cumulative sum runs in float64 so that
        mass at the end of a 150k vocabulary is not lost to rounding.
        """
        if logits.dim() != 2 or logits.shape[0] != self.batch_size:
            raise ValueError(f"logits must be [batch={self.batch_size}, V], got {tuple(logits.shape)}")
        probs = torch.softmax(logits.to(torch.float64), dim=-1)
        cdf = probs.cumsum(dim=-1)
        total = cdf[:, -1:]
        u = self.uniform(dtype=torch.float64).to(logits.device)[:, None] * total
        index = torch.searchsorted(cdf, u, right=True)
        # u*total can round up to total; the first position reaching total always has positive mass.
        last_positive = (cdf < total).sum(dim=-1, keepdim=True)
        return torch.minimum(index, last_positive).squeeze(-1)
