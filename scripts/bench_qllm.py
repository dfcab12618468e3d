"""Training throughput of QLLM vs a plain transformer of the same size, measured side by side.

"Plain" is the same code with the quantum-inspired parts switched off (phase_mode="off", no global memory
tokens): same width, depth, heads, MLP, embeddings and optimizer. Both models train (forward, backward, AdamW
step) on the same Tiny Shakespeare batches; their timed rounds alternate (A, B, A, B, ...) so a noisy or
shared CPU slows both alike. Tokens/s counts the real bytes of a batch (B x T), not the memory tokens, since
those are overhead the model pays for.

    python scripts/bench_qllm.py                      # tiny config, CPU
    python scripts/bench_qllm.py --d_model 768 --n_layers 12 --n_heads 12 --seq_len 256 --batch_size 16
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from qllm_model.config import QLLMConfig
from qllm_model.data import QLLMDataModule, default_data_dir
from qllm_model.lit import build_optimizer
from qllm_model.metrics import nll_and_count
from qllm_model.model import QLLM


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d_model", type=int, default=128)
    parser.add_argument("--n_layers", type=int, default=4)
    parser.add_argument("--n_heads", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--n_global_tokens", type=int, default=16)
    parser.add_argument("--phase_mode", choices=["gain", "rotation"], default="gain")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per timed round")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per model (alternating)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast")
    parser.add_argument("--data_dir", default=None, help="folder holding tinyshakespeare/input.txt")
    parser.add_argument("--out", default="bench_results/bench_qllm.json")
    args = parser.parse_args()
    for name in ("steps", "rounds", "batch_size", "seq_len"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dm = QLLMDataModule(corpus="tinyshakespeare", data_dir=args.data_dir or str(default_data_dir()),
                        seq_len=args.seq_len, batch_size=args.batch_size)
    loader = iter(dm.train_dataloader())
    batches = [tuple(t.to(device) for t in next(loader)) for _ in range(4)]

    shape = dict(d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads, max_seq_len=args.seq_len)
    variants = {
        "qllm": QLLMConfig(**shape, n_global_tokens=args.n_global_tokens, phase_mode=args.phase_mode),
        "plain": QLLMConfig(**shape, n_global_tokens=0, phase_mode="off", coherence_weight=0.0),
    }
    runners = {}
    for name, config in variants.items():
        torch.manual_seed(0)
        model = QLLM(config).to(device).train()
        runners[name] = (model, build_optimizer(model, 1e-3, 0.1), config)

    def train_steps(name: str, n: int) -> None:
        model, optimizer, config = runners[name]
        for i in range(n):
            x, y = batches[i % len(batches)]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                nll, count = nll_and_count(model(x).logits, y)
                loss = nll / count + config.coherence_weight * model.coherence_loss()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    for name in runners:
        train_steps(name, args.warmup)
    tokens_per_round = args.steps * args.batch_size * args.seq_len
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for _ in tqdm(range(args.rounds), desc="rounds"):
        for name in runners:
            start = time.perf_counter()
            train_steps(name, args.steps)
            rates[name].append(tokens_per_round / (time.perf_counter() - start))
    # Ratio per round (adjacent measurements share the machine's load), then the median over rounds.
    ratios = [q / p for q, p in zip(rates["qllm"], rates["plain"])]
    result = {
        "args": vars(args),
        "params": {name: runner[0].num_parameters() for name, runner in runners.items()},
        "tokens_per_s_median": {name: statistics.median(r) for name, r in rates.items()},
        "tokens_per_s_rounds": rates,
        "ratio_qllm_over_plain_median": statistics.median(ratios),
        "ratio_rounds": ratios,
        "target_ratio": 0.9,
        "device": str(device), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "platform": platform.platform(),
    }
    print(f"\n{'model':<8}{'params':>12}{'tokens/s (median)':>20}")
    for name in runners:
        print(f"{name:<8}{result['params'][name]:>12,}{result['tokens_per_s_median'][name]:>20,.0f}")
    print(f"ratio qllm/plain (median of per-round ratios): {result['ratio_qllm_over_plain_median']:.3f} "
          f"(target >= 0.9; rounds: {', '.join(f'{r:.2f}' for r in ratios)})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
