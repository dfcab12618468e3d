"""The QLLM byte model, nanoGPT style: embeddings -> PhaseRotator -> global memory tokens -> pre-norm causal
transformer blocks (SDPA) -> a head over bytes.

It speaks the model surface of ``qllm_samplers.lm`` (HF names): ``model(input_ids=, attention_mask=,
position_ids=, past_key_values=, use_cache=True)`` returns ``.logits`` and ``.past_key_values``. The memory
tokens sit at the front of every sequence; they are causal among themselves and see no input, so they never
leak the future. They live in the KV cache but ``get_seq_length()`` and ``crop()`` count only real positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qllm_samplers.lm import positions_from_mask

from .attention import attention_over_memory, memory_attention, with_memory
from .config import QLLMConfig
from .lora import LoRALinear, merge_lora


class QLLMCache:
    """Per-layer keys/values [B, H, n_global + S, Dh], with HF ``DynamicCache`` method names and semantics."""

    def __init__(self, n_layers: int, n_global: int):
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.n_global = n_global

    @property
    def has_memory(self) -> bool:
        """Whether the memory tokens have been run into the cache (after the first forward)."""
        return self.keys[0] is not None

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is None:
            self.keys[layer], self.values[layer] = key, value
        else:
            self.keys[layer] = torch.cat([self.keys[layer], key], dim=2)
            self.values[layer] = torch.cat([self.values[layer], value], dim=2)
        return self.keys[layer], self.values[layer]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        keys = self.keys[layer_idx]
        return 0 if keys is None else keys.shape[2] - self.n_global

    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` real positions (negative: drop that many from the end), as HF does."""
        length = self.get_seq_length()
        if max_length < 0:
            max_length = length - abs(max_length)
        if length <= max_length:
            return
        keep = self.n_global + max(max_length, 0)
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is not None:
                self.keys[i], self.values[i] = k[:, :, :keep], v[:, :, :keep]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is not None:
                self.keys[i], self.values[i] = k[indices, ...], v[indices, ...]

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is not None:
                idx = beam_idx.to(k.device)
                self.keys[i], self.values[i] = k.index_select(0, idx), v.index_select(0, idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is not None:
                self.keys[i] = k.repeat_interleave(repeats, dim=0)
                self.values[i] = v.repeat_interleave(repeats, dim=0)

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class QLLMOutput:
    logits: torch.Tensor  # [B, T, V], real positions only (memory tokens are never predicted)
    past_key_values: QLLMCache | None = None


class PhaseRotator(nn.Module):
    """phi = tanh(phase) * pi per channel (``gain``) or per channel pair (``rotation``).

    ``gain`` is the published x*cos(phi) - x*sin(phi): each channel is scaled by cos(phi) - sin(phi), a gain
    in [-sqrt 2, sqrt 2], not a rotation. ``rotation`` treats (x[:d/2], x[d/2:]) as the real and imaginary
    parts of d/2 complex numbers and multiplies them by exp(i phi), which preserves the norm.
    Both start at phase 0, i.e. as the identity.
    """

    def __init__(self, d_model: int, mode: str):
        super().__init__()
        if mode not in ("gain", "rotation"):
            raise ValueError(f"PhaseRotator mode must be 'gain' or 'rotation', got {mode!r}")
        self.mode = mode
        self.phase = nn.Parameter(torch.zeros(d_model if mode == "gain" else d_model // 2))

    def angles(self) -> torch.Tensor:
        return torch.tanh(self.phase) * math.pi

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        phi = self.angles().to(x.dtype)
        if self.mode == "gain":  # x cos(phi) - x sin(phi), as one multiply by the per-channel gain
            return x * (torch.cos(phi) - torch.sin(phi))
        real, imag = x.chunk(2, dim=-1)
        cos, sin = torch.cos(phi), torch.sin(phi)
        return torch.cat([real * cos - imag * sin, real * sin + imag * cos], dim=-1)

    def coherence_loss(self) -> torch.Tensor:
        """(phase_diff^2).mean() + 0.1 (phase^2).mean(): neighbouring phases agree, phases stay small."""
        diff = self.phase[1:] - self.phase[:-1]
        smooth = (diff**2).mean() if diff.numel() else self.phase.new_zeros(())
        return smooth + 0.1 * (self.phase**2).mean()


def _linear(config: QLLMConfig, name: str, fan_in: int, fan_out: int, splits: int = 1) -> nn.Linear:
    if config.lora_r > 0 and name in config.lora_targets:
        return LoRALinear(fan_in, fan_out, bias=config.bias, r=config.lora_r, alpha=config.lora_alpha,
                          dropout=config.lora_dropout, splits=splits)
    return nn.Linear(fan_in, fan_out, bias=config.bias)


class CausalSelfAttention(nn.Module):
    """Multi-head attention through ``F.scaled_dot_product_attention``.

    Attention probe for adaptive samplers: set ``capture_last_query_probs = True`` and each forward stores
    ``last_query_probs`` [B, H, K], the softmax weights of the newest query over all K keys in the cache
    (the first ``n_memory_keys`` are the global memory tokens; masked keys are exactly 0). Only that one row
    is computed explicitly; the main path stays on SDPA.

    Two entry points: ``forward`` (tokens [B, T, C] against the cache and an optional explicit mask: decoding and
    left-padded prompts) and ``forward_with_memory`` (the memory stream beside the tokens, the training path: see
    ``QLLM._forward_with_memory``).
    """

    def __init__(self, config: QLLMConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.d_model // config.n_heads
        self.n_memory_keys = config.n_global_tokens
        # lora_qkv="separate": one adapter each for q, k and v (the original qllm2's q/k/v LoRALinear layers).
        self.c_attn = _linear(config, "c_attn", config.d_model, 3 * config.d_model,
                              splits=3 if config.lora_qkv == "separate" else 1)
        self.c_proj = _linear(config, "c_proj", config.d_model, config.d_model)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.capture_last_query_probs = False
        self.last_query_probs: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
                cache: QLLMCache | None, layer: int) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(layer, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        if self.capture_last_query_probs:
            self.last_query_probs = self._last_query_probs(q, k, mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def forward_with_memory(self, memory: torch.Tensor, x: torch.Tensor, cache: QLLMCache | None,
                            layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The training (and unpadded prefill) path: ``memory`` [M, C] once for the whole batch, tokens ``x``
        [B, T, C]. Memory query j sees memory keys 0..j; token i sees every memory key and tokens 0..i.

        The memory tokens see no input, so their queries, keys and values are the same in every row and are
        computed once; the tokens' attention over [memory | tokens] is ``memory_attention`` (exact; on CPU the plain
        model's causal kernel plus one small kernel over the M memory keys, merged by log-sum-exp). Returns the
        attention outputs (memory [M, C], tokens [B, T, C]).
        """
        B, T, C = x.shape
        M = memory.shape[0]
        dropout = self.dropout if self.training else 0.0
        memory_q, memory_k, memory_v = self._heads(self.c_attn(memory)[None])  # [1, H, M, Dh]
        q, k, v = self._heads(self.c_attn(x))
        y_memory = F.scaled_dot_product_attention(memory_q, memory_k, memory_v, is_causal=True, dropout_p=dropout)
        if cache is None and not self.capture_last_query_probs:
            y = memory_attention(q, k, v, memory_k[0], memory_v[0], dropout)
        else:  # inference: the cache and the attention probe need the keys as one [memory | tokens] tensor
            k, v = with_memory(memory_k[0], k), with_memory(memory_v[0], v)
            if cache is not None:
                k, v = cache.update(layer, k, v)
            y = attention_over_memory(q, k, v, dropout)
            if self.capture_last_query_probs:
                self.last_query_probs = self._last_query_probs(q, k, None)
        y_memory = self.resid_dropout(self.c_proj(y_memory[0].transpose(0, 1).reshape(M, C)))
        return y_memory, self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))

    def _heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, T, 3C] -> q, k, v as [B, H, T, Dh] views (split, whose backward is one cat into [B, T, 3C])."""
        B, T, C3 = qkv.shape
        return tuple(t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in qkv.split(C3 // 3, dim=2))

    @torch.no_grad()
    def _last_query_probs(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        # The newest query is the last position: under causal masking it may see every key, so only an
        # explicit mask can hide some of them.
        scores = (q[:, :, -1:].float() @ k.float().transpose(-2, -1)) / math.sqrt(self.head_dim)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, :, -1:], float("-inf"))
        return torch.softmax(scores, dim=-1)[:, :, 0]


class MLP(nn.Module):
    def __init__(self, config: QLLMConfig):
        super().__init__()
        hidden = config.mlp_ratio * config.d_model
        self.c_fc = _linear(config, "c_fc", config.d_model, hidden)
        self.mlp_proj = _linear(config, "mlp_proj", hidden, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.mlp_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: QLLMConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, mask, is_causal, cache, layer):
        x = x + self.attn(self.ln_1(x), mask, is_causal, cache, layer)
        return x + self.mlp(self.ln_2(x))

    def forward_with_memory(self, memory: torch.Tensor, x: torch.Tensor, cache: QLLMCache | None,
                            layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The same block on the memory stream [M, C] and the token stream [B, T, C]
        (see ``CausalSelfAttention.forward_with_memory``)."""
        attn_memory, attn_x = self.attn.forward_with_memory(self.ln_1(memory), self.ln_1(x), cache, layer)
        memory, x = memory + attn_memory, x + attn_x
        return memory + self.mlp(self.ln_2(memory)), x + self.mlp(self.ln_2(x))


class QLLM(nn.Module):
    def __init__(self, config: QLLMConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.max_seq_len, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.phase = PhaseRotator(config.d_model, config.phase_mode) if config.phase_mode != "off" else None
        self.global_tokens = (nn.Parameter(torch.randn(config.n_global_tokens, config.d_model) * 0.02)
                              if config.n_global_tokens else None)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layers)])
        self.ln_f = nn.LayerNorm(config.d_model, bias=config.bias)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layers) so the residual stream does not grow.
        for name, param in self.named_parameters():
            if name.endswith(("c_proj.weight", "mlp_proj.weight")):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.pos_emb.weight.numel() if exclude_embeddings else n

    def attention_modules(self) -> list[CausalSelfAttention]:
        return [block.attn for block in self.blocks]

    def coherence_loss(self) -> torch.Tensor:
        if self.phase is None:
            return self.tok_emb.weight.new_zeros(())
        return self.phase.coherence_loss()

    def merge_lora(self) -> QLLM:
        """Fold every adapter into its weight and turn the model into a plain (lora_r=0) QLLM, in place."""
        merge_lora(self)
        self.config.lora_r = 0
        return self

    def _prefill_memory(self, batch: int, dtype: torch.dtype, cache: QLLMCache | None) -> QLLMCache:
        """Run the memory tokens through the blocks once, at batch size 1, and put their keys/values in front.

        They attend only to each other, so their keys/values are the same for every row: computing them
        per row would cost batch x n_global extra token positions per step for nothing. The broadcast
        (expand) views become real tensors when the first real tokens are appended.
        """
        memory_cache = QLLMCache(self.config.n_layers, self.config.n_global_tokens)
        memory = self.drop(self.global_tokens.to(dtype)[None])
        for layer, block in enumerate(self.blocks):
            memory = block(memory, None, True, memory_cache, layer)
        target = cache if cache is not None else QLLMCache(self.config.n_layers, self.config.n_global_tokens)
        for layer in range(self.config.n_layers):
            target.keys[layer] = memory_cache.keys[layer].expand(batch, -1, -1, -1)
            target.values[layer] = memory_cache.values[layer].expand(batch, -1, -1, -1)
        return target

    def _build_mask(self, attention_mask: torch.Tensor | None, batch: int, n_new: int, n_keys: int,
                    device: torch.device) -> tuple[torch.Tensor | None, bool]:
        """A boolean SDPA mask [B or 1, 1, Q, K] (True = may attend), or (None, is_causal) when none is needed.
        ``attention_mask`` is given only when it holds padding.

        Query i of this call sits at absolute index n_keys - Q + i. It sees memory keys and valid
        (unpadded) keys up to itself; it always sees itself so that a padded query never has an empty
        row (its output is garbage, but no real token ever reads it).
        """
        offset = n_keys - n_new
        padded = attention_mask is not None  # the caller passes the mask only when it holds padding
        if not padded:
            if offset == 0:
                return None, n_new > 1
            if n_new == 1:
                return None, False
        q_index = torch.arange(n_new, device=device)[:, None] + offset
        k_index = torch.arange(n_keys, device=device)[None, :]
        allowed = (k_index <= q_index)[None, None]
        if padded:
            n_memory = n_keys - attention_mask.shape[1]
            key_ok = torch.cat([torch.ones(batch, n_memory, dtype=torch.bool, device=device),
                                attention_mask.bool()], dim=1)
            allowed = (allowed & key_ok[:, None, None, :]) | (k_index == q_index)[None, None]
        return allowed, False

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: QLLMCache | None = None,
                use_cache: bool = False, **_: object) -> QLLMOutput:
        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids must be [batch, seq >= 1], got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        device = input_ids.device
        cache = past_key_values
        if cache is None and use_cache:
            cache = QLLMCache(self.config.n_layers, self.config.n_global_tokens)
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None and attention_mask.shape != (B, past + T):
            raise ValueError(f"attention_mask must cover cached + new tokens: expected shape {(B, past + T)}, "
                             f"got {tuple(attention_mask.shape)}")
        if position_ids is None and attention_mask is None:
            # The training path: positions known on the host, so no device sync to check them.
            last_position = past + T - 1
            position_ids = torch.arange(past, past + T, device=device)[None].expand(B, T)
        else:
            if position_ids is None:
                position_ids = positions_from_mask(attention_mask)[:, -T:]
            last_position = int(position_ids.max())
        if last_position >= self.config.max_seq_len:
            raise ValueError(f"position {last_position} is beyond the model's context: positions must "
                             f"be < max_seq_len={self.config.max_seq_len}")

        x = self.tok_emb(input_ids) + self.pos_emb(position_ids)
        if self.phase is not None:
            x = self.phase(x)
        x = self.drop(x)
        n_memory = self.config.n_global_tokens
        padded = attention_mask is not None and not bool(attention_mask.all())
        if n_memory and past == 0 and not padded and not (cache is not None and cache.has_memory):
            x = self._forward_with_memory(x, cache)
        else:
            if n_memory and not (cache is not None and cache.has_memory):
                cache = self._prefill_memory(B, x.dtype, cache)
            n_keys = n_memory + past + T
            mask, is_causal = self._build_mask(attention_mask if padded else None, B, T, n_keys, device)
            for layer, block in enumerate(self.blocks):
                x = block(x, mask, is_causal, cache, layer)
        logits = self.lm_head(self.ln_f(x))
        return QLLMOutput(logits=logits, past_key_values=cache if use_cache else None)

    def _forward_with_memory(self, x: torch.Tensor, cache: QLLMCache | None) -> torch.Tensor:
        """Training (and unpadded prefill) path: the memory tokens go through every block once, as their own
        [M, C] stream beside the batch's tokens (they see no input, so every row's would be the same), and the
        tokens attend over them with ``memory_attention``: no mask, no per-row copies of the memory. Same function
        as the memory prefill + explicit mask path, up to float rounding (tested against a transcription of the
        original)."""
        memory = self.drop(self.global_tokens.to(x.dtype))
        for layer, block in enumerate(self.blocks):
            memory, x = block.forward_with_memory(memory, x, cache, layer)
        return x
