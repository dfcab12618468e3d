"""Attention of the real tokens over [memory keys | causal token keys], one exact softmax over both.

Every token query sees all M memory keys and the tokens up to itself. Written as one SDPA call this needs either a
lower-right causal mask over M + T keys (on CPU: an explicit mask, off the causal fast path, every key of every
row computed) or M placeholder queries in front of each row (the keys and queries copied into [B, M + T] tensors
per layer, and 22% more work in the attention kernels than the plain model's). Both cost the QLLM its throughput.

The CPU path here splits the softmax instead: the token part is the plain model's causal flash-attention call
(same kernel, same cost), which also returns its log-sum-exp; the memory part is one small [T, M] matmul per
head; the two are merged exactly by their log-sum-exps. The backward reuses the flash backward kernel: given the
*merged* log-sum-exp and output it recomputes the merged softmax's probabilities on the token keys, so its
gradients are those of the full softmax; the memory keys' share is a few small matmuls. Nothing of size
[B, H, M + T, D] is ever built. Tested against the one-call SDPA reference in float64 (gradcheck) and float32.

Other devices, dropout, autocast and dtypes other than float32/float64 take the one-call reference with
``torch.nn.attention.bias.causal_lower_right`` (CUDA dispatches that to its fused kernels).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.nn.attention.bias import causal_lower_right

# Private ATen ops behind F.scaled_dot_product_attention on CPU (stable since torch 2.2): the public function
# does not return the log-sum-exp, and the merge needs it.
_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_cpu_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class _SplitSoftmaxAttention(torch.autograd.Function):
    """q, k, v [B, H, T, D] (tokens), memory_k, memory_v [H, M, D] -> [B, H, T, D]."""

    @staticmethod
    def forward(ctx, q, k, v, memory_k, memory_v):
        B = q.shape[0]
        scale = 1.0 / math.sqrt(q.shape[-1])
        memory_k, memory_v = memory_k.expand(B, -1, -1, -1), memory_v.expand(B, -1, -1, -1)  # stride-0 views
        tokens_out, tokens_lse = _flash_cpu(q, k, v, 0.0, True, scale=scale)
        memory_out, memory_lse = _flash_cpu(q, memory_k, memory_v, 0.0, False, scale=scale)
        # softmax over both key sets = the two partial softmaxes weighted by their shares of the total mass
        out = torch.lerp(memory_out, tokens_out, torch.sigmoid(tokens_lse - memory_lse)[..., None])
        lse = torch.logaddexp(tokens_lse, memory_lse)
        ctx.save_for_backward(q, k, v, memory_k, memory_v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    @once_differentiable  # the flash backward has no derivative of its own: a double backward raises
    def backward(ctx, grad_out):
        q, k, v, memory_k, memory_v, out, lse = ctx.saved_tensors
        # Given the merged lse and output, each kernel recomputes the merged softmax's probabilities on its own
        # keys and uses the merged rowsum(grad_out * out): its gradients are the full softmax's through those keys.
        grad_q, grad_k, grad_v = _flash_cpu_backward(grad_out, q, k, v, out, lse, 0.0, True, scale=ctx.scale)
        memory_grad_q, grad_memory_k, grad_memory_v = _flash_cpu_backward(
            grad_out, q, memory_k, memory_v, out, lse, 0.0, False, scale=ctx.scale)
        return grad_q.add_(memory_grad_q), grad_k, grad_v, grad_memory_k.sum(0), grad_memory_v.sum(0)


def with_memory(memory: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Memory keys (or values) [H, M, D] in front of every row's token keys [B, H, T, D]: [B, H, M + T, D]."""
    return torch.cat([memory.expand(tokens.shape[0], -1, -1, -1), tokens], dim=2)


def attention_over_memory(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                          dropout_p: float = 0.0) -> torch.Tensor:
    """One SDPA call: queries [B, H, T, D] over ``with_memory`` keys/values [B, H, M + T, D], lower-right causal."""
    mask = causal_lower_right(q.shape[2], keys.shape[2])
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, dropout_p=dropout_p)


def memory_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, memory_k: torch.Tensor,
                               memory_v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """The same function as ``memory_attention``, as one SDPA call over the concatenated keys."""
    return attention_over_memory(q, with_memory(memory_k, k), with_memory(memory_v, v), dropout_p)


def memory_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, memory_k: torch.Tensor,
                     memory_v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """Token queries ``q`` [B, H, T, D] over the memory keys/values [H, M, D] (shared by every row) and the causal
    token keys/values ``k``, ``v`` [B, H, T, D]. Returns [B, H, T, D].

    >>> q, k, v = (torch.randn(2, 4, 8, 16) for _ in range(3))
    >>> memory_k, memory_v = torch.randn(4, 3, 16), torch.randn(4, 3, 16)
    >>> fast = memory_attention(q, k, v, memory_k, memory_v)
    >>> torch.allclose(fast, memory_attention_reference(q, k, v, memory_k, memory_v), atol=1e-6)
    True
    """
    if (q.device.type == "cpu" and dropout_p == 0.0 and q.dtype in (torch.float32, torch.float64)
            and not torch.is_autocast_enabled("cpu")):
        return _SplitSoftmaxAttention.apply(q, k, v, memory_k, memory_v)
    return memory_attention_reference(q, k, v, memory_k, memory_v, dropout_p)
