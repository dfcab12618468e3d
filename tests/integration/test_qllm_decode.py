"""QLLM decoded with any qllm_samplers sampler through its own CLI (`qllm generate`, `qllm predict`)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from qllm_model.callbacks import ResumeCheckpoint
from qllm_model.cli import run_cli
from qllm_model.config import QLLMConfig
from qllm_model.data import QLLMDataModule
from qllm_model.lit import QLLMLitModule, load_model
from qllm_model.tokenizer import ByteTokenizer
from qllm_samplers.generate import generate
from qllm_samplers.specs import parse_sampler

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("qllm_decode")
    corpus = folder / "corpus.txt"
    corpus.write_bytes(b"to be or not to be, that is the question. " * 30)
    torch.manual_seed(0)
    dm = QLLMDataModule(path=str(corpus), seq_len=32, batch_size=4, max_eval_bytes=64)
    module = QLLMLitModule(QLLMConfig(max_seq_len=32, d_model=32, n_layers=2, n_heads=4, n_global_tokens=4))
    trainer = L.Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[ResumeCheckpoint(dirpath=str(folder), every_n_train_steps=2)])
    trainer.fit(module, datamodule=dm)
    return folder / "last.ckpt"


def expected_text(checkpoint: Path, spec: str, prompt: str, n: int, seed: int = 0) -> str:
    model = load_model(checkpoint)
    ids, mask = ByteTokenizer().batch_encode([prompt])
    out = generate(model, ids, sampler=parse_sampler(spec).build(), max_new_tokens=n, attention_mask=mask,
                   eos_token_id=ByteTokenizer.eos_token_id, generator=[seed])
    return ByteTokenizer().decode(out.new_tokens[0, :int(out.lengths[0])])


@pytest.mark.parametrize("spec", ["power:alpha=2:steps=2:blocks=2", "entropix", "temp:0.7:top_p=0.9"])
def test_generate_decodes_with_any_sampler_spec(checkpoint, spec, capsys):
    run_cli(["generate", "--ckpt", str(checkpoint), "--prompt", "to be", "--sampler", spec,
             "--max_new_tokens", "8", "--seed", "3"])
    printed = capsys.readouterr().out
    assert f"=== 'to be' ({parse_sampler(spec).canonical})" in printed
    assert "to be" + expected_text(checkpoint, spec, "to be", 8, seed=3) in printed


def test_generate_rejects_bad_specs_and_budgets(checkpoint, capsys):
    with pytest.raises(SystemExit):
        run_cli(["generate", "--ckpt", str(checkpoint), "--prompt", "to be", "--sampler", "nucleus:0.9"])
    assert "unknown sampler 'nucleus'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli(["generate", "--ckpt", str(checkpoint), "--prompt", "to be", "--max_new_tokens", "28"])
    assert "--max_new_tokens=28 does not fit" in capsys.readouterr().err  # 5 + 28 > 32


def test_predict_decodes_with_a_sequence_sampler(checkpoint, tmp_path):
    spec = "power:alpha=2:steps=1:blocks=2"
    cli = run_cli(["predict", "--config", str(REPO / "configs" / "tiny.yaml"), "--ckpt_path", str(checkpoint),
                   "--trainer.logger", "false", "--trainer.callbacks", "[]",
                   "--checkpoint.dirpath", str(tmp_path), "--trainer.default_root_dir", str(tmp_path),
                   "--data.predict_prompts", '["to be", "or not"]',
                   "--data.predict_sampler", spec, "--data.predict_max_new_tokens", "6", "--data.predict_seed", "4"])
    texts = cli.trainer.predict_loop.predictions[0]
    assert texts[1] == expected_text(checkpoint, spec, "or not", 6, seed=5)  # prompt i uses seed + i
    with pytest.raises(ValueError, match="--data.predict_sampler: unknown sampler"):
        QLLMDataModule(predict_sampler="nope")
