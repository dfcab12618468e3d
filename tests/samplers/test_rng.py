"""RowRNG: bit-exact SplitMix64, batch-invariant streams, the accepted generator forms, and errors."""

import pytest
import torch

from qllm_samplers.rng import RowRNG, splitmix64

MASK = (1 << 64) - 1


def _reference_splitmix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def test_splitmix64_is_bit_exact():
    values = [0, 1, 2, 12345, 2**40 + 17, 2**62, 2**63 - 1]
    ours = splitmix64(torch.tensor(values, dtype=torch.int64))
    assert [int(v) & MASK for v in ours] == [_reference_splitmix64(v) for v in values]


def test_row_stream_does_not_depend_on_other_rows():
    alone = RowRNG(torch.tensor([99]))
    crowd = RowRNG(torch.tensor([3, 99, 4, 5]))
    for width in (1, 7, 3):
        assert torch.equal(alone.uniform(width)[0], crowd.uniform(width)[1])


def test_rows_and_draws_are_uncorrelated_and_uniform():
    u = RowRNG(torch.arange(20000)).uniform(6)
    assert abs(u.mean().item() - 0.5) < 0.01
    assert abs(u.var().item() - 1 / 12) < 0.003
    corr = torch.corrcoef(u.T)
    off_diagonal = corr[~torch.eye(6, dtype=torch.bool)]
    assert off_diagonal.abs().max() < 0.03
    # consecutive rows share no values (a collision would reveal a structured hash)
    assert torch.unique(u).numel() == u.numel()


def test_from_generator_forms_are_reproducible():
    a = RowRNG.from_generator(torch.Generator().manual_seed(5), 3).uniform(4)
    b = RowRNG.from_generator(torch.Generator().manual_seed(5), 3).uniform(4)
    assert torch.equal(a, b)
    per_row = [torch.Generator().manual_seed(s) for s in (1, 2)]
    c = RowRNG.from_generator(per_row, 2).uniform(2)
    d = RowRNG.from_generator([torch.Generator().manual_seed(2)], 1).uniform(2)
    assert torch.equal(c[1], d[0])
    assert torch.equal(RowRNG.from_generator([7, 8], 2).seeds, torch.tensor([7, 8]))


def test_from_generator_rejects_wrong_row_count():
    with pytest.raises(ValueError, match="expected 3"):
        RowRNG.from_generator([1, 2], 3)


def test_categorical_rejects_wrong_shape():
    with pytest.raises(ValueError, match="logits must be"):
        RowRNG(torch.tensor([1, 2])).categorical(torch.zeros(3, 5))
