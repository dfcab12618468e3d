"""QLLM hyper-parameters: one dataclass, validated on construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Literal

from .tokenizer import ByteTokenizer

PhaseMode = Literal["off", "gain", "rotation"]
LoRAQKV = Literal["fused", "separate"]


@dataclass
class QLLMConfig:
    """Shape of the model. ``phase_mode`` chooses the PhaseRotator:

    - ``"gain"``: the published formula x*cos(phi) - x*sin(phi), which is a per-channel gain (cos - sin);
    - ``"rotation"``: channels paired as complex numbers (first half real, second half imaginary) and rotated;
    - ``"off"``: no rotator (a plain transformer when ``n_global_tokens`` is 0 too).

    ``lora_qkv`` places the adapters of the fused q/k/v projection (``c_attn``): ``"fused"`` (ours) is one rank-r
    adapter over its 3*d outputs; ``"separate"`` is the original qllm2's placement, one rank-r adapter each for q,
    k and v (with ``c_proj`` = its o). The original had no adapters on the MLP: its targets are
    ``["c_attn", "c_proj"]``.
    """

    vocab_size: int = ByteTokenizer.vocab_size
    max_seq_len: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: int = 4
    n_global_tokens: int = 16
    phase_mode: PhaseMode = "gain"
    coherence_weight: float = 0.05
    dropout: float = 0.0
    bias: bool = False
    tie_embeddings: bool = True
    lora_r: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["c_attn", "c_proj", "c_fc", "mlp_proj"])
    lora_qkv: LoRAQKV = "fused"

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        need(self.vocab_size >= ByteTokenizer.vocab_size,
             f"vocab_size must be >= {ByteTokenizer.vocab_size} (256 bytes + EOS), got {self.vocab_size}")
        need(self.max_seq_len >= 1, f"max_seq_len (seq_len) must be >= 1, got {self.max_seq_len}")
        need(self.d_model >= 1, f"d_model must be >= 1, got {self.d_model}")
        need(self.n_layers >= 1, f"n_layers must be >= 1, got {self.n_layers}")
        need(self.n_heads >= 1 and self.d_model % self.n_heads == 0,
             f"n_heads must be >= 1 and divide d_model: d_model={self.d_model}, n_heads={self.n_heads}")
        need(self.mlp_ratio >= 1, f"mlp_ratio must be >= 1, got {self.mlp_ratio}")
        need(self.n_global_tokens >= 0, f"n_global_tokens must be >= 0, got {self.n_global_tokens}")
        need(self.phase_mode in ("off", "gain", "rotation"),
             f"phase_mode must be one of 'off', 'gain', 'rotation', got {self.phase_mode!r}")
        need(self.phase_mode != "rotation" or self.d_model % 2 == 0,
             f"phase_mode='rotation' pairs channels, so d_model must be even, got {self.d_model}")
        need(self.coherence_weight >= 0, f"coherence_weight must be >= 0, got {self.coherence_weight}")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        need(self.lora_r >= 0, f"lora_r must be >= 0 (0 = full-rank layers only), got {self.lora_r}")
        need(self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha}")
        need(0.0 <= self.lora_dropout < 1.0, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        need(self.lora_qkv in ("fused", "separate"),
             f"lora_qkv must be 'fused' or 'separate', got {self.lora_qkv!r}")
        allowed = {"c_attn", "c_proj", "c_fc", "mlp_proj"}
        unknown = set(self.lora_targets) - allowed
        need(not unknown, f"lora_targets must be a subset of {sorted(allowed)}, got unknown {sorted(unknown)}")

    # The names HF-style code (qllm_samplers.lm.context_limit, evals) looks for.
    @property
    def max_position_embeddings(self) -> int:
        return self.max_seq_len

    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layers

    @property
    def num_attention_heads(self) -> int:
        return self.n_heads

    @property
    def eos_token_id(self) -> int:
        return ByteTokenizer.eos_token_id

    @property
    def pad_token_id(self) -> int:
        return ByteTokenizer.pad_token_id

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> QLLMConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown QLLMConfig fields {sorted(unknown)}; allowed: {sorted(known)}")
        return cls(**values)

