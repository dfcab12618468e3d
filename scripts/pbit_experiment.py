"""p-bit token sampling experiments: the original table, every mode against the exact softmax, mixing, SmolLM2.

Sections (each appends to the JSON as soon as it finishes, so nothing is lost if the run is killed):
  original    the original package's table (V=32, n=10,000, lambda in {5,10,20,50,100}) with its own protocol
              (PBitSampler(mode="original"): raw logits, random one-hot start, 3 attempts of 150 single-bit
              updates, argmax fallback; its two-sample TV and TV to the exact softmax), next to our gibbs mode
              (log-sum-exp recentred logits, 100 real sweeps, retries, counted fallback)
  modes       every mode at V=32: TV and KL to softmax, G-test p, noise floor, invalid and fallback rates,
              microseconds per sample; for logits offset by 0 and by +1000
  sweeps      TV against sweeps for gibbs (random and sequential scan), swap and tempering (PNG)
  mixing      integrated autocorrelation time, ESS and split R-hat of the gibbs network's energy
  histogram   sampled histogram against softmax for every mode (PNG)
  calibrate   (--calibrate) the lambda that minimises gibbs' TV at a fixed number of sweeps
  large       V=1,000
  smollm2     SmolLM2-135M-Instruct's real next-token logits, top-k 50 reduced (--no-model skips it)

    python scripts/pbit_experiment.py                      # default run, a few minutes on 1 CPU thread
    python scripts/pbit_experiment.py --calibrate --out bench_results/pbit_calibrated.json
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

from qllm_samplers.diagnostics.distribution import (  # noqa: E402
    empirical_distribution,
    g_test,
    kl_divergence,
    total_variation,
    tv_noise_floor,
)
from qllm_samplers.diagnostics.mcmc import autocorrelation_time, effective_sample_size, split_rhat  # noqa: E402
from qllm_samplers.pbit.network import UniformSource  # noqa: E402
from qllm_samplers.pbit.token import (  # noqa: E402
    MODES,
    OneHotNetwork,
    PBitSampler,
    centred_log_probs,
    reduce_vocabulary,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
ORIGINAL_LAMBDAS = (5.0, 10.0, 20.0, 50.0, 100.0)
EXACT_MODES = ("swap", "shifted", "tempering")
PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village,",
    "Question: What is 12 + 7?\nAnswer:",
)


def random_logits(vocab: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, generator=g) * scale


def evaluate(tokens: torch.Tensor, probs: torch.Tensor) -> dict:
    """TV, KL(empirical || exact), G-test and noise floor of draws (-1 = invalid) against exact probs."""
    valid = tokens[tokens >= 0]
    n = int(valid.numel())
    result = {"n": int(tokens.numel()), "invalid_returned": 1.0 - n / tokens.numel()}
    if n == 0:
        return {**result, "tv": math.nan, "kl": math.nan, "g_p_value": math.nan, "noise_floor": math.nan}
    empirical = empirical_distribution(valid, probs.numel())
    _, p_value, dof = g_test(empirical * n, probs)
    return {**result, "tv": float(total_variation(empirical, probs)), "kl": float(kl_divergence(empirical, probs)),
            "g_p_value": p_value, "dof": dof, "noise_floor": tv_noise_floor(n, probs)}


def timed_sample(sampler: PBitSampler, logits: torch.Tensor, n: int, seed: int, repeats: int = 1):
    """Draw n tokens ``repeats`` times: (first run's tokens, median wall seconds, median CPU seconds).

    CPU time (this process, all threads) is reported next to wall time because the machine may be shared:
    with one torch thread it is what the run would take on an idle core.
    """
    walls, cpus, tokens = [], [], None
    for _ in range(repeats):
        sampler.reset_stats()
        wall, cpu = time.perf_counter(), time.process_time()
        drawn = sampler.sample(logits, n, generator=seed)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
        tokens = drawn if tokens is None else tokens
    return tokens, statistics.median(walls), statistics.median(cpus)


def original_logits() -> torch.Tensor:
    """The original experiment's logits (qllm_pbits/experiments/exp_softmax_match.py)."""
    torch.manual_seed(42)
    return torch.randn(32)


def original_kl(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-10) -> float:
    """The original's KL (qllm_pbits/pbits/metrics.py): both histograms + 1e-10, renormalised, KL(p || q)."""
    p, q = p.double() + eps, q.double() + eps
    p, q = p / p.sum(), q / q.sum()
    return float((p * (p / q).log()).sum())


def save(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(path)


def print_table(title: str, rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    print(f"\n{title}")
    header = "  ".join(f"{label:>{max(len(label), 9)}}" for _, label, _ in columns)
    print(header)
    for row in rows:
        cells = []
        for key, label, fmt in columns:
            value = row.get(key, "")
            width = max(len(label), 9)
            cells.append(f"{value:>{width}{fmt}}" if isinstance(value, (int, float)) else f"{value!s:>{width}}")
        print("  ".join(cells))


# ---------------------------------------------------------------------------------------------- sections
def section_original(args, results) -> None:
    """The original's table with the original's protocol (PBitSampler(mode="original")) and both of its TVs.

    The original compares its p-bit histogram with a histogram of n softmax draws (two-sample TV, whose floor is
    about 0.028 at n = 10,000 on these logits); we also give TV against the exact softmax. Next to it: our gibbs
    mode (recentred logits, 100 real sweeps, retries), a better sampler and not a reproduction.
    """
    z = original_logits()
    probs = torch.softmax(z.double(), 0)
    generator = torch.Generator().manual_seed(args.seed)
    baseline = torch.multinomial(probs, args.n, replacement=True, generator=generator)
    baseline_hist = empirical_distribution(baseline, 32)
    uniform = torch.full((32,), 1 / 32, dtype=torch.float64)
    rows = []
    for lam in tqdm(ORIGINAL_LAMBDAS, desc="original table"):
        original = PBitSampler("original", lam=lam)
        tokens = original.sample(z, args.n, generator=args.seed + 1)
        hist = empirical_distribution(tokens, 32)
        ours = PBitSampler("gibbs", lam=lam, sweeps=100)
        ours_tokens, seconds, cpu_seconds = timed_sample(ours, z, args.n, args.seed)
        mine = evaluate(ours_tokens, probs)
        rows.append({"lambda": lam, "original_tv_two_sample": float(total_variation(hist, baseline_hist)),
                     "original_tv_exact": float(total_variation(hist, probs)),
                     "original_kl": original_kl(baseline_hist, hist),
                     "original_invalid": original.counters.fallback_rate,
                     "tv_to_uniform": float(total_variation(hist, uniform)),
                     "gibbs_tv": mine["tv"], "gibbs_kl": mine["kl"], "gibbs_p": mine["g_p_value"],
                     "gibbs_invalid": ours.counters.invalid_rate, "gibbs_fallback": ours.counters.fallback_rate,
                     "noise_floor": mine["noise_floor"], "us_per_sample": 1e6 * seconds / args.n,
                     "cpu_us_per_sample": 1e6 * cpu_seconds / args.n})
    results["original"] = {
        "vocab": 32, "n": args.n, "rows": rows,
        "tv_uniform_softmax": float(total_variation(uniform, probs)),
        "two_sample_floor": float(total_variation(empirical_distribution(
            torch.multinomial(probs, args.n, replacement=True, generator=generator), 32), baseline_hist)),
        "note": "original: qllm-pbits' protocol (raw logits, random one-hot start, 3 attempts of 150 single-bit "
                "updates, argmax fallback = 'invalid'); gibbs (ours): recentred logits, 100 sweeps, 3 retries"}
    print(f"TV(uniform, softmax) = {results['original']['tv_uniform_softmax']:.3f}; two-sample TV of two softmax "
          f"histograms (the original's floor): {results['original']['two_sample_floor']:.3f}")
    print_table(f"Original table (V=32, n={args.n}): the original's protocol, and our gibbs mode", rows, [
        ("lambda", "lambda", ".0f"), ("original_tv_two_sample", "orig TV2", ".3f"),
        ("original_tv_exact", "orig TV", ".3f"), ("original_kl", "orig KL", ".3f"),
        ("original_invalid", "orig inval", ".4f"), ("tv_to_uniform", "TV unif", ".3f"),
        ("gibbs_tv", "gibbs TV", ".4f"), ("gibbs_p", "G p", ".3f"), ("gibbs_fallback", "fallback", ".4f"),
        ("noise_floor", "floor", ".4f"),
    ])


def mode_configs(sequential: bool = True) -> list[tuple[str, dict]]:
    configs = [("gibbs lam=5 random", {"mode": "gibbs", "lam": 5.0, "sweeps": 100, "update": "random"})]
    if sequential:
        configs.append(
            ("gibbs lam=5 sequential", {"mode": "gibbs", "lam": 5.0, "sweeps": 100, "update": "sequential"}))
    return configs + [
        ("swap", {"mode": "swap"}),
        ("shifted", {"mode": "shifted"}),
        ("tempering lam=20", {"mode": "tempering"}),
        ("tempering lam=100", {"mode": "tempering", "lam": 100.0}),
    ]


def compare_modes(z: torch.Tensor, n: int, seed: int, offsets, repeats: int, desc: str, top_k=None,
                  sequential: bool = True, gibbs_n: int | None = None) -> list[dict]:
    """Every mode on one logit row; ``gibbs_n`` draws fewer samples for the (slow) gibbs configurations."""
    rows = []
    configs = mode_configs(sequential)
    for (name, config), offset in tqdm([(c, o) for c in configs for o in offsets], desc=desc):
        sampler = PBitSampler(**config, top_k=top_k)
        probs = sampler.target_probs(z)
        mode_repeats = repeats if config["mode"] in EXACT_MODES else 1
        draws = gibbs_n if gibbs_n and config["mode"] == "gibbs" else n
        tokens, seconds, cpu_seconds = timed_sample(sampler, z + offset, draws, seed, mode_repeats)
        metrics = evaluate(tokens, probs)
        rows.append({"mode": name, "offset": offset, "n": draws, "tv": metrics["tv"], "kl": metrics["kl"],
                     "g_p_value": metrics["g_p_value"], "noise_floor": metrics["noise_floor"],
                     "invalid_rate": sampler.counters.invalid_rate, "fallback_rate": sampler.counters.fallback_rate,
                     "us_per_sample": 1e6 * seconds / draws, "cpu_us_per_sample": 1e6 * cpu_seconds / draws,
                     "samples_per_s": draws / seconds, "samples_per_cpu_s": draws / cpu_seconds})
    return rows


MODE_COLUMNS = [
    ("mode", "mode", ""), ("offset", "offset", ".0f"), ("tv", "TV", ".4f"), ("noise_floor", "floor", ".4f"),
    ("kl", "KL", ".5f"), ("g_p_value", "G p", ".3f"), ("invalid_rate", "invalid", ".4f"),
    ("fallback_rate", "fallback", ".4f"), ("us_per_sample", "us/sample", ".2f"),
    ("cpu_us_per_sample", "cpu us/s", ".2f"),
]


def section_modes(args, results) -> None:
    z = random_logits(32, args.seed)
    rows = compare_modes(z, args.n, args.seed, (0.0, 1000.0), args.repeats, "modes V=32")
    results["modes"] = {"vocab": 32, "n": args.n, "threads": torch.get_num_threads(), "rows": rows}
    print_table(f"Every mode at V=32, n={args.n} (median of {args.repeats} runs for exact modes)", rows,
                MODE_COLUMNS)


def gibbs_tv_curve(z: torch.Tensor, lam: float, n: int, checkpoints, update: str, seed: int) -> list[dict]:
    """TV of one-hot final states (no retries) and the invalid fraction after each checkpoint's sweeps."""
    values, token_ids, valid = reduce_vocabulary(z[None])
    log_probs = centred_log_probs(values, valid, 1.0)
    probs = torch.zeros(z.numel(), dtype=torch.float64).scatter(0, token_ids[0], log_probs[0].exp())
    network = OneHotNetwork(log_probs.expand(n, -1), valid.expand(n, -1), penalty=lam)
    y, s = network.empty_state()
    uniform = UniformSource(n, seed)
    curve, done = [], 0
    for target in checkpoints:
        for _ in range(target - done):
            network.sweep(y, s, uniform, update)
        done = target
        one_hot = s == 1
        tokens = token_ids[0, y.argmax(0)[one_hot]]
        metrics = evaluate(tokens, probs)
        curve.append({"sweeps": target, "tv": metrics["tv"], "invalid": float((~one_hot).float().mean())})
    return curve


def section_sweeps(args, results) -> None:
    z = random_logits(32, args.seed)
    probs = torch.softmax(z.double(), 0)
    checkpoints = (1, 2, 5, 10, 20, 50, 100, 200)
    curves = {}
    for update in tqdm(("random", "sequential"), desc="gibbs TV vs sweeps"):
        curves[f"gibbs lam=5 {update}"] = gibbs_tv_curve(z, 5.0, args.n, checkpoints, update, args.seed)
    for mode, points in (("swap", (1, 2, 3, 5, 8, 10, 20)), ("tempering", (1, 2, 3, 5, 10, 20))):
        curve = []
        for sweeps in tqdm(points, desc=f"{mode} TV vs sweeps"):
            sampler = PBitSampler(mode, sweeps=sweeps, top_k=None)
            metrics = evaluate(sampler.sample(z, args.n, generator=args.seed), probs)
            curve.append({"sweeps": sweeps, "tv": metrics["tv"], "invalid": sampler.counters.invalid_rate})
        curves[mode] = curve
    floor = tv_noise_floor(args.n, probs)
    results["sweeps"] = {"vocab": 32, "n": args.n, "noise_floor": floor, "curves": curves}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in curves.items():
        ax.plot([p["sweeps"] for p in curve], [p["tv"] for p in curve], marker="o", label=name)
    ax.axhline(floor, color="gray", linestyle="--", label=f"noise floor n={args.n}")
    ax.set(xscale="log", yscale="log", xlabel="sweeps (gibbs/swap) or rounds (tempering)",
           ylabel="TV to softmax", title="p-bit token sampler: TV against sweeps (V=32)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.plot_dir / "pbit_tv_vs_sweeps.png", dpi=120)
    plt.close(fig)
    print("\nTV against sweeps (V=32): " + "; ".join(
        f"{name}: " + ", ".join(f"{p['sweeps']}:{p['tv']:.3f}" for p in curve) for name, curve in curves.items()))


def section_mixing(args, results) -> None:
    """Integrated autocorrelation time, ESS and split R-hat of the gibbs network's energy, per sweep."""
    z = random_logits(32, args.seed)
    values, _, valid = reduce_vocabulary(z[None])
    log_probs = centred_log_probs(values, valid, 1.0)
    chains, sweeps, burn_in = 64, 600, 100
    rows = []
    for lam in tqdm((1.0, 2.0, 5.0, 8.0), desc="mixing"):
        network = OneHotNetwork(log_probs.expand(chains, -1), valid.expand(chains, -1), penalty=lam)
        y, s = network.empty_state()
        uniform = UniformSource(chains, args.seed)
        trace = []
        for sweep in range(burn_in + sweeps):
            network.sweep(y, s, uniform, "random")
            if sweep >= burn_in:
                # beta E(y) = -sum_k log p_k y_k + beta lam (S - 1)^2: finite for every state, one-hot or not.
                trace.append(-(network.log_probs_t * y).sum(0) + lam * (s - 1) ** 2)
        energy = torch.stack(trace, dim=1).double()   # [chains, sweeps]
        rows.append({"lambda": lam, "tau_sweeps": autocorrelation_time(energy),
                     "ess_per_1000_sweeps": 1000 * effective_sample_size(energy) / energy.numel(),
                     "split_rhat": split_rhat(energy), "rank_split_rhat": split_rhat(energy, rank_normalized=True)})
    results["mixing"] = {"vocab": 32, "chains": chains, "sweeps": sweeps, "burn_in": burn_in, "rows": rows}
    print_table(f"Mixing of gibbs (random scan, V=32): energy trace of {chains} chains x {sweeps} sweeps", rows, [
        ("lambda", "lambda", ".0f"), ("tau_sweeps", "tau (sweeps)", ".1f"),
        ("ess_per_1000_sweeps", "ESS/1000 sw", ".1f"), ("split_rhat", "split R", ".3f"),
        ("rank_split_rhat", "rank R", ".3f")])


def section_histogram(args, results) -> None:
    z = random_logits(32, args.seed)
    probs = torch.softmax(z.double(), 0)
    order = probs.argsort(descending=True)
    configs = [("original lam=5", {"mode": "original", "lam": 5.0})] + mode_configs()[:5]
    assert len(configs) == 6
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5), sharey=True)
    for ax, (name, config) in zip(axes.flat, tqdm(configs, desc="histograms")):
        tokens = PBitSampler(**config).sample(z, args.n, generator=args.seed)
        empirical = empirical_distribution(tokens[tokens >= 0], 32)
        x = torch.arange(32)
        ax.bar(x - 0.2, probs[order], width=0.4, label="softmax", color="tab:gray")
        ax.bar(x + 0.2, empirical[order], width=0.4, label="sampled", color="tab:blue")
        ax.set_title(f"{name}\nTV={float(total_variation(empirical, probs)):.3f}", fontsize=9)
        ax.set_xlabel("token (by probability)")
    axes[0, 0].set_ylabel("probability")
    axes[0, 0].legend()
    fig.suptitle(f"Sampled histogram against softmax (V=32, n={args.n})")
    fig.tight_layout()
    fig.savefig(args.plot_dir / "pbit_histograms.png", dpi=120)
    plt.close(fig)
    results["histogram"] = {"png": str(args.plot_dir / "pbit_histograms.png")}


def section_calibrate(args, results) -> None:
    z = random_logits(32, args.seed)
    probs = torch.softmax(z.double(), 0)
    rows = []
    for lam in tqdm(args.calibrate_lambdas, desc="calibrate lambda"):
        sampler = PBitSampler("gibbs", lam=lam, sweeps=args.calibrate_sweeps)
        metrics = evaluate(sampler.sample(z, args.n, generator=args.seed), probs)
        rows.append({"lambda": lam, "tv": metrics["tv"], "g_p_value": metrics["g_p_value"],
                     "invalid_rate": sampler.counters.invalid_rate, "fallback_rate": sampler.counters.fallback_rate})
    best = min(rows, key=lambda r: r["tv"])
    results["calibrate"] = {"sweeps": args.calibrate_sweeps, "rows": rows, "best_lambda": best["lambda"]}
    print_table(f"Calibration of gibbs lambda ({args.calibrate_sweeps} sweeps, V=32, n={args.n})", rows, [
        ("lambda", "lambda", ".2f"), ("tv", "TV", ".4f"), ("g_p_value", "G p", ".3f"),
        ("invalid_rate", "invalid", ".4f"), ("fallback_rate", "fallback", ".4f")])
    print(f"best lambda for gibbs at {args.calibrate_sweeps} sweeps: {best['lambda']} (TV {best['tv']:.4f})")


def section_large(args, results) -> None:
    z = random_logits(1000, args.seed, scale=2.0)
    rows = compare_modes(z, args.n, args.seed, (0.0,), 1, "modes V=1000", sequential=False,
                         gibbs_n=args.large_gibbs_n)
    results["large"] = {"vocab": 1000, "n": args.n, "logit_scale": 2.0, "rows": rows}
    print_table(f"Every mode at V=1000 (logits N(0, 2^2)), n={args.n} ({args.large_gibbs_n} for gibbs)", rows,
                MODE_COLUMNS[:1] + [("n", "n", "d")] + MODE_COLUMNS[2:])


def section_smollm2(args, results) -> None:
    from qllm_evals.models import load_causal_lm

    model, tokenizer = load_causal_lm(args.model)
    rows = []
    for prompt in tqdm(PROMPTS, desc="smollm2 prompts"):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1].float()
        for row in compare_modes(logits, args.n, args.seed, (0.0,), 1, "modes", top_k=50, sequential=False):
            rows.append({"prompt": prompt[:24].replace("\n", " "), **row})
    results["smollm2"] = {"model": args.model, "top_k": 50, "n": args.n, "rows": rows}
    print_table(f"SmolLM2 next-token logits, top-k 50, n={args.n}", rows,
                [("prompt", "prompt", "")] + MODE_COLUMNS[:1] + MODE_COLUMNS[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000, help="samples per configuration")
    parser.add_argument("--seed", type=int, default=0, help="base seed of every sampler run")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats for the exact modes (median)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: the per-bit ops are tiny, more threads only sync)")
    parser.add_argument("--calibrate", action="store_true", help="search the best lambda for gibbs mode")
    parser.add_argument("--calibrate-sweeps", type=int, default=100, help="sweeps per draw in the lambda search")
    parser.add_argument("--calibrate-lambdas", type=float, nargs="+", help="lambda values tried by --calibrate",
                        default=[0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0])
    parser.add_argument("--large-gibbs-n", type=int, default=2000,
                        help="draws for gibbs at V=1000 (100 sweeps of 1,000 single-bit updates each)")
    parser.add_argument("--no-model", action="store_true", help="skip the SmolLM2 section")
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="model of the smollm2 section (load_causal_lm name)")
    parser.add_argument("--sections", nargs="+", help="which parts to run (default: all)",
                        default=["original", "modes", "sweeps", "mixing", "histogram", "large", "smollm2"],
                        choices=["original", "modes", "sweeps", "mixing", "histogram", "large", "smollm2"])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench_results" / "pbit_experiment.json",
                        help="where the JSON results are written")
    parser.add_argument("--plot-dir", type=Path, default=None, help="PNG directory (default: next to --out)")
    args = parser.parse_args()
    if args.n < 1:
        parser.error("--n must be >= 1")
    torch.set_num_threads(args.threads)
    args.plot_dir = args.plot_dir or args.out.parent
    args.plot_dir.mkdir(parents=True, exist_ok=True)
    sections = [s for s in args.sections if not (s == "smollm2" and args.no_model)]
    if args.calibrate:
        sections.insert(1, "calibrate")
    results = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "torch": torch.__version__, "threads": torch.get_num_threads(), "modes": list(MODES)}
    runners = {"original": section_original, "modes": section_modes, "sweeps": section_sweeps,
               "mixing": section_mixing,
               "histogram": section_histogram, "calibrate": section_calibrate, "large": section_large,
               "smollm2": section_smollm2}
    for name in sections:
        start = time.perf_counter()
        runners[name](args, results)
        results.setdefault("seconds", {})[name] = time.perf_counter() - start
        save(results, args.out)
    print(f"\nwrote {args.out} and PNGs in {args.plot_dir}")


if __name__ == "__main__":
    main()
