"""The evaluation loop: every sampler on the same problems with the same seeds, resumable and shardable.

A run is a directory::

    config.json                    what was asked (model, task, samplers, n, seeds, budget, a hash of the problems)
    samples.jsonl                  one JSON line per (sampler, seed, problem), appended as batches finish
    samples.shard-I-of-N.jsonl     the same, for shard I of a --shard I/N run
    summary.json results.md accuracy.png      written when the work is complete (or by merge())

Resuming: the records already on disk (in any samples*.jsonl of the directory) are skipped, so a killed run
continues where it stopped and nothing is recomputed; a half-written last line is dropped. A directory whose
config.json differs from the current configuration is refused, never mixed.

Seeding: the sample for (seed s, problem p) draws from a per-row stream seeded by hash(s, p.id), identical for
every sampler and independent of batching and sharding (``RowRNG`` rows do not interact).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qllm_evals.models import chat_prompt_ids, left_pad
from qllm_evals.report import write_report
from qllm_samplers.specs import SamplerSpec, parse_samplers

FORMAT_VERSION = 1


@dataclass
class EvalConfig:
    model: str
    task: str
    samplers: list[str]
    n: int | None = None  # problems (None: the task's default set)
    seeds: list[int] = field(default_factory=lambda: [0])
    max_new_tokens: int | None = None  # None: the task's default budget
    problem_seed: int = 0  # which problems (for tasks that subsample or generate them)
    task_options: dict = field(default_factory=dict)
    system_prompt: str | None = None

    def __post_init__(self):
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be a non-empty list of distinct ints, got {self.seeds!r}")
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds):
            raise ValueError(f"seeds must be ints >= 0, got {self.seeds!r}")
        if self.n is not None and (isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1):
            raise ValueError(f"n must be an int >= 1 (or None for the task's default), got {self.n!r}")
        if self.max_new_tokens is not None and (not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1):
            raise ValueError(f"max_new_tokens must be an int >= 1 (or None for the task's default), "
                             f"got {self.max_new_tokens!r}")


def parse_shard(text: str | None) -> tuple[int, int]:
    """'2/4' -> (2, 4): shard 2 of 4 (0-based); None -> (0, 1)."""
    if text is None:
        return 0, 1
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"shard must look like I/N (e.g. 0/4), got {text!r}") from None
    if not (count >= 1 and 0 <= index < count):
        raise ValueError(f"shard I/N needs N >= 1 and 0 <= I < N, got {text!r}")
    return index, count


def row_seed(seed: int, problem_id: str) -> int:
    """The random stream of one (seed, problem): a stable 62-bit hash, the same for every sampler."""
    digest = hashlib.blake2b(f"{seed}\x00{problem_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 62) - 1)


def _problems_hash(problems) -> str:
    h = hashlib.sha256()
    for p in problems:
        h.update(json.dumps([p.id, p.prompt, p.reference], ensure_ascii=False).encode())
    return h.hexdigest()


def _short_meta(meta: dict) -> dict:
    # Scalars only: task metadata can hold whole test programs, which do not belong in every record.
    return {k: v for k, v in meta.items()
            if isinstance(v, (int, float, bool)) or (isinstance(v, str) and len(v) <= 120)}


# ------------------------------------------------------------------------------------------------ run dir


def read_records(run_dir: Path) -> list[dict]:
    """All per-sample records of a run directory (every samples*.jsonl), a torn final line ignored."""
    records = []
    for path in sorted(Path(run_dir).glob("samples*.jsonl")):
        lines = path.read_text(encoding="utf-8").split("\n")
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                if lineno == len(lines):  # the last line without its newline: a write cut by a kill
                    continue
                raise ValueError(f"{path}:{lineno}: corrupt record ({error.msg}); delete the line to continue") \
                    from error
    return records


def _repair_tail(path: Path) -> None:
    """Cut a half-written last line so that the next append starts on a fresh line."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)


def _diff(old: dict, new: dict) -> list[str]:
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def prepare_run_dir(run_dir: Path, identity: dict) -> None:
    """Create the run directory with its config.json, or check that an existing one has the same configuration."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved != identity:
            raise ValueError(
                f"output directory {run_dir} holds a run with a different configuration; refusing to mix results. "
                f"Use another --name/--out, or delete the directory. Differences: " + "; ".join(_diff(saved, identity))
            )
        return
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(identity, indent=2) + "\n")
    os.replace(tmp, path)  # atomic, so concurrent shards either see no config or a whole one


# ------------------------------------------------------------------------------------------------ generation


def eos_token_ids(model, tokenizer) -> list[int]:
    """EOS ids from the tokenizer and the model's generation config (chat models often end turns differently)."""
    ids = []
    for value in (getattr(tokenizer, "eos_token_id", None),
                  getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        for item in ([value] if isinstance(value, int) else list(value or [])):
            if item not in ids:
                ids.append(item)
    return ids


@torch.no_grad()
def generate_batch(spec: SamplerSpec, sampler, model, prompt_ids: list[list[int]], *, pad_token_id: int,
                   eos_ids: list[int], max_new_tokens: int, seeds: list[int]) -> list[dict]:
    """Generate one continuation per prompt; returns per-row dicts with tokens, count, stop flag, stats."""
    device = next(model.parameters()).device
    input_ids, mask = left_pad(prompt_ids, pad_token_id)
    input_ids, mask = input_ids.to(device), mask.to(device)
    if spec.kind == "sequence":
        out = sampler.generate(model, input_ids, max_new_tokens, attention_mask=mask, eos_token_id=eos_ids or None,
                               generator=seeds)
    else:
        from qllm_samplers.generate import generate

        out = generate(model, input_ids, sampler=sampler, max_new_tokens=max_new_tokens, attention_mask=mask,
                       eos_token_id=eos_ids or None, generator=seeds, pad_token_id=pad_token_id)
    new = out.sequences[:, out.prompt_length:].cpu()
    rows = []
    for row in range(len(prompt_ids)):
        length = int(out.lengths[row])
        tokens = new[row, :length].tolist()
        stats = {}
        if hasattr(out, "accepted"):  # power sampling: MH acceptance and the work it took
            stats = {"mh_proposed": int(out.proposed[row]), "mh_accepted": int(out.accepted[row]),
                     "forward_tokens": int(out.forward_tokens[row]), "log_p": float(out.log_p[row])}
        elif getattr(out, "logprobs", None) is not None:
            stats = {"log_p": float(out.logprobs[row, :length].double().sum())}
        rows.append({"tokens": tokens, "stopped": bool(tokens) and tokens[-1] in eos_ids, "stats": stats})
    return rows


def encode_prompt(tokenizer, prompt: str, use_chat_template: bool, system: str | None) -> list[int]:
    if use_chat_template:
        return chat_prompt_ids(tokenizer, [prompt], system=system)[0]
    return tokenizer(prompt)["input_ids"]


# ------------------------------------------------------------------------------------------------ the loop


def _task_options(task) -> dict:
    if dataclasses.is_dataclass(task):
        return {f.name: getattr(task, f.name) for f in dataclasses.fields(task) if f.name != "name"}
    return {"max_new_tokens": task.max_new_tokens, "use_chat_template": task.use_chat_template}


def run_eval(config: EvalConfig, out: Path, *, name: str | None = None, shard: str | None = None,
             batch_size: int = 16, model=None, tokenizer=None, task=None, data_dir: Path | None = None,
             progress: bool = True, chart: bool = True, log=print) -> dict:
    """Run (or resume) an evaluation; returns {"run_dir", "summary" (None until complete), "done", "total"}.

    ``model``/``tokenizer``/``task`` may be given already built (tests, notebooks); otherwise they are loaded
    from ``config.model`` (``load_causal_lm``) and ``config.task`` (``get_task``).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    shard_index, shard_count = parse_shard(shard)
    specs = parse_samplers(config.samplers)
    samplers = {spec.canonical: spec.build() for spec in specs}  # bad sampler values fail before any model loads
    if task is None:
        from qllm_evals.tasks import get_task

        options = dict(config.task_options)
        if config.max_new_tokens is not None:
            options["max_new_tokens"] = config.max_new_tokens
        task = get_task(config.task, **options)
    max_new_tokens = config.max_new_tokens or task.max_new_tokens
    problems = task.load(n=config.n, seed=config.problem_seed, data_dir=data_dir)
    if len({p.id for p in problems}) != len(problems):
        raise ValueError(f"task {config.task!r} returned duplicate problem ids")
    identity = {
        "format_version": FORMAT_VERSION, "model": config.model, "task": config.task,
        "task_options": {k: v for k, v in sorted(_task_options(task).items()) if k != "max_new_tokens"},
        "samplers": [spec.config() for spec in specs], "n": len(problems), "seeds": list(config.seeds),
        "max_new_tokens": max_new_tokens, "problem_seed": config.problem_seed,
        "system_prompt": config.system_prompt, "problems_sha256": _problems_hash(problems),
    }
    config_hash = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    run_dir = Path(out) / (name or f"{config.task}-{Path(config.model).stem}-{config_hash}")
    prepare_run_dir(run_dir, identity)

    # Work units in a fixed order; shard i takes every n-th, so each shard gets a share of every sampler.
    units = [(spec, seed, index) for spec in specs for seed in (config.seeds[:1] if spec.deterministic
                                                                 else config.seeds)
             for index in range(len(problems))]
    expected = {}
    for spec, _, _ in units:
        expected[spec.canonical] = expected.get(spec.canonical, 0) + 1
    mine = [unit for k, unit in enumerate(units) if k % shard_count == shard_index]
    done = {(r["sampler_id"], r["seed"], r["problem_id"]) for r in read_records(run_dir)}
    pending = [u for u in mine if (u[0].canonical, u[1], problems[u[2]].id) not in done]
    log(f"run directory: {run_dir}")
    log(f"{len(units)} samples in all, {len(mine)} in shard {shard_index}/{shard_count}, "
        f"{len(mine) - len(pending)} already done, {len(pending)} to go")

    start = time.perf_counter()
    if pending:
        if model is None or tokenizer is None:
            from qllm_evals.models import load_causal_lm

            model, tokenizer = load_causal_lm(config.model)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        eos_ids = eos_token_ids(model, tokenizer)
        prompt_ids = {}
        samples_path = run_dir / ("samples.jsonl" if shard_count == 1 else
                                  f"samples.shard-{shard_index}-of-{shard_count}.jsonl")
        _repair_tail(samples_path)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(mine), initial=len(mine) - len(pending), unit="sample", desc=config.task)
        correct_so_far: dict[str, list[int]] = {}
        with open(samples_path, "a", encoding="utf-8") as sink:
            for spec in specs:
                for seed in config.seeds:
                    todo = [u[2] for u in pending if u[0] is spec and u[1] == seed]
                    if not todo:
                        continue
                    for index in todo:
                        if index not in prompt_ids:
                            prompt_ids[index] = encode_prompt(tokenizer, problems[index].prompt,
                                                              task.use_chat_template, config.system_prompt)
                    # Longest prompts first: less padding per batch, and a too-long prompt fails at once.
                    todo.sort(key=lambda i: -len(prompt_ids[i]))
                    for first in range(0, len(todo), batch_size):
                        batch = todo[first:first + batch_size]
                        seeds = [row_seed(seed, problems[i].id) for i in batch]
                        tick = time.perf_counter()
                        rows = generate_batch(spec, samplers[spec.canonical], model, [prompt_ids[i] for i in batch],
                                              pad_token_id=pad_id, eos_ids=eos_ids, max_new_tokens=max_new_tokens,
                                              seeds=seeds)
                        seconds = (time.perf_counter() - tick) / len(batch)
                        lines = []
                        for index, row in zip(batch, rows):
                            problem = problems[index]
                            completion = tokenizer.decode(row["tokens"], skip_special_tokens=True)
                            grade = task.grade(problem, completion)
                            record = {
                                "sampler": spec.label, "sampler_id": spec.canonical, "seed": seed,
                                "problem_id": problem.id, "problem_index": index, "meta": _short_meta(problem.meta),
                                "reference": problem.reference, "completion": completion,
                                "correct": bool(grade["correct"]), "pred": grade.get("pred"),
                                "reason": grade.get("reason", ""), "new_tokens": len(row["tokens"]),
                                "stopped": row["stopped"], "seconds": seconds, "batch_rows": len(batch),
                                "row_seed": seeds[batch.index(index)], "stats": row["stats"],
                                "shard": f"{shard_index}/{shard_count}",
                            }
                            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
                            correct_so_far.setdefault(spec.label, []).append(record["correct"])
                        sink.write("".join(lines))
                        sink.flush()
                        os.fsync(sink.fileno())  # a batch is either on disk or recomputed, never half-lost
                        if bar is not None:
                            scores = correct_so_far[spec.label]
                            bar.set_postfix(sampler=spec.label, seed=seed, acc=f"{sum(scores) / len(scores):.2f}",
                                            refresh=False)
                            bar.update(len(batch))
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - start

    finished = len({(r["sampler_id"], r["seed"], r["problem_id"]) for r in read_records(run_dir)
                    if r["sampler_id"] in expected})
    result = {"run_dir": run_dir, "summary": None, "done": finished, "total": len(units), "seconds": elapsed}
    if finished >= len(units):
        result["summary"] = merge(run_dir, chart=chart)
    else:
        log(f"{finished}/{len(units)} samples on disk: the summary is written when all shards are done "
            f"(or run merge on {run_dir})")
    return result


def merge(run_dir: Path, *, allow_incomplete: bool = False, chart: bool = True) -> dict:
    """Combine the shards of ``run_dir`` into summary.json / results.md / accuracy.png.

    Every expected sample must be present once (duplicates of one key must agree) unless ``allow_incomplete``.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise ValueError(f"merge: {run_dir} is not a run directory (no config.json)")
    identity = json.loads((run_dir / "config.json").read_text())
    records = read_records(run_dir)
    unique: dict[tuple, dict] = {}
    for record in records:
        key = (record["sampler_id"], record["seed"], record["problem_id"])
        if key in unique and unique[key]["completion"] != record["completion"]:
            raise ValueError(f"merge: two different completions for {key} in {run_dir}; the shards disagree")
        unique.setdefault(key, record)
    expected = {}
    for sampler in identity["samplers"]:
        seeds = identity["seeds"][:1] if _deterministic(sampler) else identity["seeds"]
        expected[sampler["canonical"]] = len(seeds) * identity["n"]
    total = sum(expected.values())
    if len(unique) < total and not allow_incomplete:
        raise ValueError(f"merge: {run_dir} has {len(unique)} of {total} samples; finish the missing shards (or "
                         f"pass allow_incomplete / --allow-incomplete for a partial summary)")
    return write_report(run_dir, identity, [unique[key] for key in sorted(unique, key=str)], expected, chart=chart)


def _deterministic(sampler_config: dict) -> bool:
    from qllm_samplers.specs import SamplerSpec

    return SamplerSpec(sampler_config["label"], sampler_config["name"], sampler_config["params"]).deterministic
