"""QLLM training stack: data module, bits-per-byte metric, optimizer groups, resume, checkpoints, CLI."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from qllm_evals.metrics.bpb import BitsPerByte, nll_and_count
from qllm_model import data as qdata
from qllm_model.cli import run_cli
from qllm_model.config import QLLMConfig
from qllm_model.data import IGNORE_INDEX, ByteWindows, QLLMDataModule, UnpaddedDistributedSampler
from qllm_model.lit import QLLMLitModule, load_model, warmup_cosine
from qllm_model.model import QLLM

REPO = Path(__file__).resolve().parents[2]
TINY = dict(max_seq_len=32, d_model=32, n_layers=2, n_heads=4, n_global_tokens=4)


@pytest.fixture()
def corpus(tmp_path) -> Path:
    # Non-UTF-8 bytes are bytes like any other.
    text = bytes(range(256)) + b"\xff\xfe\x80" + ("the quick brown fox jumps over the lazy dog. " * 60).encode()
    path = tmp_path / "corpus.txt"
    path.write_bytes(text)
    return path


def make_trainer(tmp_path: Path, max_steps: int, callbacks=(), **kwargs) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
                     callbacks=list(callbacks), **kwargs)


# --- data ------------------------------------------------------------------------------------------------
def test_tinyshakespeare_split_is_nanogpt_90_10(shared_data):
    dm = QLLMDataModule(corpus="tinyshakespeare", data_dir=str(shared_data), seq_len=64, batch_size=4)
    dm.setup("fit")
    raw = (shared_data / "tinyshakespeare" / "input.txt").read_bytes()
    n_val = int(len(raw) * 0.1)
    assert dm.splits["train"].numel() == len(raw) - n_val == 1_003_855
    assert bytes(dm.splits["val"].to(torch.uint8).tolist()) == raw[len(raw) - n_val:]
    assert dm.splits["test"] is dm.splits["val"]  # nanoGPT's protocol has no separate test split
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (4, 64)
    torch.testing.assert_close(x[:, 1:], y[:, :-1])


def test_eval_windows_score_every_byte_once(corpus):
    tokens = qdata.bytes_to_tokens(corpus.read_bytes())
    windows = ByteWindows(tokens, seq_len=50, pad_tail=True)
    targets = torch.cat([windows[i][1] for i in range(len(windows))])
    kept = targets[targets != IGNORE_INDEX]
    torch.testing.assert_close(kept, tokens[1:].long())
    assert (kept == 0xFF).any() and (kept == 0xFE).any()


def test_local_directory_and_test_fraction(tmp_path):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_bytes(b"A" * 600)
    (folder / "sub" / "b.bin").write_bytes(b"\x00\x9f" * 200)
    (folder / ".hidden").write_bytes(b"skip me")
    dm = QLLMDataModule(path=str(folder), seq_len=16, val_fraction=0.1, test_fraction=0.1)
    dm.setup("fit")
    assert [dm.splits[s].numel() for s in ("train", "val", "test")] == [800, 100, 100]
    assert dm.splits["test"][-1].item() == 0x9F


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(), ValueError, "--data.path FILE_OR_DIR"),
    (dict(path="/nonexistent/corpus.txt"), FileNotFoundError, "--data.path"),
    (dict(corpus="tinyshakespeare", data_dir="/nonexistent"), FileNotFoundError, "--data.data_dir"),
])
def test_missing_corpus_errors_name_the_flag(kwargs, error, match):
    with pytest.raises(error, match=match):
        QLLMDataModule(**kwargs).setup("fit")


def test_bad_data_arguments(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        QLLMDataModule(path=str(empty)).setup("fit")
    with pytest.raises(ValueError, match="--data.seq_len must be >= 1"):
        QLLMDataModule(path=str(empty), seq_len=0)
    with pytest.raises(ValueError, match="--data.corpus must be one of"):
        QLLMDataModule(corpus="shakespeare")
    short = tmp_path / "short.txt"
    short.write_bytes(b"x" * 40)
    with pytest.raises(ValueError, match="lower --data.seq_len"):
        QLLMDataModule(path=str(short), seq_len=64).train_dataloader()


def test_wikitext2_offline_uses_local_eval_files_and_refuses_fit(shared_data):
    dm = QLLMDataModule(corpus="wikitext2", data_dir=str(shared_data), seq_len=64)  # offline is the default
    with pytest.raises(ValueError, match="train split is not available offline"):
        dm.setup("fit")
    dm.setup("test")
    assert dm.splits["val"].numel() == 1_121_681 and dm.splits["test"].numel() == 1_256_449


def test_offline_is_a_setting_and_the_data_folder_is_explicit(tmp_path, monkeypatch):
    monkeypatch.delenv(qdata.DATA_DIR_ENV, raising=False)
    with pytest.raises(ValueError, match="pass --data.data_dir DIR or set QLLM_SHARED_DATA"):
        QLLMDataModule(corpus="tinyshakespeare").setup("fit")
    with pytest.raises(FileNotFoundError, match="--data.online true"):
        QLLMDataModule(corpus="wikitext2", data_dir=str(tmp_path)).setup("test")
    with pytest.raises(ValueError, match="pass --data.online true, or --data.hf_data_files"):
        QLLMDataModule(hf_dataset="roneneldan/TinyStories").setup("fit")  # fails at once: no network touched
    (tmp_path / "tinyshakespeare").mkdir()
    (tmp_path / "tinyshakespeare" / "input.txt").write_bytes(b"to be or not to be " * 20)
    monkeypatch.setenv(qdata.DATA_DIR_ENV, str(tmp_path))
    dm = QLLMDataModule(corpus="tinyshakespeare", seq_len=8)
    dm.setup("fit")
    assert dm.data_dir == tmp_path and dm.splits["train"].numel() == 342


@pytest.mark.parametrize("streaming", [False, True])
def test_hf_dataset_by_name_and_column(tmp_path, streaming):
    lines = tmp_path / "lines.txt"
    lines.write_text("".join(f"line {i} of a small local text dataset\n" for i in range(300)))
    dm = QLLMDataModule(hf_dataset="text", hf_data_files=str(lines), text_column="text", streaming=streaming,
                        seq_len=16, batch_size=2, max_eval_bytes=500)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 16) and dm.splits["val"].numel() == 500
    assert (dm.splits["val"] == 256).any()  # documents separated by EOS
    if not streaming:
        assert dm.splits["train"].numel() > 9 * dm.splits["val"].numel() > 0


# --- metric ----------------------------------------------------------------------------------------------
def test_bits_per_byte_is_exact_over_shards():
    torch.manual_seed(9)
    logits = torch.randn(6, 10, 257)
    targets = torch.randint(0, 256, (6, 10))
    targets[5, 4:] = IGNORE_INDEX  # an uneven, padded last batch
    full = BitsPerByte()
    full.update(*nll_and_count(logits, targets))
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 257), targets.reshape(-1),
                                                 ignore_index=IGNORE_INDEX) / math.log(2)
    assert full.compute().item() == pytest.approx(expected.item(), rel=1e-6)
    ranks = [BitsPerByte(), BitsPerByte()]  # what DDP's sum-reduction of the states computes
    ranks[0].update(*nll_and_count(logits[:2], targets[:2]))
    ranks[1].update(*nll_and_count(logits[2:], targets[2:]))
    mean_of_means = (nll_and_count(logits[:2], targets[:2])[0] / 20
                     + nll_and_count(logits[2:], targets[2:])[0] / 34) / 2 / math.log(2)
    ranks[0].merge_state(ranks[1])
    assert ranks[0].compute().item() == pytest.approx(expected.item(), rel=1e-6)
    assert mean_of_means.item() != pytest.approx(expected.item(), rel=1e-4)  # why sums are kept
    with pytest.raises(ValueError, match="no bytes"):
        BitsPerByte().compute()


def test_unpadded_sampler_covers_each_window_once():
    dataset = list(range(10))
    shards = [list(UnpaddedDistributedSampler(dataset, num_replicas=3, rank=r)) for r in range(3)]
    assert sorted(sum(shards, [])) == dataset
    assert [len(UnpaddedDistributedSampler(dataset, num_replicas=3, rank=r)) for r in range(3)] == [4, 3, 3]


# --- optimisation ----------------------------------------------------------------------------------------
def test_weight_decay_on_matrices_only_and_schedule(tmp_path):
    module = QLLMLitModule(QLLMConfig(**TINY, bias=True), warmup_steps=10, min_lr_ratio=0.1)
    module.trainer = make_trainer(tmp_path, max_steps=100)
    conf = module.configure_optimizers()
    decay, no_decay = conf["optimizer"].param_groups
    names = {id(p): n for n, p in module.model.named_parameters()}
    assert all(p.dim() == 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert {names[id(p)] for p in no_decay["params"]} >= {"global_tokens", "phase.phase", "ln_f.weight",
                                                          "ln_f.bias", "blocks.0.attn.c_attn.bias"}
    assert warmup_cosine(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_training_lowers_bits_per_byte(tmp_path, corpus):
    torch.manual_seed(10)
    dm = QLLMDataModule(path=str(corpus), seq_len=32, batch_size=8, max_eval_bytes=512)
    module = QLLMLitModule(QLLMConfig(**TINY), lr=3e-3, warmup_steps=5)
    trainer = make_trainer(tmp_path, max_steps=1)
    before = trainer.validate(module, datamodule=dm, verbose=False)[0]["val/bpb"]
    trainer = make_trainer(tmp_path, max_steps=40, val_check_interval=40, check_val_every_n_epoch=None)
    trainer.fit(module, datamodule=dm)
    after = trainer.callback_metrics["val/bpb"].item()
    assert before > 7.5 and after < 0.6 * before
    assert trainer.callback_metrics["val/ppl_per_byte"].item() == pytest.approx(2**after, rel=1e-5)


class RecordStart(Callback):
    def on_train_start(self, trainer, pl_module):
        optimizer = trainer.optimizers[0]
        self.step = trainer.global_step
        self.sched_epoch = trainer.lr_scheduler_configs[0].scheduler.last_epoch
        self.exp_avg = {i: optimizer.state[p]["exp_avg"].clone() for i, p in
                        enumerate(optimizer.param_groups[0]["params"]) if p in optimizer.state}


def test_resume_restores_step_optimizer_and_scheduler(tmp_path, corpus):
    ckpt_dir = tmp_path / "ckpt"

    def run(max_steps: int, ckpt_path=None):
        torch.manual_seed(11)
        dm = QLLMDataModule(path=str(corpus), seq_len=32, batch_size=4, max_eval_bytes=256)
        module = QLLMLitModule(QLLMConfig(**TINY), warmup_steps=3)
        record = RecordStart()
        checkpoint = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=2, save_top_k=-1)
        trainer = make_trainer(tmp_path, max_steps, [checkpoint, record], limit_val_batches=0)
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        return trainer, record

    # The epoch holds 11 batches: stopping at step 4 is a mid-epoch interruption.
    first, _ = run(4)
    saved = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 4
    second, record = run(8, ckpt_path="last")
    assert record.step == 4 and record.sched_epoch == 4
    saved_state = saved["optimizer_states"][0]["state"]
    assert record.exp_avg and all(torch.equal(record.exp_avg[i], saved_state[i]["exp_avg"]) for i in record.exp_avg)
    assert second.global_step == 8
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"] == 8


def test_checkpoint_loads_weights_only_and_load_model(tmp_path, corpus):
    dm = QLLMDataModule(path=str(corpus), seq_len=32, batch_size=4, max_eval_bytes=256)
    module = QLLMLitModule(QLLMConfig(**TINY, phase_mode="rotation"))
    trainer = make_trainer(tmp_path, max_steps=2, limit_val_batches=0,
                           callbacks=[ModelCheckpoint(dirpath=tmp_path / "c", save_last=True)])
    trainer.fit(module, datamodule=dm)
    state = torch.load(tmp_path / "c" / "last.ckpt", weights_only=True)
    assert state["hyper_parameters"]["config"]["phase_mode"] == "rotation"
    model = load_model(tmp_path / "c" / "last.ckpt")
    x = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(model(x).logits, module.model.eval()(x).logits)
    reloaded = QLLMLitModule.load_from_checkpoint(tmp_path / "c" / "last.ckpt")
    assert reloaded.config == module.config


def test_lora_fine_tune_starts_from_checkpoint(tmp_path, corpus):
    base = QLLMLitModule(QLLMConfig(**TINY))
    torch.save({"state_dict": base.state_dict()}, tmp_path / "base.ckpt")
    tuned = QLLMLitModule(QLLMConfig(**TINY, lora_r=4, lora_alpha=8.0), init_from=str(tmp_path / "base.ckpt"),
                          lora_only=True)
    x = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(tuned.model.eval()(x).logits, base.model.eval()(x).logits)
    trainable = [n for n, p in tuned.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with pytest.raises(ValueError, match="does not match the config"):
        QLLMLitModule(QLLMConfig(**{**TINY, "d_model": 64}), init_from=str(tmp_path / "base.ckpt"))


def test_seq_len_longer_than_position_table_raises(tmp_path, corpus):
    dm = QLLMDataModule(path=str(corpus), seq_len=64)
    with pytest.raises(ValueError, match="exceeds --model.config.max_seq_len"):
        make_trainer(tmp_path, max_steps=1).fit(QLLMLitModule(QLLMConfig(**TINY)), datamodule=dm)


# --- the `qllm` CLI --------------------------------------------------------------------------------------
def test_cli_fit_resume_and_test_with_tiny_config(tmp_path, corpus):
    common = ["--config", str(REPO / "configs" / "tiny.yaml"), "--data.path", str(corpus), "--data.corpus", "null",
              "--data.seq_len", "32", "--data.batch_size", "4", "--data.max_eval_bytes", "300",
              "--model.config.max_seq_len", "32", "--model.config.d_model", "32", "--model.config.n_layers", "1",
              "--checkpoint.dirpath", str(tmp_path / "ckpt"), "--checkpoint.every_n_train_steps", "2",
              "--trainer.logger.init_args.save_dir", str(tmp_path / "tb"), "--trainer.callbacks", "[]",
              "--trainer.val_check_interval", "3", "--trainer.enable_progress_bar", "false",
              "--trainer.default_root_dir", str(tmp_path)]
    cli = run_cli(["fit", *common, "--trainer.max_steps", "3"])
    assert cli.trainer.global_step == 3 and (tmp_path / "ckpt" / "last.ckpt").exists()
    assert "val/bpb" in cli.trainer.callback_metrics
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))  # TensorBoard curves
    cli = run_cli(["fit", *common, "--trainer.max_steps", "5", "--ckpt_path", "last"])
    assert cli.trainer.global_step == 5
    last = str(tmp_path / "ckpt" / "last.ckpt")
    cli = run_cli(["test", *common, "--ckpt_path", last])
    assert cli.trainer.callback_metrics["test/bpb"].item() > 0
    assert sorted(p.name for p in (tmp_path / "tb" / "tiny").iterdir()) == ["fit", "test"]  # one training run
    assert len(list((tmp_path / "tb" / "tiny" / "fit").glob("events.out.tfevents.*"))) == 2  # fit + resume
    cli = run_cli(["predict", *common, "--ckpt_path", last, "--data.predict_max_new_tokens", "6",
                   "--data.predict_sampler", "greedy", "--data.predict_prompts", '["the quick", "lazy"]'])
    texts = cli.trainer.predict_loop.predictions[0]
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    model = load_model(last)
    seq = list(b"lazy")
    for _ in range(6):
        seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert texts[1] == bytes(seq[4:]).decode("utf-8", errors="replace")
    with pytest.raises(ValueError, match="--data.predict_max_new_tokens=40 does not fit"):
        run_cli(["predict", *common, "--ckpt_path", last, "--data.predict_max_new_tokens", "40"])


def test_generate_and_plot_entries(tmp_path, corpus, capsys):
    dm = QLLMDataModule(path=str(corpus), seq_len=32, batch_size=4, max_eval_bytes=256)
    module = QLLMLitModule(QLLMConfig(**TINY))
    logger = L.pytorch.loggers.TensorBoardLogger(tmp_path, name="run", version="fit")
    trainer = L.Trainer(max_steps=4, logger=logger, log_every_n_steps=1, val_check_interval=2,
                        check_val_every_n_epoch=None, enable_progress_bar=False, num_sanity_val_steps=0,
                        callbacks=[ModelCheckpoint(dirpath=tmp_path / "c", save_last=True)])
    trainer.fit(module, datamodule=dm)
    run_cli(["generate", "--ckpt", str(tmp_path / "c" / "last.ckpt"), "--prompt", "the q", "--sampler", "greedy",
             "--max_new_tokens", "4"])
    printed = capsys.readouterr().out
    model = load_model(tmp_path / "c" / "last.ckpt")
    seq = list(b"the q")
    for _ in range(4):
        seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    from qllm_model.tokenizer import ByteTokenizer

    assert "the q" + ByteTokenizer().decode(seq[5:]) in printed
    run_cli(["plot", "--logdir", str(tmp_path / "run" / "fit"), "--out", str(tmp_path / "curve.png")])
    assert (tmp_path / "curve.png").stat().st_size > 1000
    assert "step      2  val bpb" in capsys.readouterr().out  # after 2 optimizer steps
    with pytest.raises(SystemExit):  # the parent folder is not a run: the error lists the runs under it
        run_cli(["plot", "--logdir", str(tmp_path / "run"), "--out", str(tmp_path / "x.png")])
    assert "runs under it: " + str(tmp_path / "run" / "fit") in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli(["generate", "--ckpt", str(tmp_path / "c" / "last.ckpt"), "--prompt", "the q", "--max_new_tokens",
                 "40"])
    assert "--max_new_tokens=40 does not fit" in capsys.readouterr().err
    run_cli(["--help"])
    overview = capsys.readouterr().out
    assert all(f"  {name} " in overview for name in ("fit", "validate", "test", "predict", "generate", "plot"))


@pytest.mark.parametrize("name", ["tiny.yaml", "qllm_768d.yaml", "tiny_lora.yaml"])
def test_shipped_configs_are_valid(name):
    import yaml

    values = yaml.safe_load((REPO / "configs" / name).read_text())
    config = QLLMConfig(**values["model"]["config"])
    assert config.max_seq_len == values["data"]["seq_len"]
    QLLMDataModule(**values["data"])  # argument validation only; no corpus is read
    if name == "qllm_768d.yaml":
        assert (config.d_model, config.n_layers, config.n_heads, config.n_global_tokens) == (768, 12, 12, 16)
        if not torch.cuda.is_available():  # fails early, naming the flags that run it on a CPU
            with pytest.raises(SystemExit, match="--trainer.accelerator cpu"):
                run_cli(["fit", "--config", str(REPO / "configs" / name)])
        with torch.device("meta"):  # shapes only: no 85M-parameter allocation
            assert QLLM(config).num_parameters() > 80e6
    if name == "tiny_lora.yaml":
        assert (config.lora_r, config.lora_alpha) == (32, 64.0) and values["model"]["lora_only"]



def test_curve_of_one_run_across_resumes(tmp_path):
    import os

    from torch.utils.tensorboard import SummaryWriter

    from qllm_model.curves import read_scalars

    def write(steps, value, when):
        writer = SummaryWriter(str(tmp_path), filename_suffix=f".{when}")
        for step in steps:
            writer.add_scalar("train/bpb", value, step)
        writer.close()
        (file,) = [f for f in tmp_path.glob("events.out.tfevents.*") if f.name.endswith(f".{when}")]
        os.utime(file, (when, when))

    write(range(10, 60, 10), 5.0, 1_000)  # the run, killed after step 50
    write(range(40, 90, 10), 4.0, 2_000)  # resumed from its step-30 checkpoint: steps 40-50 replayed
    assert [(p["step"], p["value"]) for p in read_scalars(tmp_path)["train/bpb"]] == [
        (10, 5.0), (20, 5.0), (30, 5.0), (40, 4.0), (50, 4.0), (60, 4.0), (70, 4.0), (80, 4.0)]
    write(range(10, 30, 10), 3.0, 3_000)  # a new run started from scratch in the same folder
    assert [(p["step"], p["value"]) for p in read_scalars(tmp_path)["train/bpb"]] == [(10, 3.0), (20, 3.0)]
