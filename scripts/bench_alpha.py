"""Benchmark the adaptive samplers against plain sampling with the same model, on CPU.

Per decode step, side by side in one run (interleaved repeats, medians): plain sampling (``SamplingChain`` with
AlphaSamplerConfig's base parameters), AlphaSampler without and with the COLD-state lookahead, and
EntropixSampler. Also: how often the lookahead changes the token and what it costs (extra forward tokens), and
the COLD / MIXED / HOT (and entropix quadrant) frequencies on real prompts.

    .venv/bin/python scripts/bench_alpha.py                       # tiny random Llama + SmolLM2-135M
    .venv/bin/python scripts/bench_alpha.py --models tiny --repeats 2 --new-tokens 16
    .venv/bin/python scripts/bench_alpha.py --qllm-checkpoint runs/qllm/last.ckpt   # add a trained QLLM
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from qllm_evals.models import left_pad
from qllm_samplers import testing
from qllm_samplers.alpha import AlphaSampler, AlphaSamplerConfig, calibrate_weights
from qllm_samplers.entropix import EntropixSampler
from qllm_samplers.generate import generate

REPO_ROOT = Path(__file__).resolve().parents[1]

OPEN_PROMPTS = [
    "Write a short poem about the sea.",
    "Explain why the sky is blue.",
    "List three uses of a paperclip.",
    "Tell me a story about a dragon who is afraid of heights.",
    "What is the capital of France, and what is it famous for?",
    "Describe your ideal weekend.",
    "Give me advice for a job interview.",
    "What is 12 + 7? Answer briefly.",
]

SAMPLERS = {
    "plain": lambda: AlphaSampler().baseline(),
    "alpha": lambda: AlphaSampler(AlphaSamplerConfig(lookahead=False)),
    "alpha+lookahead": lambda: AlphaSampler(AlphaSamplerConfig(lookahead=True)),
    "entropix": lambda: EntropixSampler(),
}


def gsm8k_questions(data_dir: Path, n: int) -> list[str]:
    path = data_dir / "gsm8k" / "test.jsonl"
    if not path.is_file():
        return []
    with path.open() as f:
        return [json.loads(line)["question"] for _, line in zip(range(n), f)]


def load(name: str, args):
    """(model, prompt ids, attention mask, eos ids) for one benchmark model."""
    if name == "tiny":
        model = testing.tiny_llama(512, max_position_embeddings=512, hidden_size=64, initializer_range=0.2)
        ids = torch.randint(3, 512, (max(args.batch_sizes), 24), generator=torch.Generator().manual_seed(0))
        return model, ids, torch.ones_like(ids), None, []
    if name == "qllm":
        from qllm_model.lit import load_model
        from qllm_model.tokenizer import ByteTokenizer

        model = load_model(args.qllm_checkpoint)
        # The byte model continues text like its training data: prompts are slices of Tiny Shakespeare.
        text = (args.data_dir / "tinyshakespeare" / "input.txt").read_bytes()
        starts = torch.randint(0, len(text) - 64, (args.freq_prompts,), generator=torch.Generator().manual_seed(0))
        prompt_ids = [ByteTokenizer().encode(text[s: s + 64]) for s in starts.tolist()]
        ids, mask = left_pad(prompt_ids[: max(args.batch_sizes)], ByteTokenizer.pad_token_id)
        return model, ids, mask, ByteTokenizer.eos_token_id, prompt_ids
    from qllm_evals.models import chat_prompt_ids, load_causal_lm

    model, tokenizer = load_causal_lm(name)
    questions = OPEN_PROMPTS + gsm8k_questions(args.data_dir, args.freq_prompts - len(OPEN_PROMPTS))
    prompt_ids = chat_prompt_ids(tokenizer, questions[: args.freq_prompts])
    ids, mask = left_pad(prompt_ids[: max(args.batch_sizes)], tokenizer.pad_token_id)
    return model, ids, mask, tokenizer.eos_token_id, prompt_ids


def time_samplers(model, ids, mask, batch: int, args) -> dict:
    """Median seconds per decode step of each sampler, repeats interleaved so that load drifts hit all alike.

    Both wall-clock and process CPU time are recorded: on a shared, overloaded machine the wall clock mostly
    measures the neighbours, while CPU time still measures the work done.
    """
    ids, mask = ids[:batch], mask[:batch]
    seeds = list(range(batch))
    for make in SAMPLERS.values():  # warm-up (first-call costs: attention registration, allocator)
        generate(model, ids, sampler=make(), max_new_tokens=2, attention_mask=mask, generator=seeds)
    per_step = {name: [] for name in SAMPLERS}
    cpu_per_step = {name: [] for name in SAMPLERS}
    stats = {}
    names = list(SAMPLERS)
    for repeat in tqdm(range(args.repeats), desc=f"timing B={batch}", leave=False):
        order = names[repeat % len(names):] + names[: repeat % len(names)]
        for name in order:
            cpu_start = time.process_time()
            out = generate(model, ids, sampler=SAMPLERS[name](), max_new_tokens=args.new_tokens,
                           attention_mask=mask, generator=[s + 1000 * repeat for s in seeds])
            cpu_per_step[name].append((time.process_time() - cpu_start) / out.logprobs.shape[1])
            per_step[name].append(out.seconds / out.logprobs.shape[1])
            stats.setdefault(name, []).append({**out.stats, "forward_tokens": int(out.forward_tokens.sum())})
    plain = statistics.median(per_step["plain"])
    plain_cpu = statistics.median(cpu_per_step["plain"])
    result = {}
    for name in names:
        median = statistics.median(per_step[name])
        median_cpu = statistics.median(cpu_per_step[name])
        entry = {"ms_per_step": 1000 * median, "ratio_vs_plain": median / plain,
                 "cpu_ms_per_step": 1000 * median_cpu, "cpu_ratio_vs_plain": median_cpu / plain_cpu,
                 "all_ms_per_step": [1000 * s for s in per_step[name]],
                 "all_cpu_ms_per_step": [1000 * s for s in cpu_per_step[name]]}
        looked = [s for s in stats[name] if "lookahead_forward_tokens" in s]
        if looked:
            extra = sum(s["lookahead_forward_tokens"] for s in looked)
            base = sum(s["forward_tokens"] for s in looked)
            entry["lookahead_extra_forward_fraction"] = extra / base
        result[name] = entry
    return result


def frequencies(model, prompt_ids, eos, pad_id: int, args, samplers: dict) -> dict:
    """State / quadrant frequencies and lookahead effect over many prompts (batched, EOS stops a row)."""
    totals = {}
    chunks = [prompt_ids[i: i + args.freq_batch] for i in range(0, len(prompt_ids), args.freq_batch)]
    for name, make in samplers.items():
        merged = {}
        for index, chunk in enumerate(tqdm(chunks, desc=f"frequencies {name}", leave=False)):
            ids, mask = left_pad(chunk, pad_id)
            out = generate(model, ids, sampler=make(), max_new_tokens=args.freq_new_tokens,
                           attention_mask=mask, eos_token_id=eos,
                           generator=[1000 * index + row for row in range(len(chunk))])
            for key, value in {**out.stats, "forward_tokens": int(out.forward_tokens.sum())}.items():
                if isinstance(value, dict):
                    bucket = merged.setdefault(key, {})
                    for k, v in value.items():
                        bucket[k] = bucket.get(k, 0) + v
                elif isinstance(value, int):
                    merged[key] = merged.get(key, 0) + value
        counts = merged.get("state_counts") or merged.get("quadrant_counts")
        total = sum(counts.values())
        merged["frequencies"] = {k: v / total for k, v in counts.items()}
        if "lookahead_rows" in merged:
            merged["lookahead_change_rate"] = merged["lookahead_changed"] / max(merged["lookahead_rows"], 1)
            merged["lookahead_extra_forward_fraction"] = merged["lookahead_forward_tokens"] / merged["forward_tokens"]
        merged.pop("state_frequencies", None)
        merged.pop("quadrant_frequencies", None)
        totals[name] = merged
    return totals


def print_table(results: dict) -> None:
    print(f"\n{'model':<24}{'B':>3}  {'sampler':<17}{'cpu ms/step':>12}{'x plain':>9}{'wall ms/step':>13}"
          f"{'x plain':>9}{'extra fwd':>11}")
    for model_name, entry in results["models"].items():
        for batch, timings in entry.get("timing", {}).items():
            for name, t in timings.items():
                extra = t.get("lookahead_extra_forward_fraction")
                extra = f"{100 * extra:.1f}%" if extra is not None else "-"
                print(f"{model_name:<24}{batch:>3}  {name:<17}{t['cpu_ms_per_step']:>12.2f}"
                      f"{t['cpu_ratio_vs_plain']:>9.2f}{t['ms_per_step']:>13.2f}{t['ratio_vs_plain']:>9.2f}{extra:>11}")
        for name, f in entry.get("frequencies", {}).items():
            freq = ", ".join(f"{k} {100 * v:.1f}%" for k, v in f["frequencies"].items())
            line = f"{model_name:<24}  {name}: {f['tokens']} tokens: {freq}"
            if "lookahead_change_rate" in f:
                line += (f"; lookahead changed {100 * f['lookahead_change_rate']:.1f}% of {f['lookahead_rows']} COLD "
                         f"tokens, +{100 * f['lookahead_extra_forward_fraction']:.1f}% forward tokens")
            print(line)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["tiny", "smollm2-135m-instruct"],
                        help="'tiny' (random Llama), 'smollm2-135m-instruct' or another load_causal_lm name")
    parser.add_argument("--qllm-checkpoint", type=Path, default=None, help="also benchmark this QLLM checkpoint")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4], help="batch sizes of the timed runs")
    parser.add_argument("--no-timing", action="store_true", help="only the state / quadrant frequencies")
    parser.add_argument("--calibrate", action="store_true",
                        help="also fit alpha's weights to the model (calibrate_weights: 20%% COLD, 15%% HOT on its "
                             "own text at T=0.7) and report the frequencies with them")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode steps per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per configuration (median reported)")
    parser.add_argument("--freq-prompts", type=int, default=32, help="prompts for the state frequencies")
    parser.add_argument("--freq-batch", type=int, default=8, help="batch size for the state-frequency runs")
    parser.add_argument("--freq-new-tokens", type=int, default=96,
                        help="new tokens per prompt in the state-frequency runs")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: CPU time is then a clean measure of the work)")
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT.parent / "shared" / "data",
                        help="offline data directory (prompts come from its arithmetic/GSM8K files)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench_results" / "bench_alpha.json",
                        help="where the JSON results are written")
    args = parser.parse_args(argv)
    for name in ("new_tokens", "repeats", "freq_prompts", "freq_batch", "freq_new_tokens", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    models = list(args.models) + (["qllm"] if args.qllm_checkpoint else [])
    results = {"command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])),
               "started": time.strftime("%Y-%m-%d %H:%M:%S"), "threads": args.threads,
               "torch": torch.__version__, "models": {}}
    for name in models:
        model, ids, mask, eos, prompt_ids = load(name, args)
        entry = results["models"].setdefault(name, {"timing": {}})
        with torch.no_grad():
            for batch in [] if args.no_timing else args.batch_sizes:
                entry["timing"][batch] = time_samplers(model, ids, mask, batch, args)
                args.out.write_text(json.dumps(results, indent=2))  # keep what we have if interrupted
            if prompt_ids:
                pad = getattr(getattr(model, "config", None), "pad_token_id", None) or 0
                samplers = {name: SAMPLERS[name] for name in ("alpha+lookahead", "entropix")}
                if args.calibrate:
                    first, first_mask = left_pad(prompt_ids[: args.freq_batch], pad)
                    weights = calibrate_weights(model, first, attention_mask=first_mask, eos_token_id=eos,
                                                max_new_tokens=args.freq_new_tokens,
                                                generator=list(range(first.shape[0])))
                    entry["calibrated_weights"] = dict(zip(("token_weight", "attention_weight", "alpha_offset"),
                                                           weights))
                    samplers["alpha+lookahead (calibrated: {:.3g}, {:.3g}, {:+.3g})".format(*weights)] = \
                        lambda w=weights: AlphaSampler(AlphaSamplerConfig(token_weight=w[0], attention_weight=w[1],
                                                                          alpha_offset=w[2]))
                entry["frequencies"] = frequencies(model, prompt_ids, eos, pad, args, samplers)
        args.out.write_text(json.dumps(results, indent=2))
    print_table(results)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
