"""Compare samplers on a task with a real model, offline by default.

    python scripts/eval.py                     # the embedded default: SmolLM2-135M, arithmetic suite,
                                               # greedy vs temperature 0.25 vs power sampling (~10 min, 2 cores)
    python scripts/eval.py --model smollm2-135m-instruct --task gsm8k \\
        --samplers greedy,temp:0.25,power:alpha=4,alpha,pbit --n 100 --seeds 0,1,2 --out results/
    python scripts/eval.py ... --shard 0/4     # one of 4 processes/machines (same arguments otherwise)
    python scripts/eval.py --merge results/gsm8k-...   # combine the shards' samples into the summary

Results go to OUT/NAME/ (NAME defaults to TASK-MODEL-HASH of the configuration): per-sample JSONL written as it
goes (rerun the same command to resume a killed run), summary.json, results.md, accuracy.png.

Sampler specs (comma-separated; settings inside a spec use ':' so they never clash with the list):
{samplers}
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

from qllm_evals.models import DEFAULT_MODEL
from qllm_evals.runner import EvalConfig, merge, parse_shard, run_eval
from qllm_samplers.specs import parse_samplers, sampler_help

REPO_ROOT = Path(__file__).resolve().parents[1]

# The embedded default (no arguments): sized for about 10 minutes on 2 quiet CPU cores with SmolLM2-135M.
# 105 problems = 15 per arithmetic level (42 took 3.5 min on 2 quiet cores); greedy runs once (seeds cannot
# change it), the other samplers twice.
DEFAULTS = {
    "model": DEFAULT_MODEL,
    "task": "arith",
    "samplers": "greedy,temp:0.25,power:alpha=4:steps=2:blocks=4",
    "n": 105,
    "seeds": "0,1",
    "max_new_tokens": 48,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from qllm_evals.tasks import TASKS

    parser = argparse.ArgumentParser(description=__doc__.format(samplers=sampler_help()),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULTS["model"], help="short name, HF hub name, local dir or .gguf")
    parser.add_argument("--task", default=DEFAULTS["task"], help=f"one of: {', '.join(TASKS)}")
    parser.add_argument("--samplers", default=DEFAULTS["samplers"], help="comma-separated sampler specs")
    parser.add_argument("--n", type=int, default=DEFAULTS["n"], help="problems (0: the task's whole set)")
    parser.add_argument("--seeds", default=DEFAULTS["seeds"], help="comma-separated sampling seeds")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help=f"generation budget (default: {DEFAULTS['max_new_tokens']} for the default arith "
                             f"run, else the task's own)")
    parser.add_argument("--problem-seed", type=int, default=0, help="which problems (subsampling/generation)")
    parser.add_argument("--task-option", action="append", default=[], metavar="KEY=JSON",
                        help="task dataclass field, e.g. --task-option 'levels=[1,2,3]' (repeatable)")
    parser.add_argument("--system-prompt", default=None, help="system message for chat templates")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per generate call")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results", help="parent directory of runs")
    parser.add_argument("--name", default=None, help="run directory name (default: TASK-MODEL-CONFIGHASH)")
    parser.add_argument("--shard", default=None, metavar="I/N", help="do shard I of N (0-based) of the work")
    parser.add_argument("--data-dir", type=Path, default=None, help="offline data (default: ../shared/data)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    parser.add_argument("--merge", type=Path, default=None, metavar="RUN_DIR",
                        help="only combine the samples of RUN_DIR (all shards) into its summary and exit")
    parser.add_argument("--allow-incomplete", action="store_true", help="with --merge: summarise a partial run")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--seeds must be comma-separated integers, got {text!r}") from None


def _task_options(items: list[str]) -> dict:
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--task-option must be KEY=VALUE, got {item!r}")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options


def print_summary(summary: dict, run_dir: Path) -> None:
    print()
    print((run_dir / "results.md").read_text())
    print(f"results: {run_dir}/results.md, summary.json, accuracy.png, samples*.jsonl")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.merge is not None:
        try:
            summary = merge(args.merge, allow_incomplete=args.allow_incomplete)
        except ValueError as error:
            raise SystemExit(f"error: {error}") from error
        print_summary(summary, args.merge)
        return 0
    try:
        parse_samplers(args.samplers)  # a typo fails here, before the model loads
        parse_shard(args.shard)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    is_default_task = args.task == DEFAULTS["task"]
    max_new_tokens = args.max_new_tokens or (DEFAULTS["max_new_tokens"] if is_default_task else None)
    config = EvalConfig(model=args.model, task=args.task, samplers=args.samplers.split(","),
                        n=args.n or None, seeds=_seeds(args.seeds), max_new_tokens=max_new_tokens,
                        problem_seed=args.problem_seed, task_options=_task_options(args.task_option),
                        system_prompt=args.system_prompt)
    model = tokenizer = None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device != "cpu":
        from qllm_evals.models import load_causal_lm

        model, tokenizer = load_causal_lm(args.model, device=device)
    start = time.perf_counter()
    try:
        result = run_eval(config, args.out, name=args.name, shard=args.shard, batch_size=args.batch_size,
                          model=model, tokenizer=tokenizer, data_dir=args.data_dir, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as error:  # bad names, refused run directories, missing data
        raise SystemExit(f"error: {error}") from error
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(f"wall time {time.perf_counter() - start:.0f} s, CPU time {usage.ru_utime + usage.ru_stime:.0f} s "
          f"(model loading included), torch threads {torch.get_num_threads()}")
    if result["summary"] is not None:
        print_summary(result["summary"], result["run_dir"])
    else:
        print(f"shard done: {result['done']}/{result['total']} samples on disk in {result['run_dir']}; when every "
              f"shard has finished: python scripts/eval.py --merge {result['run_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
