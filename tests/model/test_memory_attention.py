"""memory_attention: the split-softmax CPU path against one SDPA call over [memory | tokens], and its routing."""

from __future__ import annotations

import pytest
import torch

from qllm_model.attention import _SplitSoftmaxAttention, memory_attention, memory_attention_reference
from qllm_model.config import QLLMConfig
from qllm_model.model import QLLM


def projected_inputs(batch: int, heads: int, tokens: int, head_dim: int, n_memory: int, dtype: torch.dtype,
                     seed: int) -> list[torch.Tensor]:
    """q, k, v as the model makes them (strided [B, H, T, D] views of one [B, T, 3C] projection) and the
    memory keys/values [H, M, D]. Scaled so that some softmax rows are peaked, not all flat."""
    generator = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, tokens, 3 * heads * head_dim, dtype=dtype, generator=generator) * 2
    qkv.requires_grad_()
    q, k, v = (t.view(batch, tokens, heads, head_dim).transpose(1, 2) for t in qkv.split(heads * head_dim, dim=2))
    memory = [(torch.randn(heads, n_memory, head_dim, dtype=dtype, generator=generator) * 2).requires_grad_()
              for _ in range(2)]
    return [q, k, v, *memory]


def test_split_softmax_passes_gradcheck_in_float64():
    inputs = [t.detach().requires_grad_() for t in projected_inputs(2, 3, 9, 4, 5, torch.float64, seed=0)]
    assert torch.autograd.gradcheck(_SplitSoftmaxAttention.apply, inputs)


# T crosses the CPU kernel's query and key block sizes (32 and 512 positions); M = 1 and D = 64 included.
@pytest.mark.parametrize("shape", [(3, 4, 130, 32, 16), (1, 2, 1, 8, 1), (2, 2, 600, 16, 3), (2, 1, 40, 64, 7)])
def test_split_softmax_is_as_accurate_as_one_sdpa_call_with_gradients(shape):
    # Against float64 truth, the float32 split path's error (outputs and every gradient) stays within 2x that of
    # the float32 one-call reference, plus a hair for results that the reference happens to get exact.
    inputs64 = projected_inputs(*shape, torch.float64, seed=sum(shape))
    inputs = [t.detach().float().requires_grad_() for t in inputs64]
    grad_out = torch.randn(shape[0], shape[1], shape[2], shape[3], dtype=torch.float64,
                           generator=torch.Generator().manual_seed(1))
    fast = memory_attention(*inputs)
    assert fast.grad_fn.name() == "_SplitSoftmaxAttentionBackward"
    reference = memory_attention_reference(*inputs)
    truth = memory_attention_reference(*inputs64)
    results = {}
    for name, out, leaves in (("fast", fast, inputs), ("reference", reference, inputs), ("truth", truth, inputs64)):
        grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
        results[name] = [out.double(), *(g.double() for g in grads)]
    for name, got, ref, exact in zip(("out", "q", "k", "v", "memory_k", "memory_v"), *results.values()):
        error, reference_error = (got - exact).abs().max(), (ref - exact).abs().max()
        assert error <= 2 * reference_error + 1e-6 * exact.abs().max(), (name, error, reference_error)


def test_a_token_that_sees_only_memory_and_itself_gets_their_softmax():
    # Token 0 of each row attends to the M memory keys and itself: check that row by hand.
    q, k, v, memory_k, memory_v = projected_inputs(2, 2, 5, 4, 3, torch.float64, seed=7)
    out = memory_attention(q, k, v, memory_k, memory_v)
    keys = torch.cat([memory_k, k[0, :, :1]], dim=1)  # row 0, token 0: [H, M + 1, D]
    values = torch.cat([memory_v, v[0, :, :1]], dim=1)
    weights = torch.softmax(q[0, :, :1] @ keys.transpose(-2, -1) / 2.0, dim=-1)  # sqrt(D) = 2
    torch.testing.assert_close(out[0, :, :1], weights @ values)


def test_dropout_autocast_and_other_dtypes_take_the_reference_path():
    inputs = projected_inputs(2, 2, 6, 4, 3, torch.float32, seed=3)
    assert memory_attention(*inputs, dropout_p=0.5).grad_fn.name() != "_SplitSoftmaxAttentionBackward"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert memory_attention(*inputs).grad_fn.name() != "_SplitSoftmaxAttentionBackward"
    half = [t.detach().bfloat16().requires_grad_() for t in inputs]
    out = memory_attention(*half)
    assert out.grad_fn.name() != "_SplitSoftmaxAttentionBackward"
    torch.testing.assert_close(out.float(), memory_attention_reference(*inputs), atol=5e-2, rtol=5e-2)


def test_model_with_attention_dropout_trains_through_the_reference_path():
    torch.manual_seed(0)
    model = QLLM(QLLMConfig(max_seq_len=16, d_model=16, n_layers=1, n_heads=2, n_global_tokens=3,
                            dropout=0.5)).train()
    x = torch.randint(0, 256, (2, 16))
    logits = model(x).logits
    logits.square().mean().backward()
    assert torch.isfinite(logits).all() and model.global_tokens.grad.abs().sum() > 0
    assert not torch.allclose(model(x).logits, logits)  # attention dropout is really applied


def test_docstring_example_runs():
    import doctest

    import qllm_model.attention

    result = doctest.testmod(qllm_model.attention)
    assert result.attempted >= 1 and result.failed == 0


def test_double_backward_is_refused_not_wrong():
    inputs = [t.detach().requires_grad_() for t in projected_inputs(1, 2, 4, 4, 2, torch.float64, seed=9)]
    out = memory_attention(*inputs)
    (grad_q,) = torch.autograd.grad(out.sum(), inputs[0], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        grad_q.sum().backward()
