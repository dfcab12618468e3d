"""Benchmark PowerSampler against a faithful re-implementation of the official power-sampling loop.

The reference (``reference_power_sample`` below) is the loop of ``mcmc_power_samp`` in the official repository
(aakaran/reasoning-with-sampling, llm_experiments/power_samp_utils.py): one chain at a time, every proposal a fresh
HF ``generate`` call on the whole prefix, per-token log p / log q of the state kept in lists, and the chain stops
after the block in which its state reached EOS. Two deliberate changes so that both sides target the same law:
the proposal has full support (``top_k=0``; the official call inherited HF's default top_k=50) and the ratio
compares whole suffixes with the length term (the official code sliced unequal suffixes). Ours runs with
``stop_at_eos=True`` for the same schedule.

Measured in one run, interleaved, at equal alpha / MH steps / blocks: seconds per sample and per generated token,
forward tokens per output token and sequential model calls, at batch 1 and batch B (the reference has no batching:
B chains cost B times one). **Equal lengths** by default: EOS is disabled (also in the model's generation config,
which HF generate would otherwise read), so every sample has exactly ``--max-new-tokens`` tokens and the ratios
compare equal work. ``--eos`` restores stopping at EOS (then compare the per-token columns: lengths differ).

    .venv/bin/python scripts/bench_power.py                       # tiny model + SmolLM2-135M, a few minutes
    .venv/bin/python scripts/bench_power.py --models tiny --repeats 5
    .venv/bin/python scripts/bench_power.py --quick               # seconds: checks that it runs
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from qllm_samplers.power import PowerSampler

REPO_ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def _proposal(model, prefix: list[int], max_new: int, temperature: float, eos: int | None, pad: int):
    """One official-style proposal: HF generate from scratch on the whole prefix (full-support sampling)."""
    ids = torch.tensor([prefix])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                         do_sample=True, temperature=temperature, top_k=0, top_p=1.0, eos_token_id=eos,
                         pad_token_id=pad, return_dict_in_generate=True, output_scores=True, output_logits=True)
    tokens = out.sequences[0, len(prefix):]
    raw = torch.stack(out.logits, dim=0)[:, 0].float()
    scaled = torch.stack(out.scores, dim=0)[:, 0].float()
    if eos is not None and (tokens == eos).any():  # generate pads nothing at batch 1, but be safe
        tokens = tokens[: int((tokens == eos).nonzero()[0]) + 1]
    index = tokens[:, None]
    log_p = torch.log_softmax(raw[:len(tokens)], -1).gather(1, index).squeeze(1).tolist()
    log_q = torch.log_softmax(scaled[:len(tokens)], -1).gather(1, index).squeeze(1).tolist()
    forward = len(prefix) + len(tokens) - 1
    return tokens.tolist(), log_p, log_q, forward, len(tokens)  # generate runs one model call per new token


def reference_power_sample(model, prompt: list[int], *, alpha: float, mcmc_steps: int, max_new_tokens: int,
                           num_blocks: int, eos: int | None, pad: int, seed: int) -> dict:
    """The official mcmc_power_samp loop (batch 1), with the two corrections named in the module docstring."""
    random.seed(seed)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    c = len(prompt)
    gen, log_p, log_q = list(prompt), [], []
    block = max_new_tokens // num_blocks
    attempts = accepts = forward = calls = 0
    for _ in range(num_blocks):
        tokens, lp, lq, f, n_calls = _proposal(model, gen, block, 1 / alpha, eos, pad)
        forward, calls = forward + f, calls + n_calls
        gen, log_p, log_q = gen + tokens, log_p + lp, log_q + lq
        for _ in range(mcmc_steps):
            attempts += 1
            t = len(gen)
            idx = rng.randint(c, t - 1)
            tokens, lp, lq, f, n_calls = _proposal(model, gen[:idx], t - idx, 1 / alpha, eos, pad)
            forward, calls = forward + f, calls + n_calls
            cur = slice(idx - c, None)
            log_r = (alpha * (sum(lp) - sum(log_p[cur])) + sum(log_q[cur]) - sum(lq)
                     + math.log(t - c) - math.log(idx - c + len(tokens)))
            if rng.random() < math.exp(min(log_r, 0.0)):
                accepts += 1
                gen = gen[:idx] + tokens
                log_p, log_q = log_p[:idx - c] + lp, log_q[:idx - c] + lq
        if eos is not None and eos in gen[c:]:
            break
    return {"tokens": gen[c:], "log_p": math.fsum(log_p), "forward_tokens": forward, "accepts": accepts,
            "attempts": attempts, "model_calls": calls}


def _tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    prompt = torch.randint(3, 512, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    return model, prompt, 2


def _smollm2():
    from qllm_evals.models import chat_prompt_ids, load_causal_lm

    model, tokenizer = load_causal_lm("smollm2-135m-instruct")
    prompt = chat_prompt_ids(tokenizer, ["What is 12 + 7? Think step by step, then give the answer."])[0]
    return model, prompt, tokenizer.eos_token_id


def bench_model(name: str, args) -> dict:
    model, prompt, eos = _tiny_model() if name == "tiny" else _smollm2()
    model.generation_config.top_k = None  # HF's default generation config may carry top_k=50: full support here
    pad = eos
    if not args.eos:  # equal lengths: no stop at all (HF generate falls back on the generation config's EOS)
        eos = model.generation_config.eos_token_id = None
    settings = dict(alpha=args.alpha, mcmc_steps=args.mcmc_steps, num_blocks=args.num_blocks)
    ours = PowerSampler(**settings, stop_at_eos=True, proposals=args.proposals)
    rows = {"reference_b1": [], "ours_b1": [], f"ours_b{args.batch}": []}
    progress = tqdm(range(args.repeats), desc=f"{name}", leave=False)
    for repeat in progress:
        seed = 1000 + repeat
        start, cpu_start = time.perf_counter(), time.process_time()
        ref = reference_power_sample(model, prompt, max_new_tokens=args.max_new_tokens, eos=eos, pad=pad, seed=seed,
                                     **settings)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        rows["reference_b1"].append({"seconds_per_sample": seconds, "cpu_seconds_per_sample": cpu,
                                     "seconds_per_token": seconds / len(ref["tokens"]),
                                     "forward_per_output": ref["forward_tokens"] / len(ref["tokens"]),
                                     "model_calls": ref["model_calls"], "output_tokens": len(ref["tokens"]),
                                     "acceptance": ref["accepts"] / max(ref["attempts"], 1)})
        for batch, key in ((1, "ours_b1"), (args.batch, f"ours_b{args.batch}")):
            ids = torch.tensor([prompt] * batch)
            cpu_start = time.process_time()
            out = ours.generate(model, ids, args.max_new_tokens, eos_token_id=eos,
                                generator=[seed * 100 + b for b in range(batch)])
            rows[key].append({"seconds_per_sample": out.seconds / batch,
                              "cpu_seconds_per_sample": (time.process_time() - cpu_start) / batch,
                              "seconds_per_token": out.seconds / float(out.lengths.sum()),
                              "model_calls": out.model_calls,
                              "forward_per_output": float(out.forward_tokens.sum() / out.lengths.sum()),
                              "batch_forward_per_output": out.stats["batch_forward_tokens"] / float(out.lengths.sum()),
                              "output_tokens": float(out.lengths.float().mean()),
                              "acceptance": float(out.stats["accepted"].sum()
                                                  / out.stats["proposed"].sum().clamp(min=1))})
    summary = {key: {metric: statistics.median(r[metric] for r in runs) for metric in runs[0]}
               for key, runs in rows.items()}
    ref_s = summary["reference_b1"]["seconds_per_sample"]
    ref_cpu = summary["reference_b1"]["cpu_seconds_per_sample"]
    for key in summary:
        summary[key]["speedup_vs_reference"] = ref_s / summary[key]["seconds_per_sample"]
        summary[key]["cpu_speedup_vs_reference"] = ref_cpu / summary[key]["cpu_seconds_per_sample"]
    return {"model": name, "prompt_tokens": len(prompt), "summary": summary, "runs": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"],
                        help="tiny: a random 4-layer Llama (no download); smollm2: SmolLM2-135M-Instruct (wheel)")
    parser.add_argument("--alpha", type=float, default=4.0, help="power exponent (proposal temperature 1/alpha)")
    parser.add_argument("--mcmc-steps", type=int, default=2, help="MH steps per block")
    parser.add_argument("--num-blocks", type=int, default=4, help="blocks the continuation grows in")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="generated tokens per sample")
    parser.add_argument("--proposals", type=int, default=1, help="K of our sampler (K > 1: multiple-try MH)")
    parser.add_argument("--batch", type=int, default=8, help="the batched row of ours (batch 1 always runs)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats (medians reported)")
    parser.add_argument("--eos", action="store_true",
                        help="stop at EOS (default: off, so every sample has the full length and ratios compare "
                             "equal lengths)")
    parser.add_argument("--quick", action="store_true", help="tiny model, 8 tokens, 1 repeat: checks that it runs")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench_results" / "bench_power.json",
                        help="the JSON results file")
    args = parser.parse_args()
    if args.quick:
        args.models, args.max_new_tokens, args.repeats, args.batch = ["tiny"], 8, 1, 2
    torch.set_num_threads(args.threads)
    results = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "torch_threads": torch.get_num_threads(), "models": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    header = (f"{'model':8} {'sampler':14} {'s/sample':>9} {'ms/token':>9} {'speedup':>8} {'cpu s/sample':>13} "
              f"{'cpu speedup':>12} {'fwd tok/out tok':>16} {'calls':>6} {'out tok':>8} {'accept':>7}")
    lines = [header, "-" * len(header)]
    for name in args.models:
        result = bench_model(name, args)
        results["models"].append(result)
        args.out.write_text(json.dumps(results, indent=2))  # nothing lost if a later model is interrupted
        for key, s in result["summary"].items():
            lines.append(f"{name:8} {key:14} {s['seconds_per_sample']:9.3f} {1000 * s['seconds_per_token']:9.2f} "
                         f"{s['speedup_vs_reference']:7.2f}x {s['cpu_seconds_per_sample']:13.3f} "
                         f"{s['cpu_speedup_vs_reference']:11.2f}x {s['forward_per_output']:16.2f} "
                         f"{s['model_calls']:6.0f} {s['output_tokens']:8.1f} {s['acceptance']:7.2f}")
    print("\n".join(lines))
    print(f"(medians of {args.repeats} repeats; alpha={args.alpha}, {args.mcmc_steps} MH steps x "
          f"{args.num_blocks} blocks, K={args.proposals}, {args.max_new_tokens} new tokens, "
          f"{'stop at EOS: lengths differ' if args.eos else 'EOS off: equal lengths'}) -> {args.out}")


if __name__ == "__main__":
    main()
