"""qllm_samplers: decoding samplers for causal LMs (depends on torch only)."""

from .alpha import (
    AlphaSampler,
    AlphaSamplerConfig,
    alpha_repetition_penalty,
    alpha_state,
    alpha_temperature,
    alpha_top_k,
    alpha_top_p,
)
from .chain import Greedy, SamplingChain
from .entropix import EntropixConfig, EntropixSampler
from .generate import DecodeState, GenerateOutput, SequenceSampler, TokenSampler, generate
from .pbit import PBitNetwork, PBitSampler
from .power import PowerSampler
from .rng import RowRNG
from .smc import PowerSMC
from .warpers import MinP, RepetitionPenalty, Temperature, TopK, TopP, Typical

__all__ = [
    "AlphaSampler", "AlphaSamplerConfig", "alpha_repetition_penalty", "alpha_state", "alpha_temperature",
    "alpha_top_k", "alpha_top_p", "Greedy", "SamplingChain", "EntropixConfig", "EntropixSampler", "DecodeState",
    "GenerateOutput", "SequenceSampler", "TokenSampler", "generate", "PBitNetwork", "PBitSampler", "PowerSampler",
    "PowerSMC", "RowRNG",
    "MinP", "RepetitionPenalty", "Temperature", "TopK", "TopP", "Typical",
]

__version__ = "0.2.0"  # the one place the version is written (pyproject reads it)
