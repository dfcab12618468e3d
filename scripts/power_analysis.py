"""Three checks of power sampling (JSON + PNG per part).

H1, power vs temperature, on an enumerable LM: p^alpha scales every sequence log-likelihood gap by exactly alpha;
token-wise temperature 1/alpha does not (it adds -sum log Z_alpha(context) per sequence). Where do they disagree?
H2, convergence: TV and KL between the empirical law of many chains and the exact p^alpha, against MH steps and
block size, several seeds (plus the exact law of the single-block chain, computed from its transition matrix).
H3, greedy vs low temperature vs power on SmolLM2 prompts: mean sequence log-likelihood, repeated n-grams, length.

    .venv/bin/python scripts/power_analysis.py                 # all three, a few minutes on CPU
    .venv/bin/python scripts/power_analysis.py --parts h1 h2   # no SmolLM2
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from qllm_samplers.diagnostics.distribution import kl_divergence, total_variation, tv_noise_floor  # noqa: E402
from qllm_samplers.generate import generate  # noqa: E402
from qllm_samplers.power import PowerSampler  # noqa: E402
from qllm_samplers.testing import (  # noqa: E402
    EOS,
    PROMPT,
    continuation_counts,
    exact_laws,
    mh_kernel,
    toy_lm,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def part_h1(args, out_dir: Path) -> dict:
    results = {}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (label, eos) in zip(axes, [("no EOS", None), ("EOS", EOS)]):
        model = toy_lm(eos_bias=0.0)
        conts, _, _, log_p, power, tokenwise = exact_laws(model, args.alpha, 3, eos)
        log_power, log_tok = power.log(), tokenwise.log()
        # Gap to the most likely sequence: power scales it by exactly alpha; temperature does not.
        best = int(log_p.argmax())
        gap_p = log_p[best] - log_p
        gap_power = log_power[best] - log_power
        gap_tok = log_tok[best] - log_tok
        scale_err_power = float((gap_power - args.alpha * gap_p).abs().max())
        ratio_tok = (gap_tok[gap_p > 1e-9] / gap_p[gap_p > 1e-9])
        disagree = (power - tokenwise).abs().argsort(descending=True)[:5].tolist()
        lengths = torch.tensor([len(c) for c in conts])
        results[label] = {
            "alpha": args.alpha, "num_sequences": len(conts),
            "tv_power_vs_temperature": float(total_variation(power, tokenwise)),
            "kl_power_to_temperature": float(kl_divergence(power, tokenwise)),
            "max_abs_error_power_gap_minus_alpha_times_gap": scale_err_power,
            "temperature_gap_over_logp_gap": {"min": float(ratio_tok.min()), "median": float(ratio_tok.median()),
                                              "max": float(ratio_tok.max())},
            "mass_on_short_sequences": {"power": float(power[lengths < 3].sum()),
                                        "temperature": float(tokenwise[lengths < 3].sum()),
                                        "base": float(log_p.exp()[lengths < 3].sum())},
            "most_disagreeing": [{"tokens": list(conts[i]), "log_p": float(log_p[i]), "power": float(power[i]),
                                  "temperature": float(tokenwise[i])} for i in disagree],
        }
        ax.scatter(gap_p, gap_power, s=10, label=f"p^{args.alpha:g} (slope {args.alpha:g} exactly)")
        ax.scatter(gap_p, gap_tok, s=10, marker="x", label=f"temperature 1/{args.alpha:g}")
        ax.plot([0, float(gap_p.max())], [0, args.alpha * float(gap_p.max())], "k--", lw=0.8)
        ax.set_xlabel("log p(best) - log p(x)  (base model)")
        ax.set_ylabel("log-prob gap under the sampling law")
        ax.set_title(f"H1 ({label}): TV(power, temperature) = {results[label]['tv_power_vs_temperature']:.3f}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "power_h1.png", dpi=120)
    plt.close(fig)
    return results


def part_h2(args, out_dir: Path) -> dict:
    model = toy_lm(eos_bias=0.0)
    conts, lp, lq, _, power, tokenwise = exact_laws(model, args.alpha, 3, EOS)
    kernel = mh_kernel(conts, lp, lq, args.alpha)
    law, exact_curve = tokenwise.clone(), {}
    for step in range(max(args.h2_steps) + 1):
        if step in args.h2_steps:
            exact_curve[step] = float(total_variation(law, power))
        law = law @ kernel
    curves = {}
    jobs = [(blocks, steps, seed) for blocks in args.h2_blocks for steps in args.h2_steps for seed in range(args.seeds)]
    for blocks, steps, seed in tqdm(jobs, desc="H2"):
        sampler = PowerSampler(alpha=args.alpha, mcmc_steps=steps, num_blocks=blocks)
        seeds = [seed * 1_000_003 + b for b in range(args.chains)]
        out = sampler.generate(model, torch.tensor([PROMPT] * args.chains), 3, eos_token_id=EOS, generator=seeds)
        emp = continuation_counts(out, conts) / args.chains
        entry = curves.setdefault(f"block_size={3 // blocks}", {}).setdefault(steps, {"tv": [], "kl": [],
                                                                                      "forward_tokens": []})
        entry["tv"].append(float(total_variation(emp, power)))
        entry["kl"].append(float(kl_divergence(emp, power)))
        entry["forward_tokens"].append(float(out.forward_tokens.float().mean()))
    # Where each acceptance rule converges to (power iteration on its exact kernel), on a model whose EOS
    # makes lengths differ: the length term is what keeps the short/long balance right.
    variants = {}
    for seed, scale, alpha in ((1, 12.0, 2.0), (1, 8.0, args.alpha)):
        v_conts, v_lp, v_lq, _, v_power, v_tok = exact_laws(toy_lm(seed, scale, 0.0), alpha, 3, EOS)
        short = torch.tensor([len(c) < 3 for c in v_conts])
        key = f"seed={seed} scale={scale:g} alpha={alpha:g}"
        variants[key] = {"target_mass_on_short": float(v_power[short].sum())}
        for variant in ("ours", "no_length_term", "official_slice"):
            law_v, k_v = v_tok.clone(), mh_kernel(v_conts, v_lp, v_lq, alpha, variant)
            for _ in range(args.h2_power_iterations):
                law_v = law_v @ k_v
            variants[key][variant] = {"tv_to_power": float(total_variation(law_v, v_power)),
                                      "mass_on_short": float(law_v[short].sum())}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, by_steps in curves.items():
        steps = sorted(by_steps)
        for ax, metric in zip(axes, ("tv", "kl")):
            means = [statistics.mean(by_steps[s][metric]) for s in steps]
            spread = [statistics.pstdev(by_steps[s][metric]) for s in steps]
            ax.errorbar(steps, means, yerr=spread, marker="o", capsize=3, label=f"sampler, {name}")
    axes[0].plot(sorted(exact_curve), [exact_curve[s] for s in sorted(exact_curve)], "k--",
                 label="exact law, block_size=3")
    axes[0].axhline(tv_noise_floor(args.chains, power), color="grey", lw=0.8, label="noise floor")
    axes[0].set_ylabel("TV(empirical, p^alpha)")
    axes[1].set_ylabel("KL(empirical || p^alpha)")
    for ax in axes:
        ax.set_xlabel("MH steps per block")
        ax.legend(fontsize=8)
    fig.suptitle(f"H2: convergence to p^{args.alpha:g} ({args.chains} chains x {args.seeds} seeds, 3 tokens, EOS)")
    fig.tight_layout()
    fig.savefig(out_dir / "power_h2.png", dpi=120)
    plt.close(fig)
    return {"alpha": args.alpha, "chains": args.chains, "seeds": args.seeds,
            "noise_floor_tv": tv_noise_floor(args.chains, power),
            "tv_temperature_vs_power": float(total_variation(tokenwise, power)),
            "exact_tv_single_block": exact_curve, "empirical": curves,
            f"after_{args.h2_power_iterations}_moves_by_acceptance_rule": variants}


def repeated_ngram_fraction(tokens: list[int], n: int = 3) -> float:
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 0.0 if not grams else 1.0 - len(set(grams)) / len(grams)


H3_PROMPTS = [
    "What is 12 + 7? Think step by step, then give the answer.",
    "Write one sentence about the moon.",
    "Name three prime numbers and explain why they are prime.",
    "Explain what a list is in Python, briefly.",
]


def part_h3(args, out_dir: Path) -> dict:
    from qllm_evals.models import chat_prompt_ids, left_pad, load_causal_lm

    model, tokenizer = load_causal_lm("smollm2-135m-instruct")
    eos = tokenizer.eos_token_id
    prompts = chat_prompt_ids(tokenizer, H3_PROMPTS)
    rows = [p for p in prompts for _ in range(args.h3_seeds)]
    ids, mask = left_pad(rows, tokenizer.pad_token_id)
    seeds = [1000 * i + s for i in range(len(prompts)) for s in range(args.h3_seeds)]

    def greedy(_, scores):
        return scores.masked_fill(scores < scores.max(dim=-1, keepdim=True).values, -math.inf)

    def low_temperature(_, scores):
        return scores * args.alpha

    results, texts = {}, {}
    for name in ("greedy", f"temperature 1/{args.alpha:g}", f"power alpha={args.alpha:g}"):
        start = time.perf_counter()
        if name.startswith("power"):
            out = PowerSampler(alpha=args.alpha, mcmc_steps=args.h3_steps, num_blocks=args.h3_blocks).generate(
                model, ids, args.h3_max_new_tokens, attention_mask=mask, eos_token_id=eos, generator=seeds)
            log_p = out.log_p.tolist()
            extra = {"acceptance": float(out.stats["accepted"].sum() / out.stats["proposed"].sum()),
                     "forward_tokens_per_output_token": float(out.forward_tokens.sum() / out.lengths.sum())}
        else:
            out = generate(model, ids, sampler=greedy if name == "greedy" else low_temperature,
                           max_new_tokens=args.h3_max_new_tokens, attention_mask=mask, eos_token_id=eos,
                           generator=seeds)
            log_p = out.logprobs.double().sum(1).tolist()
            extra = {}
        lengths = out.lengths.tolist()
        conts = [out.new_tokens[r, :lengths[r]].tolist() for r in range(len(rows))]
        results[name] = {
            "mean_log_p": statistics.mean(log_p),
            "mean_log_p_per_token": statistics.mean(lp / n for lp, n in zip(log_p, lengths)),
            "repeated_3gram_fraction": statistics.mean(repeated_ngram_fraction(c) for c in conts),
            "mean_length": statistics.mean(lengths),
            "finished_with_eos": sum(1 for c in conts if c and c[-1] == eos) / len(conts),
            "seconds": time.perf_counter() - start, **extra,
        }
        texts[name] = [tokenizer.decode(c, skip_special_tokens=True) for c in conts[::args.h3_seeds]]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    names = list(results)
    for ax, metric in zip(axes, ("mean_log_p_per_token", "repeated_3gram_fraction", "mean_length")):
        ax.bar(range(len(names)), [results[n][metric] for n in names], color=["C0", "C1", "C2"])
        ax.set_xticks(range(len(names)), [n.replace(" ", "\n", 1) for n in names], fontsize=8)
        ax.set_title(metric)
    fig.suptitle(f"H3: SmolLM2-135M, {len(H3_PROMPTS)} prompts x {args.h3_seeds} seeds, "
                 f"{args.h3_max_new_tokens} new tokens")
    fig.tight_layout()
    fig.savefig(out_dir / "power_h3.png", dpi=120)
    plt.close(fig)
    return {"prompts": H3_PROMPTS, "seeds_per_prompt": args.h3_seeds, "results": results, "samples": texts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["h1", "h2", "h3"], choices=["h1", "h2", "h3"],
                        help="h1: exact laws; h2: MH convergence vs the exact kernel; h3: SmolLM2 comparison")
    parser.add_argument("--alpha", type=float, default=4.0, help="power exponent")
    parser.add_argument("--chains", type=int, default=600, help="H2: chains per (setting, seed)")
    parser.add_argument("--seeds", type=int, default=3, help="H2: seeds per setting")
    parser.add_argument("--h2-steps", type=int, nargs="+", default=[0, 1, 2, 4, 8, 16, 32],
                        help="H2: MH steps per block to measure")
    parser.add_argument("--h2-blocks", type=int, nargs="+", default=[1, 3], help="H2: num_blocks over 3 tokens")
    parser.add_argument("--h2-power-iterations", type=int, default=3000,
                        help="H2: exact moves used to find where each acceptance rule converges")
    parser.add_argument("--h3-seeds", type=int, default=2, help="H3: seeds per prompt")
    parser.add_argument("--h3-max-new-tokens", type=int, default=48, help="H3: generation budget")
    parser.add_argument("--h3-steps", type=int, default=2, help="H3: MH steps per block")
    parser.add_argument("--h3-blocks", type=int, default=4, help="H3: MH blocks")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "bench_results" / "power_analysis",
                        help="where the JSON and PNG files go")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for part in args.parts:
        result = {"h1": part_h1, "h2": part_h2, "h3": part_h3}[part](args, args.out_dir)
        path = args.out_dir / f"power_{part}.json"
        path.write_text(json.dumps(result, indent=2))  # one file per part: nothing lost if killed later
        print(f"{part}: {path} and {path.with_suffix('.png')}")
        print(json.dumps(result if part != "h3" else result["results"], indent=2)[:3000])


if __name__ == "__main__":
    main()
