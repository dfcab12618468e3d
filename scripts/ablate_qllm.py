"""Ablation of QLLM's quantum-inspired parts: PhaseRotator off / gain / rotation x global memory tokens 0 / 16.

Every variant trains the same small model for the same number of steps on the same Tiny Shakespeare batches
(per seed), then is scored in bits per byte on the start of the validation split. Seeds differ in init and
batch order; the table shows mean +- std over seeds and the paired difference from the plain transformer
(phase off, 0 memory tokens) of the same seed. Results are appended to the JSON after every run.

    python scripts/ablate_qllm.py                              # defaults: a few minutes on 1-2 CPU cores
    python scripts/ablate_qllm.py --steps 1000 --seeds 0 1 2 --d_model 128 --n_layers 4 --seq_len 128
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from qllm_model.config import QLLMConfig
from qllm_model.data import ByteWindows, QLLMDataModule, default_data_dir
from qllm_model.lit import build_optimizer, warmup_cosine
from qllm_model.metrics import BitsPerByte, nll_and_count
from qllm_model.model import QLLM


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--phase_modes", nargs="+", default=["off", "gain", "rotation"],
                        choices=["off", "gain", "rotation"])
    parser.add_argument("--global_tokens", type=int, nargs="+", default=[0, 16])
    parser.add_argument("--d_model", type=int, default=64)
    parser.add_argument("--n_layers", type=int, default=2)
    parser.add_argument("--n_heads", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--coherence_weight", type=float, default=0.05)
    parser.add_argument("--eval_bytes", type=int, default=60_000, help="score the first N bytes of val")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--data_dir", default=None, help="folder holding tinyshakespeare/input.txt")
    parser.add_argument("--out", default="bench_results/ablate_qllm.json")
    parser.add_argument("--plot", default="bench_results/ablate_qllm.png")
    args = parser.parse_args()
    if args.steps < 1 or args.eval_bytes < 2:
        parser.error("--steps must be >= 1 and --eval_bytes >= 2")
    return args


def train_and_score(config: QLLMConfig, seed: int, args, splits) -> dict:
    torch.manual_seed(seed)
    model = QLLM(config).train()
    optimizer = build_optimizer(model, args.lr, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, args.warmup, args.steps, 0.1))
    order = torch.Generator().manual_seed(seed)  # same batches for every variant of a seed
    loader = DataLoader(ByteWindows(splits["train"], args.seq_len, pad_tail=False), batch_size=args.batch_size,
                        shuffle=True, drop_last=True, generator=order)
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    start = time.perf_counter()
    for _, (x, y) in zip(range(args.steps), batches):
        nll, count = nll_and_count(model(x).logits, y)
        loss = nll / count + config.coherence_weight * model.coherence_loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
    train_seconds = time.perf_counter() - start
    model.eval()
    metric = BitsPerByte()
    with torch.no_grad():
        for x, y in DataLoader(ByteWindows(splits["val"][:args.eval_bytes], args.seq_len, pad_tail=True),
                               batch_size=64):
            metric.update(*nll_and_count(model(x).logits, y))
    return {"val_bpb": metric.compute().item(), "train_loss_last": loss.item(), "train_seconds": train_seconds}


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dm = QLLMDataModule(corpus="tinyshakespeare", data_dir=args.data_dir or str(default_data_dir()),
                        seq_len=args.seq_len)
    splits = dm.prepare_splits()
    variants = [(p, g) for p in args.phase_modes for g in args.global_tokens]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"args": vars(args), "runs": []}
    jobs = [(p, g, s) for s in args.seeds for p, g in variants]
    for phase, n_global, seed in tqdm(jobs, desc="ablation runs"):
        config = QLLMConfig(d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                            max_seq_len=args.seq_len, n_global_tokens=n_global, phase_mode=phase,
                            coherence_weight=args.coherence_weight if phase != "off" else 0.0)
        result = train_and_score(config, seed, args, splits)
        record["runs"].append({"phase_mode": phase, "n_global_tokens": n_global, "seed": seed, **result})
        out.write_text(json.dumps(record, indent=2))  # after every run: nothing lost if killed

    by_seed = {(r["phase_mode"], r["n_global_tokens"], r["seed"]): r["val_bpb"] for r in record["runs"]}
    baseline = ("off", 0)
    summary = []
    print(f"\nval bits per byte after {args.steps} steps (first {args.eval_bytes:,} val bytes), "
          f"seeds {args.seeds}")
    print(f"{'phase':<10}{'global':>7}{'bpb mean':>10}{'std':>8}{'vs plain (paired)':>20}")
    for phase, n_global in variants:
        values = [by_seed[(phase, n_global, s)] for s in args.seeds]
        row = {"phase_mode": phase, "n_global_tokens": n_global, "val_bpb_mean": statistics.mean(values),
               "val_bpb_std": statistics.stdev(values) if len(values) > 1 else 0.0, "val_bpb": values}
        if baseline[0] in args.phase_modes and baseline[1] in args.global_tokens:
            diffs = [by_seed[(phase, n_global, s)] - by_seed[(*baseline, s)] for s in args.seeds]
            row["diff_vs_plain_mean"] = statistics.mean(diffs)
            row["diff_vs_plain"] = diffs
        summary.append(row)
        diff = f"{row['diff_vs_plain_mean']:+.4f}" if "diff_vs_plain_mean" in row else "n/a"
        print(f"{phase:<10}{n_global:>7}{row['val_bpb_mean']:>10.4f}{row['val_bpb_std']:>8.4f}{diff:>20}")
    record["summary"] = summary
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [f"{r['phase_mode']}\n{r['n_global_tokens']} mem" for r in summary]
    ax.bar(labels, [r["val_bpb_mean"] for r in summary], yerr=[r["val_bpb_std"] for r in summary], capsize=4)
    for i, r in enumerate(summary):
        ax.scatter([i] * len(r["val_bpb"]), r["val_bpb"], color="black", s=8, zorder=3)
    low = min(min(r["val_bpb"]) for r in summary)
    high = max(max(r["val_bpb"]) for r in summary)
    ax.set_ylim(low - 0.05, high + 0.05)
    ax.set_ylabel("val bits per byte")
    ax.set_title(f"QLLM ablation: {args.steps} steps, d{args.d_model} L{args.n_layers}, seeds {args.seeds}")
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
