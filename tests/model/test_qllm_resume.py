"""Training you can kill and resume: the data order, the two checkpoint roles, every kind of stop, DDP on CPU.

The hard test really SIGKILLs a training subprocess (before and after the first validation), resumes it with
``--ckpt_path last`` and compares every step's batch hash, learning rate and loss with an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from qllm_model.callbacks import BestCheckpoint, ResumeCheckpoint
from qllm_model.cli import run_cli
from qllm_model.config import QLLMConfig
from qllm_model.data import QLLMDataModule, ResumableWindowSampler, WindowsAt
from qllm_model.lit import QLLMLitModule, warmup_cosine

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TINY = dict(max_seq_len=16, d_model=16, n_layers=1, n_heads=2, n_global_tokens=2)


@pytest.fixture()
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_bytes(("the quick brown fox jumps over the lazy dog; " * 24).encode())  # 1,080 bytes
    return path


# --- the data order --------------------------------------------------------------------------------------------
def test_order_depends_only_on_seed_and_batch_count():
    windows = WindowsAt(torch.arange(401) % 256, seq_len=10)  # 40 windows
    whole = ResumableWindowSampler(windows, batch_size=3, seed=5)  # 13 batches per epoch, the 40th window dropped
    stream = [list(whole) for _ in range(3)]
    assert [len(e) for e in stream] == [39, 39, 39] and stream[0] != stream[1]
    assert sorted(stream[0] + [o for o in range(0, 400, 10) if o not in stream[0]]) == list(range(0, 400, 10))
    flat = sum(stream, [])
    for start in (0, 4, 13, 20):  # mid-epoch, at an epoch boundary, in the second epoch
        resumed = ResumableWindowSampler(windows, batch_size=3, seed=5, start_batch=start)
        assert sum((list(resumed) for _ in range(3 - start // 13)), []) == flat[3 * start:]
    assert list(ResumableWindowSampler(windows, batch_size=3, seed=6)) != stream[0]


def test_ranks_take_disjoint_shards_and_random_offsets_fit():
    windows = WindowsAt(torch.arange(401) % 256, seq_len=10)
    shards = [list(ResumableWindowSampler(windows, 4, seed=1, num_replicas=2, rank=r)) for r in range(2)]
    assert not set(shards[0]) & set(shards[1]) and len(shards[0]) == len(shards[1]) == 20
    offsets = list(ResumableWindowSampler(windows, 4, seed=1, random_offsets=True))
    assert len(offsets) == 40 and all(0 <= o <= windows.max_offset for o in offsets)
    assert any(o % 10 for o in offsets)  # not aligned to the fixed windows
    assert offsets == list(ResumableWindowSampler(windows, 4, seed=1, random_offsets=True))
    x, y = windows[offsets[0]]
    assert x.shape == y.shape == (10,) and torch.equal(x[1:], y[:-1])
    with pytest.raises(ValueError, match="lower --data.batch_size"):
        ResumableWindowSampler(windows, batch_size=41)


# --- checkpoints and stops (in process) ---------------------------------------------------------------------------
class Interrupt(Callback):
    """Raise a signal in the middle of training, as a user or a cluster would."""

    def __init__(self, signum: int, at_step: int):
        self.signum, self.at_step = signum, at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            signal.raise_signal(self.signum)


def fit(tmp_path: Path, corpus: Path, callbacks=(), ckpt_path=None, **trainer_kwargs):
    torch.manual_seed(0)
    dm = QLLMDataModule(path=str(corpus), seq_len=16, batch_size=4, max_eval_bytes=160)
    module = QLLMLitModule(QLLMConfig(**TINY), warmup_steps=2)
    checkpoints = [ResumeCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=4),
                   BestCheckpoint(dirpath=str(tmp_path / "ckpt"))]
    options = dict(max_steps=12, val_check_interval=100, check_val_every_n_epoch=None)
    options.update(trainer_kwargs)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
                        callbacks=[*checkpoints, *callbacks], **options)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return trainer


def saved_step(path: Path) -> int:
    return torch.load(path, weights_only=True)["global_step"]


def test_checkpoints_before_any_validation_and_at_max_steps(tmp_path, corpus):
    fit(tmp_path, corpus, max_steps=6)  # validation every 100 steps: never runs
    assert saved_step(tmp_path / "ckpt" / "last.ckpt") == 6  # at step 4, then at the max_steps stop
    assert not list((tmp_path / "ckpt").glob("*.tmp"))


def test_ctrl_c_saves_and_stops_at_the_end_of_the_step(tmp_path, corpus):
    # The handler before the fit is Python's default in a terminal, SIG_IGN in a background job: either way it is
    # the one given back.
    before = signal.getsignal(signal.SIGINT)
    trainer = fit(tmp_path, corpus, callbacks=[Interrupt(signal.SIGINT, at_step=2)])
    assert trainer.global_step == 3 and saved_step(tmp_path / "ckpt" / "last.ckpt") == 3
    assert signal.getsignal(signal.SIGINT) is before  # handler given back


def test_sigterm_saves_and_stops(tmp_path, corpus):
    with pytest.raises(SystemExit):  # Lightning exits after a SIGTERM; the checkpoint is written first
        fit(tmp_path, corpus, callbacks=[Interrupt(signal.SIGTERM, at_step=5)])
    assert saved_step(tmp_path / "ckpt" / "last.ckpt") == 6


class SlowStep(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 1:
            time.sleep(1.1)  # the second step takes the run past its one-second budget


def test_max_time_stop_validates_saves_and_ends_annealed(tmp_path, corpus):
    trainer = fit(tmp_path, corpus, callbacks=[SlowStep()], max_time={"seconds": 1}, max_steps=-1,
                  max_epochs=None)
    assert trainer.global_step == 2 and saved_step(tmp_path / "ckpt" / "last.ckpt") == 2
    assert "val/bpb" in trainer.callback_metrics  # the stop triggers a last validation
    assert trainer.lightning_module.time_fraction() == 1.0
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3 * 0.1)  # min_lr_ratio reached


def test_time_budget_schedule():
    assert warmup_cosine(50, 10, None, 0.1, time_fraction=0.5) == pytest.approx(0.55)
    assert warmup_cosine(50, 10, 1000, 0.1, time_fraction=1.0) == pytest.approx(0.1)
    assert warmup_cosine(5, 10, None, 0.1, time_fraction=0.9) == pytest.approx(0.6)  # warmup is in steps


def test_best_checkpoint_carries_its_own_score(tmp_path, corpus):
    trainer = fit(tmp_path, corpus, max_steps=9, val_check_interval=3)
    (best,) = (tmp_path / "ckpt").glob("best-*.ckpt")
    step, score = re.fullmatch(r"best-step(\d+)-bpb([\d.]+)\.ckpt", best.name).groups()
    dm = QLLMDataModule(path=str(corpus), seq_len=16, batch_size=4, max_eval_bytes=160)
    module = QLLMLitModule.load_from_checkpoint(best)
    rescored = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False).validate(
        module, datamodule=dm, verbose=False)[0]["val/bpb"]
    assert saved_step(best) == int(step) and float(score) == pytest.approx(rescored, abs=5e-5)
    assert trainer.checkpoint_callbacks[1].best_model_score.item() == pytest.approx(rescored, abs=1e-6)


# --- a real SIGKILL, then exact resume ------------------------------------------------------------------------------
def cli_args(corpus: Path, tmp_path: Path, record: Path, steps: int = 30, delay: float = 0.0) -> list[str]:
    recorder = json.dumps([{"class_path": "step_recorder.StepRecorder",
                            "init_args": {"path": str(record), "delay": delay}}])
    return ["fit", "--config", str(REPO / "configs" / "tiny.yaml"), "--data.path", str(corpus),
            "--data.corpus", "null", "--data.seq_len", "16", "--data.batch_size", "4", "--data.max_eval_bytes", "160",
            "--model.config.max_seq_len", "16", "--model.config.d_model", "16", "--model.config.n_layers", "1",
            "--model.config.n_heads", "2", "--model.config.n_global_tokens", "2", "--model.warmup_steps", "3",
            "--checkpoint.dirpath", str(tmp_path / "ckpt"), "--checkpoint.every_n_train_steps", "5",
            "--trainer.val_check_interval", "10", "--trainer.max_steps", str(steps), "--trainer.max_time", "null",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "tb"), "--trainer.callbacks", recorder,
            "--progress.every_n_steps", "100", "--trainer.default_root_dir", str(tmp_path)]


def subprocess_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get(
        "PYTHONPATH", "")]))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def run_until(args: list[str], record: Path, stop_after_step: int, signum: int) -> list[dict]:
    """Start a training subprocess and send it ``signum`` once it has finished ``stop_after_step``."""
    process = subprocess.Popen([sys.executable, "-m", "qllm_model.cli", *args], env=subprocess_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        records = read_records(record)
        if records and records[-1]["step"] >= stop_after_step:
            process.send_signal(signum)
            break
        time.sleep(0.05)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode != 0, f"the run finished before it was interrupted:\n{stderr[-2000:]}"
    return read_records(record)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_exact(tmp_path, corpus):
    # The uninterrupted run (in this process: one thread, like the subprocesses).
    reference_log = tmp_path / "reference.jsonl"
    run_cli(cli_args(corpus, tmp_path / "ref", reference_log))
    reference = {r["step"]: r for r in read_records(reference_log)}
    assert sorted(reference) == list(range(1, 31))

    record = tmp_path / "interrupted.jsonl"
    args = cli_args(corpus, tmp_path / "run", record, delay=0.1)  # slow steps: the kills land where intended
    last = tmp_path / "run" / "ckpt" / "last.ckpt"
    # 1) SIGKILL after step 7: before the first validation (step 10) and mid-epoch (16 batches per epoch).
    killed = run_until(args, record, 7, signal.SIGKILL)
    resumed_from = saved_step(last)
    assert resumed_from == 5 and killed[-1]["step"] < 10  # killed before the first validation
    assert killed[-1]["step"] - resumed_from <= 5  # at most one checkpoint interval lost
    # 2) resume, then SIGKILL after step 17: after the first validation, in the second epoch.
    killed_again = run_until([*args, "--ckpt_path", "last"], record, 17, signal.SIGKILL)
    second = [r for r in killed_again[len(killed):]]
    assert second[0]["step"] == resumed_from + 1
    resumed_again = saved_step(last)
    assert resumed_again == 15 and 17 <= second[-1]["step"] < 20 and second[-1]["step"] - resumed_again <= 5
    # 3) resume to the end.
    done = subprocess.run([sys.executable, "-m", "qllm_model.cli", *args, "--ckpt_path", "last"],
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    third = read_records(record)[len(killed_again):]
    assert third[0]["step"] == resumed_again + 1 and third[-1]["step"] == 30
    for r in read_records(record):  # every step any run did equals the uninterrupted run's step
        expected = reference[r["step"]]
        assert (r["batch"], r["lr"], r["loss"]) == (expected["batch"], expected["lr"], expected["loss"]), r["step"]
    final = torch.load(last, weights_only=True)["state_dict"]
    reference_final = torch.load(tmp_path / "ref" / "ckpt" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(final[k], reference_final[k]) for k in reference_final)


# --- DDP on CPU (gloo) ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_two_processes_train_resume_and_score_like_one(tmp_path, corpus):
    from qllm_model.curves import read_scalars

    record = tmp_path / "ddp.jsonl"
    args = [*cli_args(corpus, tmp_path, record, steps=4), "--trainer.strategy", "ddp", "--trainer.devices", "2",
            "--trainer.accelerator", "cpu", "--trainer.val_check_interval", "3", "--data.eval_batch_size", "1"]
    for steps, extra in ((4, []), (6, ["--ckpt_path", "last"])):
        run = subprocess.run([sys.executable, "-m", "qllm_model.cli", *args, "--trainer.max_steps", str(steps), *extra],
                             env=subprocess_env(), capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
    records = read_records(record)
    assert sorted((r["rank"], r["step"]) for r in records) == [(rank, s) for rank in (0, 1) for s in range(1, 7)]
    by_rank = {rank: {r["batch"] for r in records if r["rank"] == rank} for rank in (0, 1)}
    assert not by_rank[0] & by_rank[1]  # the ranks train on different windows
    last = tmp_path / "ckpt" / "last.ckpt"
    assert saved_step(last) == 6
    ddp_val = read_scalars(tmp_path / "tb" / "tiny" / "fit", tags=("val/bpb",))["val/bpb"]
    assert [p["step"] for p in ddp_val] == [3, 6]
    # The same checkpoint scored by one process: the sums make the value exact, not a mean of per-rank means.
    dm = QLLMDataModule(path=str(corpus), seq_len=16, batch_size=4, eval_batch_size=1, max_eval_bytes=160)
    single = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False).validate(
        QLLMLitModule.load_from_checkpoint(last), datamodule=dm, verbose=False)[0]["val/bpb"]
    assert torch.tensor(single, dtype=torch.float32).item() == ddp_val[-1]["value"]
