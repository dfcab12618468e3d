"""p-bit networks: a general Boltzmann-machine simulator and a token sampler built on it."""

from qllm_samplers.pbit.network import PBitNetwork, UniformSource, greedy_coloring, ising_lattice, spin_glass
from qllm_samplers.pbit.token import MODES, OneHotNetwork, PBitSampler, PBitStats, reduce_vocabulary

__all__ = [
    "MODES", "OneHotNetwork", "PBitNetwork", "PBitSampler", "PBitStats", "UniformSource", "greedy_coloring",
    "ising_lattice", "reduce_vocabulary", "spin_glass",
]
