"""Ablation of QLLM's quantum-inspired parts: PhaseRotator off / gain / rotation x global memory tokens 0 / 16
(x fixed / random-offset training windows), trained through the LightningModule.

Every variant trains the same small model with ``QLLMLitModule`` under a Lightning ``Trainer`` for the same number
of steps on Tiny Shakespeare (per seed: the same init seed and the same data order, ``QLLMDataModule(seed=...)``),
then ``Trainer.validate`` scores it in bits per byte on the start of the validation split. The table shows mean
+- std over seeds and the paired difference from the plain transformer (phase off, 0 memory tokens) of the same
seed and windows. Results are appended to the JSON after every run.

    .venv/bin/python scripts/ablate_qllm.py                              # defaults: minutes on 1-2 CPU cores
    .venv/bin/python scripts/ablate_qllm.py --quick                      # seconds: checks that the script runs
    .venv/bin/python scripts/ablate_qllm.py --phase_modes gain --global_tokens 16 --windows fixed random
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import lightning as L
import torch

from qllm_model.config import QLLMConfig
from qllm_model.data import QLLMDataModule
from qllm_model.lit import QLLMLitModule

REPO_ROOT = Path(__file__).resolve().parents[1]  # scripts know the monorepo layout; the library does not
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="init and data-order seeds")
    parser.add_argument("--phase_modes", nargs="+", default=["off", "gain", "rotation"],
                        choices=["off", "gain", "rotation"], help="PhaseRotator variants")
    parser.add_argument("--global_tokens", type=int, nargs="+", default=[0, 16], help="memory token counts")
    parser.add_argument("--windows", nargs="+", default=["fixed"], choices=["fixed", "random"],
                        help="training windows: fixed (non-overlapping, shuffled) and/or random byte offsets")
    parser.add_argument("--d_model", type=int, default=64, help="model width")
    parser.add_argument("--n_layers", type=int, default=2, help="transformer blocks")
    parser.add_argument("--n_heads", type=int, default=4, help="attention heads")
    parser.add_argument("--seq_len", type=int, default=64, help="bytes per window")
    parser.add_argument("--batch_size", type=int, default=8, help="windows per batch")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW)")
    parser.add_argument("--warmup", type=int, default=30, help="linear warmup steps, then cosine to 0.1 x lr")
    parser.add_argument("--coherence_weight", type=float, default=0.05, help="coherence loss weight (rotator on)")
    parser.add_argument("--eval_bytes", type=int, default=60_000, help="score the first N bytes of val")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--data_dir", default=str(DEFAULT_DATA), help="folder holding tinyshakespeare/input.txt")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes and 3 steps per run: checks that the script runs (numbers meaningless)")
    parser.add_argument("--out", default="bench_results/ablate_qllm.json", help="JSON results")
    parser.add_argument("--plot", default="bench_results/ablate_qllm.png", help="bar chart PNG")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.d_model, args.n_layers, args.seq_len, args.batch_size, args.eval_bytes = 3, 16, 1, 16, 4, 2000
    if args.steps < 1 or args.eval_bytes < 2:
        parser.error("--steps must be >= 1 and --eval_bytes >= 2")
    return args


def train_and_score(config: QLLMConfig, seed: int, windows: str, args) -> dict:
    datamodule = QLLMDataModule(corpus="tinyshakespeare", data_dir=args.data_dir, seq_len=args.seq_len,
                                batch_size=args.batch_size, eval_batch_size=64, max_eval_bytes=args.eval_bytes,
                                seed=seed, random_offsets=windows == "random")
    L.seed_everything(seed, verbose=False)
    module = QLLMLitModule(config, lr=args.lr, warmup_steps=args.warmup, min_lr_ratio=0.1, weight_decay=0.1)
    trainer = L.Trainer(max_steps=args.steps, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, gradient_clip_val=1.0)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    train_seconds = time.perf_counter() - start
    scored = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                       enable_model_summary=False).validate(module, datamodule=datamodule, verbose=False)[0]
    return {"val_bpb": scored["val/bpb"], "train_loss_last": float(trainer.callback_metrics["train/loss"]),
            "train_seconds": train_seconds}


def main() -> None:
    args = parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no per-run Trainer banners
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [(w, p, g) for w in args.windows for p in args.phase_modes for g in args.global_tokens]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"args": vars(args), "runs": []}
    jobs = [(w, p, g, s) for s in args.seeds for w, p, g in variants]
    for index, (windows, phase, n_global, seed) in enumerate(jobs):
        config = QLLMConfig(d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                            max_seq_len=args.seq_len, n_global_tokens=n_global, phase_mode=phase,
                            coherence_weight=args.coherence_weight if phase != "off" else 0.0)
        result = train_and_score(config, seed, windows, args)
        record["runs"].append({"windows": windows, "phase_mode": phase, "n_global_tokens": n_global, "seed": seed,
                               **result})
        out.write_text(json.dumps(record, indent=2))  # after every run: nothing lost if killed
        print(f"run {index + 1}/{len(jobs)}: windows={windows} phase={phase} global={n_global} seed={seed}: "
              f"val bpb {result['val_bpb']:.4f} ({result['train_seconds']:.0f} s)", flush=True)

    by_seed = {(r["windows"], r["phase_mode"], r["n_global_tokens"], r["seed"]): r["val_bpb"] for r in record["runs"]}
    summary = []
    print(f"\nval bits per byte after {args.steps} steps (first {args.eval_bytes:,} val bytes), seeds {args.seeds}")
    print(f"{'windows':<8}{'phase':<10}{'global':>7}{'bpb mean':>10}{'std':>8}{'vs plain (paired)':>20}")
    for windows, phase, n_global in variants:
        values = [by_seed[(windows, phase, n_global, s)] for s in args.seeds]
        row = {"windows": windows, "phase_mode": phase, "n_global_tokens": n_global,
               "val_bpb_mean": statistics.mean(values),
               "val_bpb_std": statistics.stdev(values) if len(values) > 1 else 0.0, "val_bpb": values}
        if "off" in args.phase_modes and 0 in args.global_tokens:
            diffs = [by_seed[(windows, phase, n_global, s)] - by_seed[(windows, "off", 0, s)] for s in args.seeds]
            row["diff_vs_plain_mean"] = statistics.mean(diffs)
            row["diff_vs_plain"] = diffs
        summary.append(row)
        diff = f"{row['diff_vs_plain_mean']:+.4f}" if "diff_vs_plain_mean" in row else "n/a"
        print(f"{windows:<8}{phase:<10}{n_global:>7}{row['val_bpb_mean']:>10.4f}{row['val_bpb_std']:>8.4f}"
              f"{diff:>20}")
    record["summary"] = summary
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(7, len(summary)), 3.5))
    labels = [f"{r['phase_mode']}\n{r['n_global_tokens']} mem\n{r['windows']}" for r in summary]
    ax.bar(labels, [r["val_bpb_mean"] for r in summary], yerr=[r["val_bpb_std"] for r in summary], capsize=4)
    for i, r in enumerate(summary):
        ax.scatter([i] * len(r["val_bpb"]), r["val_bpb"], color="black", s=8, zorder=3)
    low = min(min(r["val_bpb"]) for r in summary)
    high = max(max(r["val_bpb"]) for r in summary)
    ax.set_ylim(low - 0.05, high + 0.05)
    ax.set_ylabel("val bits per byte")
    ax.set_title(f"QLLM ablation: {args.steps} steps, d{args.d_model} L{args.n_layers}, seeds {args.seeds}")
    fig.tight_layout()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=120)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
