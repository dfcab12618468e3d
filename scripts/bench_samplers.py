"""Benchmark qllm_samplers' classic warpers and sample step against transformers' processors, side by side.

Part 1 (always): top-k, top-p, min-p and the full sample step (warp + draw) at B=32 on CPU for each vocabulary
size, ours vs transformers' processors (+ softmax + torch.multinomial for the draw), timed interleaved in the
same run; medians over repeats. Every measured call is also checked: the kept sets must be identical.

Part 2 (--generation): generation tokens/s of ``qllm_samplers.generate.generate`` vs ``model.generate`` on
SmolLM2-135M-Instruct with the same sampler settings.

    .venv/bin/python scripts/bench_samplers.py                      # part 1, about 2-4 minutes on 2 cores
    .venv/bin/python scripts/bench_samplers.py --quick --out /tmp/bench_quick.json   # a few seconds: checks only

Top-p rows are decided by one of three paths (column "paths": candidates/histogram/sort): the top-k candidates
(peaked rows), the probability histogram (flat rows; no sort), or the exact sort (boundaries within rounding
distance, exact ties at the cut).
    .venv/bin/python scripts/bench_samplers.py --generation         # both parts
    .venv/bin/python scripts/bench_samplers.py --only-generation --out bench_results/bench_generation.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import LogitsProcessorList
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from qllm_samplers.chain import SamplingChain
from qllm_samplers.rng import RowRNG
from qllm_samplers.warpers import (
    MinP,
    TopK,
    TopP,
    candidate_probs,
    canonical_topk,
    nucleus_by_histogram,
    nucleus_count,
    top_p_threshold,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def synthetic_logits(batch: int, vocab: int, kind: str, seed: int) -> torch.Tensor:
    """``peaked``: Gaussian logits with a per-row scale in [3, 8] (nuclei of 1 to a few thousand tokens, like
    an LM's); ``flat``: scale 1 (the nucleus holds most of the vocabulary, far beyond the top-k candidates)."""
    g = torch.Generator().manual_seed(seed)
    low, high = (3.0, 8.0) if kind == "peaked" else (1.0, 1.0)
    scale = low + (high - low) * torch.rand(batch, 1, generator=g)
    return torch.randn(batch, vocab, generator=g) * scale


def hf_sample(processors: LogitsProcessorList, scores: torch.Tensor) -> torch.Tensor:
    """What transformers' generate does per step when sampling (its processors do not modify scores)."""
    warped = processors(None, scores)
    return torch.multinomial(torch.softmax(warped, dim=-1), num_samples=1).squeeze(1)


def full_support(chain: SamplingChain, scores: torch.Tensor) -> torch.Tensor:
    """The kept set [B, V] that chain.sample draws from."""
    plan = chain.plan(None, scores)
    if plan.ids is None:
        kept = torch.isfinite(plan.logits)
    else:
        kept = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, plan.ids, torch.isfinite(plan.logits))
    if plan.fallback.numel():
        kept[plan.fallback] = torch.isfinite(plan.fallback_logits)
    return kept


def top_p_paths(scores: torch.Tensor, top_p: float, candidates: int = 512) -> str:
    """How many rows each top-p path decides: "candidates/histogram/sort" (what ``top_p_fast`` does)."""
    batch, vocab = scores.shape
    threshold = top_p_threshold(torch.full((batch,), top_p, dtype=torch.float64))
    values, ids = canonical_topk(scores, min(candidates, vocab))
    probs, tail = candidate_probs(scores, ids)
    _, ok, _ = nucleus_count(values, probs, tail, vocab, threshold, 1)
    pending = (~ok).nonzero()[:, 0]
    by_histogram = 0
    if pending.numel():
        _, decided = nucleus_by_histogram(scores[pending], threshold[pending], 1)
        by_histogram = int(decided.sum())
    return f"{int(ok.sum())}/{by_histogram}/{pending.numel() - by_histogram}"


def time_pair(ours, theirs, repeats: int) -> tuple[list[float], list[float]]:
    """Interleaved timings (ours, theirs, ours, ...) after one warm-up call each."""
    ours(), theirs()
    t_ours, t_theirs = [], []
    for _ in range(repeats):
        for fn, bucket in ((ours, t_ours), (theirs, t_theirs)):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return t_ours, t_theirs


def warper_cases():
    yield "top-k (k=50)", TopK(50), TopKLogitsWarper(50)
    yield "top-p (p=0.9)", TopP(0.9), TopPLogitsWarper(0.9)
    yield "min-p (p=0.05)", MinP(0.05), MinPLogitsWarper(0.05)


def sample_cases():
    yield ("sample T=0.7 top-p=0.9", SamplingChain(temperature=0.7, top_p=0.9),
           LogitsProcessorList([TemperatureLogitsWarper(0.7), TopPLogitsWarper(0.9)]))
    yield ("sample T=0.7 top-k=50 top-p=0.9", SamplingChain(temperature=0.7, top_k=50, top_p=0.9),
           LogitsProcessorList([TemperatureLogitsWarper(0.7), TopKLogitsWarper(50), TopPLogitsWarper(0.9)]))
    yield ("sample T=0.7 min-p=0.05", SamplingChain(temperature=0.7, min_p=0.05),
           LogitsProcessorList([TemperatureLogitsWarper(0.7), MinPLogitsWarper(0.05)]))


def bench_warpers(args, results: list, save) -> None:
    jobs = [(v, kind) for v in args.vocab for kind in args.kinds]
    for vocab, kind in tqdm(jobs, desc="warpers", file=sys.stderr):
        scores = synthetic_logits(args.batch, vocab, kind, args.seed)
        for name, ours, theirs in warper_cases():
            identical = torch.equal(ours(None, scores.clone()), theirs(None, scores.clone()))
            t_ours, t_theirs = time_pair(partial(ours, None, scores), partial(theirs, None, scores), args.repeats)
            rec = record(name, vocab, kind, args.batch, t_ours, t_theirs, identical)
            if isinstance(ours, TopP):
                rec["paths"] = top_p_paths(scores, 0.9)
            results.append(rec)
            save()
        rng = RowRNG(torch.arange(args.batch) + args.seed)
        for name, chain, processors in sample_cases():
            kept_ours = full_support(chain, scores)
            kept_theirs = torch.isfinite(processors(None, scores.clone()))
            identical = torch.equal(kept_ours, kept_theirs)
            plan = chain.plan(None, scores)
            t_ours, t_theirs = time_pair(partial(chain.sample, None, scores, rng),
                                         partial(hf_sample, processors, scores), args.repeats)
            rec = record(name, vocab, kind, args.batch, t_ours, t_theirs, identical)
            rec["fallback_rows"] = int(plan.fallback.numel())
            results.append(rec)
            save()


def record(name, vocab, kind, batch, t_ours, t_theirs, identical) -> dict:
    ours, theirs = statistics.median(t_ours), statistics.median(t_theirs)
    return {"op": name, "vocab": vocab, "logits": kind, "batch": batch, "ours_s": ours, "transformers_s": theirs,
            "speedup": theirs / ours, "kept_sets_identical": identical, "repeats": len(t_ours)}


def bench_generation(args, results: list, save) -> None:
    from qllm_evals.models import load_causal_lm
    from qllm_samplers.generate import generate

    model, tokenizer = load_causal_lm(args.model)
    questions = ["What is 12 + 7? Answer briefly.", "Write a haiku about the sea.", "Name three prime numbers.",
                 "Explain what a cache is in one sentence.", "What is the capital of France?",
                 "Give me a synonym for happy.", "How many legs does a spider have?", "Translate 'cat' to French."]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True) for q in questions]
    settings = dict(temperature=0.7, top_k=50, top_p=0.9)
    chain = SamplingChain(**settings)
    for batch in tqdm(args.gen_batch, desc="generation", file=sys.stderr):
        enc = tokenizer(texts[:batch] * (batch // len(texts) + 1), return_tensors="pt", padding=True)
        ids, mask = enc["input_ids"][:batch], enc["attention_mask"][:batch]
        new = args.new_tokens

        ours = partial(generate, model, ids, attention_mask=mask, sampler=chain, max_new_tokens=new,
                       generator=list(range(batch)))
        theirs = partial(model.generate, input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=new,
                         min_new_tokens=new, pad_token_id=tokenizer.pad_token_id, **settings)
        assert ours().sequences.shape[1] == theirs().shape[1] == ids.shape[1] + new  # same work: no early stop
        t_ours, t_theirs = time_pair(ours, theirs, args.gen_repeats)
        tokens = batch * new
        results.append({"op": "generate", "model": args.model, "batch": batch, "new_tokens": new,
                        "sampler": settings, "ours_tokens_per_s": tokens / statistics.median(t_ours),
                        "transformers_tokens_per_s": tokens / statistics.median(t_theirs),
                        "ratio": statistics.median(t_theirs) / statistics.median(t_ours),
                        "repeats": args.gen_repeats})
        save()


def print_table(results: list) -> None:
    rows = [r for r in results if r["op"] != "generate"]
    if rows:
        print(f"\n{'op':34s} {'V':>7s} {'logits':>7s} {'ours ms':>9s} {'HF ms':>9s} {'speedup':>8s} "
              f"{'same kept':>9s} {'fallback':>8s} {'paths':>10s}")
        for r in rows:
            print(f"{r['op']:34s} {r['vocab']:7d} {r['logits']:>7s} {1e3 * r['ours_s']:9.1f} "
                  f"{1e3 * r['transformers_s']:9.1f} {r['speedup']:7.2f}x {str(r['kept_sets_identical']):>9s} "
                  f"{str(r.get('fallback_rows', '')):>8s} {r.get('paths', ''):>10s}")
    gen = [r for r in results if r["op"] == "generate"]
    if gen:
        print(f"\n{'generation (' + gen[0]['model'] + ')':34s} {'batch':>5s} {'ours tok/s':>11s} {'HF tok/s':>9s} "
              f"{'ours/HF':>8s}")
        for r in gen:
            print(f"{'T=0.7 top-k=50 top-p=0.9, ' + str(r['new_tokens']) + ' new':34s} {r['batch']:5d} "
                  f"{r['ours_tokens_per_s']:11.1f} {r['transformers_tokens_per_s']:9.1f} {r['ratio']:7.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32, help="rows per warper call (B)")
    parser.add_argument("--vocab", type=int, nargs="+", default=[49_152, 151_936], help="vocabulary sizes (V) to time")
    parser.add_argument("--kinds", nargs="+", default=["peaked", "flat"], choices=["peaked", "flat"],
                        help="row kinds: peaked (LM-like logits) and flat (near-uniform, a wide nucleus)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per measurement (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic logits")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes (B=4, V=3000 and 20000, 1 repeat): checks that everything runs and agrees")
    parser.add_argument("--generation", action="store_true", help="also benchmark generation on SmolLM2")
    parser.add_argument("--only-generation", action="store_true", help="skip part 1 (implies --generation)")
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="model for the generation part (load_causal_lm name)")
    parser.add_argument("--gen-batch", type=int, nargs="+", default=[1, 8], help="batch sizes of the generation part")
    parser.add_argument("--new-tokens", type=int, default=64,
                        help="new tokens per generation run (EOS off: equal lengths)")
    parser.add_argument("--gen-repeats", type=int, default=3, help="timed repeats per generation configuration")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench_results" / "bench_samplers.json",
                        help="where the JSON results are written")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.vocab, args.repeats = 4, [3000, 20_000], 1
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    results: list = []
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "batch": args.batch,
            "command": " ".join(sys.argv)}

    def save() -> None:  # after every measurement, so nothing is lost if the run is killed
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))

    with torch.no_grad():
        if not args.only_generation:
            bench_warpers(args, results, save)
        if args.generation or args.only_generation:
            bench_generation(args, results, save)
    print_table(results)
    print(f"\nwrote {args.out}")
    if not all(r.get("kept_sets_identical", True) for r in results):
        raise SystemExit("kept sets differ from transformers'")


if __name__ == "__main__":
    main()
