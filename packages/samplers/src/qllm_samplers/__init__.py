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
from .generate import DecodeState, GenerateOutput, generate
from .pbit import PBitNetwork, PBitSampler
from .power import PowerSampleOutput, PowerSampler
from .rng import RowRNG
from .warpers import MinP, RepetitionPenalty, Temperature, TopK, TopP, Typical

__all__ = [
    "AlphaSampler", "AlphaSamplerConfig", "alpha_repetition_penalty", "alpha_state", "alpha_temperature",
    "alpha_top_k", "alpha_top_p", "Greedy", "SamplingChain", "EntropixConfig", "EntropixSampler", "DecodeState",
    "GenerateOutput", "generate", "PBitNetwork", "PBitSampler", "PowerSampleOutput", "PowerSampler", "RowRNG",
    "MinP", "RepetitionPenalty", "Temperature", "TopK", "TopP", "Typical",
]

__version__ = "0.2.0"  # the one place the version is written (pyproject reads it)
