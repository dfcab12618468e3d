"""PowerSampler on the QLLM byte model (its cache goes through the generic re-prefill compaction)."""

import pytest
import torch

from qllm_samplers.power import PowerSampler
from qllm_samplers.smc import PowerSMC
from qllm_samplers.testing import rescored_log_prob


def test_runs_on_tiny_qllm():
    qllm_model = pytest.importorskip("qllm_model")
    torch.manual_seed(0)
    config = qllm_model.QLLMConfig(max_seq_len=64, d_model=32, n_layers=2, n_heads=2, n_global_tokens=4)
    model = qllm_model.QLLM(config).eval()
    prompts = torch.tensor([[0, 0, 72, 105], [65, 66, 67, 68]])
    mask = (prompts != 0).long()
    eos = qllm_model.ByteTokenizer.eos_token_id
    out = PowerSampler(alpha=2.0, mcmc_steps=4, num_blocks=2).generate(
        model, prompts, 16, attention_mask=mask, eos_token_id=eos, generator=[0, 1])
    assert out.stats["compactions"] >= 1  # QLLM's cache goes through the generic re-prefill path
    torch.testing.assert_close(out.log_p, rescored_log_prob(model, out), atol=2e-4, rtol=0)
    assert int(out.stats["proposed"].sum()) == 2 * 2 * 4


@pytest.mark.parametrize("make", [
    lambda: PowerSMC(alpha=2.0, particles=3, ess_threshold=1.0),
    lambda: PowerSampler(alpha=2.0, mcmc_steps=3, num_blocks=2, proposals=3),
], ids=["smc", "multiple-try"])
def test_lane_copies_on_tiny_qllm(make):
    """PowerSMC's resampling and multiple-try MH's lane copies reorder QLLM's cache rows (memory tokens included)."""
    qllm_model = pytest.importorskip("qllm_model")
    torch.manual_seed(0)
    config = qllm_model.QLLMConfig(max_seq_len=64, d_model=32, n_layers=2, n_heads=2, n_global_tokens=4)
    model = qllm_model.QLLM(config).eval()
    prompts = torch.tensor([[0, 0, 72, 105], [65, 66, 67, 68]])
    out = make().generate(model, prompts, 12, attention_mask=(prompts != 0).long(),
                          eos_token_id=qllm_model.ByteTokenizer.eos_token_id, generator=[0, 1])
    torch.testing.assert_close(out.log_p, rescored_log_prob(model, out), atol=2e-4, rtol=0)
