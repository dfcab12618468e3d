"""The general p-bit network simulator against exact enumeration (N <= 16)."""

from __future__ import annotations

import pytest
import torch

from qllm_samplers.diagnostics.distribution import g_test, total_variation, tv_noise_floor
from qllm_samplers.pbit.network import (
    PBitNetwork,
    UniformSource,
    greedy_coloring,
    index_to_states,
    ising_lattice,
    spin_glass,
    state_histogram,
    state_index,
)
from qllm_samplers.rng import RowRNG


def _check_against_exact(network: PBitNetwork, states: torch.Tensor, moment_tolerance: float) -> None:
    """States [C, N] from independent chains match the enumerated Boltzmann distribution."""
    exact = network.exact_distribution()
    empirical = state_histogram(states, network.num_bits)
    counts = empirical * states.shape[0]
    _, p_value, _ = g_test(counts, exact)
    assert p_value > 1e-3, f"G-test rejects the sampled state distribution (p={p_value:.2e})"
    tv = float(total_variation(empirical, exact))
    assert tv < 1.3 * tv_noise_floor(states.shape[0], exact), f"TV {tv:.4f} above the noise floor"
    magnetisation, second = network.exact_moments()
    x = states.to(torch.float64)
    assert (x.mean(0) - magnetisation).abs().max() < moment_tolerance
    assert ((x.T @ x) / x.shape[0] - second).abs().max() < moment_tolerance


@pytest.mark.parametrize("update", ["sequential", "random"])
def test_spin_glass_matches_exact_enumeration(update):
    couplings, biases = spin_glass(7, seed=0, scale=1.5)
    network = PBitNetwork(couplings, biases, states="spin", beta=1.0)
    states = network.sample(8000, sweeps=1, burn_in=100, update=update, generator=1)
    _check_against_exact(network, states, moment_tolerance=0.03)


def test_binary_network_matches_exact_enumeration():
    couplings, biases = spin_glass(7, seed=3, scale=2.0)
    network = PBitNetwork(couplings, biases - 0.5, states="binary", beta=1.5)
    states = network.sample(8000, sweeps=1, burn_in=100, update="sequential", generator=2)
    assert set(states.unique().tolist()) <= {0.0, 1.0}
    _check_against_exact(network, states, moment_tolerance=0.03)


def test_ising_lattice_16_bits_chequerboard_updates():
    # 4x4 periodic ferromagnet near its finite-size critical region, small field: N = 16, 65,536 states.
    couplings = ising_lattice(4, 4, coupling=0.35)
    network = PBitNetwork(couplings, torch.full((16,), 0.05), states="spin")
    assert len(network.colors) == 2  # the lattice is bipartite: two colours update in parallel
    states = network.sample(10_000, sweeps=1, burn_in=40, update="colored", generator=3)
    exact = network.exact_distribution()
    counts = state_histogram(states, 16) * states.shape[0]
    assert g_test(counts, exact)[1] > 1e-3
    magnetisation, second = network.exact_moments()
    x = states.to(torch.float64)
    assert (x.mean(0) - magnetisation).abs().max() < 0.05
    assert ((x.T @ x) / x.shape[0] - second).abs().max() < 0.05
    # Correlations are strong here (the test is not trivially passed by independent spins).
    assert second[0, 1] > 0.3


def test_conditional_probability_is_the_boltzmann_ratio():
    couplings, biases = spin_glass(6, seed=4)
    for kind in ("spin", "binary"):
        network = PBitNetwork(couplings, biases, states=kind, beta=0.7)
        x = index_to_states(torch.arange(64), 6, network.low)
        fields = network.local_fields(x)
        for i in range(6):
            on, off = x.clone(), x.clone()
            on[:, i], off[:, i] = 1.0, network.low
            ratio = torch.exp(-network.beta * (network.energy(on) - network.energy(off)))
            expected = ratio / (1 + ratio)
            p_on = torch.sigmoid(network.gain * network.beta * fields[:, i].to(torch.float64))
            assert torch.allclose(p_on, expected, atol=1e-5, rtol=1e-5)


def test_per_chain_biases_run_different_networks_side_by_side():
    couplings, biases = spin_glass(5, seed=5)
    flipped = -biases - 1.0
    stacked = torch.cat([biases.expand(4000, -1), flipped.expand(4000, -1)])
    batched = PBitNetwork(couplings, stacked, states="spin")
    states = batched.sample(8000, sweeps=1, burn_in=30, update="random", generator=6)
    for half, bias in ((states[:4000], biases), (states[4000:], flipped)):
        exact = PBitNetwork(couplings, bias, states="spin")
        magnetisation, _ = exact.exact_moments()
        assert (half.to(torch.float64).mean(0) - magnetisation).abs().max() < 0.06
    with pytest.raises(ValueError, match="biases for 8000 chains"):
        batched.sample(5, sweeps=1)


def test_coloring_and_state_index_round_trip():
    lattice = ising_lattice(3, 4, periodic=False)
    colors = greedy_coloring(lattice)
    assert len(colors) == 2
    for color in colors:
        assert lattice[color][:, color].abs().sum() == 0  # no coupling inside a colour class
    dense, _ = spin_glass(7)
    assert len(greedy_coloring(dense)) == 7
    index = torch.arange(128)
    assert torch.equal(state_index(index_to_states(index, 7, -1.0)), index)


def test_recorded_trace_and_seeding():
    couplings, biases = spin_glass(6, seed=7)
    network = PBitNetwork(couplings, biases)
    trace = network.sample(3, sweeps=5, record=True, generator=8)
    assert trace.shape == (3, 5, 6)
    assert torch.equal(network.sample(3, sweeps=5, record=True, generator=8), trace)
    assert not torch.equal(network.sample(3, sweeps=5, record=True, generator=9), trace)
    # A RowRNG drives rows independently of what else is in the batch.
    both = network.sample(2, sweeps=4, generator=RowRNG(torch.tensor([11, 12])))
    alone = network.sample(1, sweeps=4, generator=RowRNG(torch.tensor([12])))
    assert torch.equal(both[1:], alone)


def test_network_rejects_bad_input():
    couplings, biases = spin_glass(4)
    with pytest.raises(ValueError, match="symmetric"):
        PBitNetwork(couplings + torch.triu(torch.ones(4, 4), 1), biases)
    with pytest.raises(ValueError, match="symmetric with a zero diagonal"):
        PBitNetwork(couplings + torch.eye(4), biases)
    with pytest.raises(ValueError, match="biases must be"):
        PBitNetwork(couplings, torch.zeros(5))
    with pytest.raises(ValueError, match="states must be one of"):
        PBitNetwork(couplings, biases, states="ternary")
    with pytest.raises(ValueError, match="beta must be > 0"):
        PBitNetwork(couplings, biases, beta=0.0)
    network = PBitNetwork(couplings, biases)
    with pytest.raises(ValueError, match="sweeps must be >= 1"):
        network.sample(2, sweeps=0)
    with pytest.raises(ValueError, match="update must be one of"):
        network.sample(2, sweeps=1, update="parallel")
    with pytest.raises(ValueError, match="N <= 16"):
        PBitNetwork(ising_lattice(5, 4), torch.zeros(20)).exact_distribution()
    with pytest.raises(ValueError, match="generator"):
        UniformSource(3, generator="seed")
