"""Compare samplers on a task with a real model, offline by default.

    .venv/bin/python scripts/eval.py             # the embedded default: SmolLM2-135M, arithmetic suite, greedy vs
                                                 # temperature 0.25 vs power sampling (MH) vs PowerSMC
    .venv/bin/python scripts/eval.py --n 7 --seeds 0 --max-new-tokens 16     # a quick first run
    .venv/bin/python scripts/eval.py --model smollm2-135m-instruct --task gsm8k \\
        --samplers greedy,temp:0.25,power:alpha=4 --n 100 --seeds 0,1,2 --out results/
    .venv/bin/python scripts/eval.py ... --shard 0/4      # one of 4 processes/machines (same arguments otherwise)
    .venv/bin/python scripts/eval.py --merge results/gsm8k-...   # combine the shards' samples into the summary

Results go to OUT/NAME/ (OUT defaults to results/ in the repository, NAME to TASK-MODEL-HASH of the
configuration; both are printed): per-sample JSONL written as it goes (Ctrl-C, then rerun the same command to
resume), summary.json, results.md, accuracy.png.

Sampler specs (comma-separated; settings inside a spec use ':' so they never clash with the list):
{samplers}
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import difflib
import json
import os
import resource
import shlex
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

REPO_ROOT = Path(__file__).resolve().parents[1]  # scripts know the monorepo layout; the libraries do not

# The embedded default (no arguments): sized for about 10 minutes on 2 quiet CPU cores with SmolLM2-135M.
# 147 problems = 21 per arithmetic level; greedy runs once (seeds cannot change it), the other samplers twice.
# Measured on a quiet 2-core machine: 84 problems took 4 min 47 s (model loading from the de-quantized cache
# included; MH costs about 4x temp:0.25 per sample, PowerSMC with 4 particles about 1.2x), so 147 fit the budget.
DEFAULTS = {
    "model": "smollm2-135m-instruct",
    "task": "arith",
    "samplers": "greedy,temp:0.25,power:alpha=4:steps=2:blocks=4,power-smc:alpha=4:particles=4",
    "n": 147,
    "seeds": "0,1",
    "max_new_tokens": 48,
}

# The runner's ConfigError names a keyword argument; this is the flag a user of this script typed instead.
FLAGS = {
    "model": "--model", "task": "--task", "samplers": "--samplers", "n": "--n", "seeds": "--seeds",
    "max_new_tokens": "--max-new-tokens", "problem_seed": "--problem-seed", "task_options": "--task-option",
    "batch_size": "--batch-size", "shard": "--shard", "data_dir": "--data-dir", "device": "--device",
    "out": "--out/--name", "merge": "--merge",
}
UNSANDBOXED_OPTION = "allow_unsandboxed"  # the HumanEval task's switch behind --unsafe-no-sandbox


class SuggestingParser(argparse.ArgumentParser):
    """argparse that answers a mistyped flag with the closest real one."""

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            options = [o for action in self._actions for o in action.option_strings if o.startswith("--")]
            for extra in extras:
                flag = extra.split("=", 1)[0]
                if flag.startswith("-"):
                    match = difflib.get_close_matches(flag, options, n=1, cutoff=0.6)
                    hint = f"; did you mean {match[0]}?" if match else f"; valid flags: {', '.join(options)}"
                    self.error(f"unrecognized argument {flag}{hint}")
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from qllm_evals.tasks import TASKS
    from qllm_samplers.specs import sampler_help

    parser = SuggestingParser(description=__doc__.format(samplers=sampler_help()),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULTS["model"],
                        help="short name (smollm2-135m-instruct), HF hub name, local HF directory or .gguf file "
                             "(default: %(default)s)")
    parser.add_argument("--task", default=DEFAULTS["task"], help=f"one of: {', '.join(TASKS)} (default: %(default)s)")
    parser.add_argument("--samplers", default=DEFAULTS["samplers"],
                        help="comma-separated sampler specs, see below; the first is the baseline of the paired "
                             "comparisons (default: %(default)s)")
    parser.add_argument("--n", type=int, default=DEFAULTS["n"],
                        help="problems; 0: the task's whole set (default: %(default)s)")
    parser.add_argument("--seeds", default=DEFAULTS["seeds"],
                        help="comma-separated sampling seeds, e.g. 0,1,2 (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help=f"generation budget (default: {DEFAULTS['max_new_tokens']} for the default arith "
                             f"run, else the task's own)")
    parser.add_argument("--problem-seed", type=int, default=0,
                        help="which problems, for tasks that subsample or generate them (default: 0)")
    parser.add_argument("--task-option", action="append", default=[], metavar="KEY=JSON",
                        help="a task dataclass field, value in JSON: --task-option 'levels=[1,2,3]'; a text field "
                             "may be given bare: --task-option prompt_style=boxed (repeatable)")
    parser.add_argument("--system-prompt", default=None, help="system message for chat templates (default: none)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="prompts per generate call; results do not depend on it (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results",
                        help="parent directory of run directories (default: results/ in the repository)")
    parser.add_argument("--name", default=None, help="run directory name (default: TASK-MODEL-CONFIGHASH)")
    parser.add_argument("--shard", default=None, metavar="I/N", help="do shard I of N (0-based) of the work")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="offline data directory (default: $QLLM_SHARED_DATA, else ../shared/data next to the "
                             "repository)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; on a busy machine 1 is often faster)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    parser.add_argument("--offline", action="store_true",
                        help="never contact the Hugging Face hub (also HF_HUB_OFFLINE=1; without either, the hub "
                             "is used only if it answers within a second)")
    parser.add_argument("--unsafe-no-sandbox", action="store_true",
                        help="humaneval: run model-written code even where bubblewrap is unavailable (UNSAFE: with "
                             "your user's access to this machine); the summary says so")
    parser.add_argument("--merge", type=Path, default=None, metavar="RUN_DIR",
                        help="only combine the samples of RUN_DIR (all shards) into its summary and exit")
    parser.add_argument("--allow-incomplete", action="store_true", help="with --merge: summarise a partial run")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def _fail(message: str) -> SystemExit:
    return SystemExit(f"error: {message}")


def _config_failure(error: ValueError) -> SystemExit:
    from qllm_evals.errors import ConfigError

    if isinstance(error, ConfigError):
        return _fail(f"{FLAGS.get(error.argument, error.argument)}: {error.message}")
    return _fail(str(error))


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise _fail(f"--seeds must be comma-separated integers such as 0,1,2, got {text!r}") from None


def _task_options(items: list[str], task_name: str) -> dict:
    """KEY=JSON pairs; a bare word is accepted only for a text field of the task (prompt_style=boxed)."""
    from qllm_evals.tasks import TASKS

    field_types = ({f.name: str(f.type) for f in dataclasses.fields(TASKS[task_name])}
                   if task_name in TASKS else {})
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise _fail(f"--task-option must be KEY=JSON, e.g. 'levels=[1,2]', got {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            if key in field_types and "str" not in field_types[key]:
                example = f"[{value}]" if "," in value else json.dumps(value)
                raise _fail(f"--task-option {item!r}: the value of {key} ({field_types[key]}) must be JSON, "
                            f"e.g. {key}={example}") from None
            options[key] = value  # a text field, or an unknown key that the task will name
    return options


def _hub_answers(timeout: float = 1.0) -> bool:
    """Whether the hub's host accepts a TCP connection within ``timeout`` (the name lookup included)."""
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"

    def connect() -> bool:
        with socket.create_connection((host, 443), timeout=timeout):
            return True

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(connect).result(timeout=timeout)
    except (OSError, concurrent.futures.TimeoutError):
        return False
    finally:
        pool.shutdown(wait=False)  # a lookup stuck in the resolver must not hold the script


def decide_offline(flag: bool) -> bool:
    """--offline or HF_HUB_OFFLINE, else offline when the hub does not answer: then no library retries."""
    from qllm_evals.models import hub_offline

    offline = flag or hub_offline() or not _hub_answers()
    if offline:
        # Read by huggingface_hub and datasets when they are imported, which happens later, on first use.
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
    return offline


def default_data_dir() -> Path | None:
    """The library's default ($QLLM_SHARED_DATA), else the monorepo's ../shared/data, when it is a directory."""
    from qllm_evals.tasks.base import default_data_dir as library_default

    path = library_default() or REPO_ROOT.parent / "shared" / "data"
    return path if path.is_dir() else None


def print_summary(run_dir: Path) -> None:
    print()
    print((run_dir / "results.md").read_text())
    print(f"results: {run_dir}/results.md, summary.json, accuracy.png, samples*.jsonl")


def _command_line() -> str:
    return " ".join(shlex.quote(part) for part in [sys.executable, *sys.argv])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from qllm_evals.runner import EvalConfig, execute_run, merge, plan_run

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.merge is not None:
        try:
            merge(args.merge, allow_incomplete=args.allow_incomplete)
        except ValueError as error:
            raise _config_failure(error) from None
        print_summary(args.merge)
        return 0
    offline = decide_offline(args.offline)
    is_default_task = args.task == DEFAULTS["task"]
    options = _task_options(args.task_option, args.task)
    if args.unsafe_no_sandbox:
        options[UNSANDBOXED_OPTION] = True
    try:
        config = EvalConfig(model=args.model, task=args.task, samplers=args.samplers.split(","),
                            n=args.n or None, seeds=_seeds(args.seeds),
                            max_new_tokens=args.max_new_tokens or (DEFAULTS["max_new_tokens"] if is_default_task
                                                                   else None),
                            problem_seed=args.problem_seed, task_options=options, system_prompt=args.system_prompt)
        plan = plan_run(config, args.out, name=args.name, shard=args.shard, batch_size=args.batch_size,
                        data_dir=args.data_dir or default_data_dir(), device=args.device, offline=offline)
    except ValueError as error:  # every setting is checked there, before a model loads
        if args.unsafe_no_sandbox and UNSANDBOXED_OPTION in str(error):
            raise _fail(f"--unsafe-no-sandbox applies to tasks that run model-written code (humaneval), "
                        f"not to --task {args.task}") from None
        raise _config_failure(error) from None
    start = time.perf_counter()
    try:
        result = execute_run(plan, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished batches are saved in {plan.run_dir}; run the same command again to resume: "
              f"{_command_line()}", file=sys.stderr)
        return 130
    except ValueError as error:  # a second process on this shard, a model that cannot load, a corrupt record
        raise _config_failure(error) from None
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(f"wall time {time.perf_counter() - start:.0f} s, CPU time {usage.ru_utime + usage.ru_stime:.0f} s "
          f"(model loading included), torch threads {torch.get_num_threads()}, device {plan.device}"
          + (", offline" if offline else ""))
    if result["summary"] is not None:
        print_summary(result["run_dir"])
    else:
        print(f"shard done: {result['done']}/{result['total']} samples on disk in {result['run_dir']}; when every "
              f"shard has finished: .venv/bin/python scripts/eval.py --merge {result['run_dir']}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # before the run started (imports, planning): nothing to resume yet
        print("\ninterrupted before any sample was generated", file=sys.stderr)
        sys.exit(130)
