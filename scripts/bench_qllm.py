"""Training throughput of QLLM vs a plain transformer of the same size, through the LightningModule.

"Plain" is the same code with the quantum-inspired parts switched off (phase_mode="off", no global memory
tokens): same width, depth, heads, MLP, embeddings and optimizer. Both train with ``QLLMLitModule`` under a
Lightning ``Trainer`` (forward, backward, gradient clipping, AdamW, LR schedule, the data loader) on Tiny
Shakespeare; their timed rounds alternate (A, B, A, B, ...) so a noisy machine slows both alike. A round is
``--warmup`` untimed steps then ``--steps`` timed ones; wall time and process CPU time are both recorded.
Tokens/s counts the real bytes of a batch (B x T), not the memory tokens, since those are overhead the model
pays for. The ratio reported is the median of per-round ratios (adjacent rounds share the machine's load).

    .venv/bin/python scripts/bench_qllm.py --threads 2                  # the tiny config's shape, CPU
    .venv/bin/python scripts/bench_qllm.py --quick                      # a few seconds: checks the script runs
    .venv/bin/python scripts/bench_qllm.py --threads 2 --breakdown      # + rotator-only and memory-only rows
    .venv/bin/python scripts/bench_qllm.py --d_model 768 --n_layers 12 --n_heads 12 --seq_len 256 --batch_size 16
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from qllm_model.config import QLLMConfig
from qllm_model.data import QLLMDataModule
from qllm_model.lit import QLLMLitModule

REPO_ROOT = Path(__file__).resolve().parents[1]  # scripts know the monorepo layout; the library does not
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d_model", type=int, default=128, help="model width (default: the tiny config's 128)")
    parser.add_argument("--n_layers", type=int, default=4, help="transformer blocks")
    parser.add_argument("--n_heads", type=int, default=4, help="attention heads")
    parser.add_argument("--seq_len", type=int, default=128, help="bytes per training window")
    parser.add_argument("--batch_size", type=int, default=32, help="windows per batch")
    parser.add_argument("--n_global_tokens", type=int, default=16, help="QLLM's memory tokens (plain: 0)")
    parser.add_argument("--phase_mode", choices=["gain", "rotation"], default="gain", help="QLLM's rotator")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per round")
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds per model (alternating)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of every round")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--accelerator", default="auto", help="Lightning accelerator: cpu, gpu or auto")
    parser.add_argument("--precision", default="32-true", help="Lightning precision, e.g. 32-true or bf16-mixed")
    parser.add_argument("--data_dir", default=str(DEFAULT_DATA), help="folder holding tinyshakespeare/input.txt")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time QLLM with only the rotator and with only the memory tokens (where the cost is)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes, 2 rounds of 2 steps: checks that the script runs (numbers meaningless)")
    parser.add_argument("--out", default="bench_results/bench_qllm.json", help="where to write the JSON result")
    args = parser.parse_args()
    if args.quick:
        args.d_model, args.n_layers, args.n_heads, args.seq_len, args.batch_size = 32, 1, 2, 32, 4
        args.steps, args.rounds, args.warmup = 2, 2, 1
    for name in ("steps", "rounds", "batch_size", "seq_len"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first step of a round includes the loader's start)")
    return args


class StepTimer(Callback):
    """Wall and process-CPU seconds of the training steps after the first ``skip`` of a fit."""

    def __init__(self, skip: int):
        self.skip = skip
        self.wall = self.cpu = 0.0
        self.steps = 0
        self._start: tuple[float, float] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.skip:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._start = (time.perf_counter(), time.process_time())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._start is not None and batch_idx >= self.skip:
            self.steps += 1

    def on_train_end(self, trainer, pl_module) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if self._start is not None:
            self.wall = time.perf_counter() - self._start[0]
            self.cpu = time.process_time() - self._start[1]


def timed_round(module: QLLMLitModule, datamodule: QLLMDataModule, args) -> StepTimer:
    timer = StepTimer(skip=args.warmup)
    trainer = L.Trainer(max_steps=args.warmup + args.steps, accelerator=args.accelerator, devices=1,
                        precision=args.precision, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, gradient_clip_val=1.0, callbacks=[timer])
    trainer.fit(module, datamodule=datamodule)
    return timer


def main() -> None:
    args = parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no per-round Trainer banners
    if args.threads:
        torch.set_num_threads(args.threads)
    L.seed_everything(0, verbose=False)
    datamodule = QLLMDataModule(corpus="tinyshakespeare", data_dir=args.data_dir, seq_len=args.seq_len,
                                batch_size=args.batch_size)
    shape = dict(d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads, max_seq_len=args.seq_len)
    variants = {
        "qllm": QLLMConfig(**shape, n_global_tokens=args.n_global_tokens, phase_mode=args.phase_mode),
        "plain": QLLMConfig(**shape, n_global_tokens=0, phase_mode="off", coherence_weight=0.0),
    }
    if args.breakdown:
        variants["rotator"] = QLLMConfig(**shape, n_global_tokens=0, phase_mode=args.phase_mode)
        variants["memory"] = QLLMConfig(**shape, n_global_tokens=args.n_global_tokens, phase_mode="off",
                                        coherence_weight=0.0)
    modules = {}
    for name, config in variants.items():
        torch.manual_seed(0)
        modules[name] = QLLMLitModule(config, lr=1e-3, warmup_steps=args.warmup)

    tokens_per_round = args.steps * args.batch_size * args.seq_len
    rounds: dict[str, list[dict]] = {name: [] for name in modules}
    for index in range(args.rounds):
        for name, module in modules.items():
            timer = timed_round(module, datamodule, args)
            rounds[name].append({"wall_s": timer.wall, "cpu_s": timer.cpu, "steps": timer.steps,
                                 "tokens_per_s": tokens_per_round / timer.wall,
                                 "tokens_per_cpu_s": tokens_per_round / timer.cpu})
        print(f"round {index + 1}/{args.rounds}: " + ", ".join(
            f"{name} {rounds[name][-1]['tokens_per_s']:,.0f} tokens/s" for name in modules), flush=True)
    def per_round_ratios(name: str, key: str) -> list[float]:
        return [r[key] / p[key] for r, p in zip(rounds[name], rounds["plain"])]

    ratios, cpu_ratios = per_round_ratios("qllm", "tokens_per_s"), per_round_ratios("qllm", "tokens_per_cpu_s")

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in rounds[name])

    result = {
        "args": vars(args),
        "params": {name: module.model.num_parameters() for name, module in modules.items()},
        "tokens_per_s_median": {name: median(name, "tokens_per_s") for name in modules},
        "tokens_per_cpu_s_median": {name: median(name, "tokens_per_cpu_s") for name in modules},
        "rounds": rounds,
        "ratio_qllm_over_plain_median": statistics.median(ratios),
        "ratio_rounds": ratios,
        "cpu_ratio_qllm_over_plain_median": statistics.median(cpu_ratios),
        "ratio_over_plain_median": {name: statistics.median(per_round_ratios(name, "tokens_per_s"))
                                    for name in modules},
        "target_ratio": 0.95,
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "lightning": L.__version__,
        "platform": platform.platform(),
    }
    print(f"\n{'model':<8}{'params':>12}{'tokens/s (median)':>20}{'tokens/CPU-s':>16}{'vs plain':>10}")
    for name in modules:
        print(f"{name:<8}{result['params'][name]:>12,}{result['tokens_per_s_median'][name]:>20,.0f}"
              f"{result['tokens_per_cpu_s_median'][name]:>16,.0f}{result['ratio_over_plain_median'][name]:>10.3f}")
    print(f"ratio qllm/plain, wall (median of per-round ratios): {result['ratio_qllm_over_plain_median']:.3f}, "
          f"CPU time: {result['cpu_ratio_qllm_over_plain_median']:.3f} (target >= 0.95; rounds: "
          f"{', '.join(f'{r:.2f}' for r in ratios)})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
