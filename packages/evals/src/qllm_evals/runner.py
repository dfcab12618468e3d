"""The evaluation loop: every sampler on the same problems with the same seeds, resumable and shardable.

A run is a directory::

    config.json                    what was asked (model and its weights' identity, task, samplers, n, seeds,
                                   budget, a hash of the problems)
    samples.jsonl                  one JSON line per (sampler, seed, problem), appended as batches finish
    samples.shard-I-of-N.jsonl     the same, for shard I of a --shard I/N run
    .lock-I-of-N                   held (fcntl.flock) by the one process writing that samples file
    summary.json results.md accuracy.png      written when the work is complete (or by merge())

Resuming: the records already on disk (in any samples*.jsonl of the directory) are skipped, so a killed run
continues where it stopped and nothing is recomputed; a half-written last line is dropped. A directory whose
config.json differs from the current configuration (a swap of the weights at the same path included) is
refused, never mixed; a second process on the same samples file is refused while the first runs.

Seeding: the sample for (seed s, problem p) draws from a per-row stream seeded by hash(s, p.id), identical for
every sampler and independent of batching and sharding (``RowRNG`` rows do not interact).

``run_eval`` is the steps below in order: ``plan_run`` (validate everything once, load the problems, fix the run
directory), ``lock_shard``, ``pending_units`` (resume), then per batch ``decode_batch``, ``grade_rows`` and
``append_records``, and finally ``merge`` (summarise).
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from qllm_evals.errors import ConfigError
from qllm_evals.models import chat_prompt_ids, hub_offline, left_pad, model_identity, resolve_device
from qllm_evals.report import write_report
from qllm_samplers.specs import SamplerSpec, parse_samplers

FORMAT_VERSION = 2  # 2: config.json records the model's identity; records carry the sampler's own stats

# Every record has these keys with these types; anything else in a samples file is refused with file and line.
RECORD_FIELDS: dict[str, type | tuple[type, ...]] = {
    "sampler": str, "sampler_id": str, "seed": int, "problem_id": str, "completion": str, "correct": bool,
    "new_tokens": int, "seconds": (int, float), "stopped": bool,
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class EvalConfig:
    """What to evaluate; every field is checked here, once (a ``ConfigError`` names the field)."""

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
        if not isinstance(self.model, str) or not self.model.strip():
            raise ConfigError("model", f"must be a model name or path, got {self.model!r}")
        if (not isinstance(self.seeds, (list, tuple)) or not self.seeds or len(set(self.seeds)) != len(self.seeds)
                or not all(_is_int(s) and s >= 0 for s in self.seeds)):
            raise ConfigError("seeds", f"must be a non-empty list of distinct ints >= 0, got {self.seeds!r}")
        self.seeds = list(self.seeds)
        if self.n is not None and not (_is_int(self.n) and self.n >= 1):
            raise ConfigError("n", f"must be an int >= 1 (or None for the task's default), got {self.n!r}")
        if self.max_new_tokens is not None and not (_is_int(self.max_new_tokens) and self.max_new_tokens >= 1):
            raise ConfigError("max_new_tokens", f"must be an int >= 1 (or None for the task's default), "
                                                f"got {self.max_new_tokens!r}")
        if not (_is_int(self.problem_seed) and self.problem_seed >= 0):
            raise ConfigError("problem_seed", f"must be an int >= 0, got {self.problem_seed!r}")
        if not isinstance(self.task_options, dict):
            raise ConfigError("task_options", f"must be a dict of task fields, got {self.task_options!r}")


def parse_shard(text: str | None) -> tuple[int, int]:
    """'2/4' -> (2, 4): shard 2 of 4 (0-based); None -> (0, 1)."""
    if text is None:
        return 0, 1
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ConfigError("shard", f"must look like I/N (e.g. 0/4), got {text!r}") from None
    if not (count >= 1 and 0 <= index < count):
        raise ConfigError("shard", f"I/N needs N >= 1 and 0 <= I < N, got {text!r}")
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


def _task_options(task) -> dict:
    if dataclasses.is_dataclass(task):
        return {f.name: getattr(task, f.name) for f in dataclasses.fields(task) if f.name != "name"}
    return {"max_new_tokens": task.max_new_tokens, "use_chat_template": task.use_chat_template}


# ------------------------------------------------------------------------------------------------ run dir


def _check_record(record: Any, where: str) -> dict:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object (one sample), got {type(record).__name__}")
    for key, kind in RECORD_FIELDS.items():
        if key not in record:
            raise ValueError(f"{where}: record has no {key!r} (expected keys: {', '.join(RECORD_FIELDS)})")
        value = record[key]
        ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        if not ok:
            names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise ValueError(f"{where}: {key!r} must be {names}, got {value!r}")
    return record


def read_records(run_dir: Path) -> list[dict]:
    """All per-sample records of a run directory (every samples*.jsonl), a torn final line ignored.

    A line that is not UTF-8, not JSON, or not a record of the expected shape raises ValueError naming the file
    and line (a torn last line, the mark of a kill during a write, is dropped instead).
    """
    records = []
    for path in sorted(Path(run_dir).glob("samples*.jsonl")):
        data = path.read_bytes()
        lines = data.split(b"\n")
        for lineno, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            torn = lineno == len(lines)  # the last line without its newline: a write cut by a kill
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                if torn:
                    continue
                raise ValueError(f"{path}:{lineno}: not UTF-8 (byte {error.start}: {raw[error.start:error.start + 1]!r}"
                                 f"); delete the line to continue") from error
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                if torn:
                    continue
                raise ValueError(f"{path}:{lineno}: corrupt record ({error.msg}); delete the line to continue") \
                    from error
            records.append(_check_record(record, f"{path}:{lineno}"))
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
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: not a readable run configuration ({error}); delete the directory") from error
        if saved != identity:
            raise ConfigError("out", (
                f"run directory {run_dir} holds a run with a different configuration; refusing to mix results. "
                f"Use another --name/--out, or delete the directory. Differences: " + "; ".join(_diff(saved, identity))
            ))
        return
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(identity, indent=2) + "\n")
    os.replace(tmp, path)  # atomic, so concurrent shards either see no config or a whole one


@contextmanager
def lock_shard(run_dir: Path, shard: tuple[int, int]) -> Iterator[None]:
    """Hold an OS lock on one shard of ``run_dir`` for as long as its samples file is written.

    ``fcntl.flock`` is released by the kernel when the holder exits, however it exits, so a killed run never
    leaves a stale lock behind. Different shards of one run lock different files and run side by side.
    """
    index, count = shard
    path = Path(run_dir) / f".lock-{index}-of-{count}"
    handle = open(path, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise ConfigError("out", f"run directory {run_dir} (shard {index}/{count}) is being written by {holder}; "
                                     f"refusing to write it twice. Wait for it to finish, or use another "
                                     f"--name/--out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        yield
    finally:
        handle.close()  # closing the descriptor releases the lock


# ------------------------------------------------------------------------------------------------ plan


class Unit(NamedTuple):
    """One sample to produce: a sampler, a seed, the index of a problem."""

    spec: SamplerSpec
    seed: int
    index: int


@dataclass
class RunPlan:
    """Everything ``run_eval`` decided before touching a model: problems, samplers, the directory, the work."""

    config: EvalConfig
    task: Any
    problems: list
    specs: list[SamplerSpec]
    samplers: dict[str, Any]  # canonical id -> built sampler
    identity: dict  # what config.json holds
    run_dir: Path
    shard: tuple[int, int]
    units: list[Unit]  # the whole run, in a fixed order
    max_new_tokens: int
    batch_size: int
    device: torch.device
    offline: bool

    @property
    def mine(self) -> list[Unit]:
        """This shard's units: every N-th, so each shard gets a share of every sampler."""
        index, count = self.shard
        return [unit for k, unit in enumerate(self.units) if k % count == index]

    @property
    def samples_path(self) -> Path:
        index, count = self.shard
        return self.run_dir / ("samples.jsonl" if count == 1 else f"samples.shard-{index}-of-{count}.jsonl")

    @property
    def expected(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for unit in self.units:
            counts[unit.spec.canonical] = counts.get(unit.spec.canonical, 0) + 1
        return counts


def _build_task(config: EvalConfig):
    from qllm_evals.tasks import get_task

    options = dict(config.task_options)
    if config.max_new_tokens is not None:
        options["max_new_tokens"] = config.max_new_tokens
    try:
        return get_task(config.task, **options)
    except ValueError as error:
        argument = "task" if str(error).startswith("unknown task") else "task_options"
        raise ConfigError(argument, str(error)) from error
    except TypeError as error:  # a task's own __post_init__ given a value of the wrong type
        raise ConfigError("task_options", f"{config.task}: {error}") from error


def _load_problems(task, config: EvalConfig, data_dir: Path | None) -> list:
    if data_dir is not None and not Path(data_dir).is_dir():
        raise ConfigError("data_dir", f"{data_dir} is not a directory (it should hold the offline data, e.g. "
                                      f"gsm8k/test.jsonl)")
    try:
        problems = task.load(n=config.n, seed=config.problem_seed, data_dir=data_dir)
    except FileNotFoundError as error:
        raise ConfigError("data_dir", str(error)) from error
    except ValueError as error:
        argument = "n" if str(error).startswith("n must") else "data_dir"
        raise ConfigError(argument, str(error)) from error
    if len({p.id for p in problems}) != len(problems):
        raise ValueError(f"task {config.task!r} returned duplicate problem ids")
    return problems


def plan_run(config: EvalConfig, out: Path, *, name: str | None = None, shard: str | None = None,
             batch_size: int = 16, task=None, data_dir: Path | None = None, device: str | None = None,
             model_given: bool = False, offline: bool | None = None) -> RunPlan:
    """Validate every setting (once, before any model loads), load the problems, create or check the run dir.

    Bad values raise ``ConfigError`` naming the argument. ``model_given``: the caller brings its own model
    object, so the model's identity is read from ``config.model`` without contacting the hub.
    """
    if not _is_int(batch_size) or batch_size < 1:
        raise ConfigError("batch_size", f"must be an int >= 1, got {batch_size!r}")
    shard_index, shard_count = parse_shard(shard)
    resolved_device = resolve_device(device)
    offline = hub_offline() if offline is None else offline
    try:
        specs = parse_samplers(config.samplers)
        samplers = {spec.canonical: spec.build() for spec in specs}  # bad sampler values fail before any model
    except ValueError as error:
        raise ConfigError("samplers", str(error)) from error
    if task is None:
        task = _build_task(config)
    max_new_tokens = config.max_new_tokens or task.max_new_tokens
    problems = _load_problems(task, config, data_dir)
    weights = model_identity(config.model, offline=offline or model_given)
    if weights["kind"] == "hub" and weights["revision"] is None and offline and not model_given:
        raise ConfigError("model", f"{config.model!r} is not a local path or a known short name, and it is not in "
                                   f"the local hub cache; offline it cannot be loaded")
    identity = {
        "format_version": FORMAT_VERSION, "model": config.model, "model_identity": weights, "task": config.task,
        "task_options": {k: v for k, v in sorted(_task_options(task).items()) if k != "max_new_tokens"},
        "samplers": [spec.config() for spec in specs], "n": len(problems), "seeds": list(config.seeds),
        "max_new_tokens": max_new_tokens, "problem_seed": config.problem_seed,
        "system_prompt": config.system_prompt, "problems_sha256": _problems_hash(problems),
    }
    config_hash = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    run_dir = Path(out) / (name or f"{config.task}-{Path(config.model).stem}-{config_hash}")
    prepare_run_dir(run_dir, identity)
    # A deterministic sampler runs the first seed only: other seeds could not change its output.
    units = [Unit(spec, seed, index) for spec in specs
             for seed in (config.seeds[:1] if spec.deterministic else config.seeds) for index in range(len(problems))]
    return RunPlan(config, task, problems, specs, samplers, identity, run_dir, (shard_index, shard_count), units,
                   max_new_tokens, batch_size, resolved_device, offline)


def pending_units(plan: RunPlan) -> list[Unit]:
    """Resume: this shard's units that no samples file of the run directory holds yet."""
    done = {(r["sampler_id"], r["seed"], r["problem_id"]) for r in read_records(plan.run_dir)}
    return [u for u in plan.mine if (u.spec.canonical, u.seed, plan.problems[u.index].id) not in done]


# ------------------------------------------------------------------------------------------------ decode


def eos_token_ids(model, tokenizer) -> list[int]:
    """EOS ids from the tokenizer and the model's generation config (chat models often end turns differently)."""
    ids = []
    for value in (getattr(tokenizer, "eos_token_id", None),
                  getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        for item in ([value] if isinstance(value, int) else list(value or [])):
            if item not in ids:
                ids.append(item)
    return ids


def encode_prompt(tokenizer, prompt: str, use_chat_template: bool, system: str | None) -> list[int]:
    if use_chat_template:
        return chat_prompt_ids(tokenizer, [prompt], system=system)[0]
    return tokenizer(prompt)["input_ids"]


@contextmanager
def count_model_calls(model: torch.nn.Module, callback: Callable[[], None] | None) -> Iterator[None]:
    """Call ``callback()`` after every forward call of ``model`` (a decode step, a proposal's token, a
    lookahead), whatever the sampler: progress per token without the sampler knowing about it."""
    if callback is None:
        yield
        return
    handle = model.register_forward_hook(lambda module, args, output: callback())
    try:
        yield
    finally:
        handle.remove()


def _row_value(value: Any, row: int, batch: int) -> Any:
    """One row's share of a sampler statistic: a per-row tensor gives its row, a batch-level number stays."""
    if isinstance(value, torch.Tensor):
        if value.ndim == 0:
            return value.item()
        if value.shape[0] != batch:
            return None
        item = value[row]
        return item.item() if item.ndim == 0 else item.tolist()
    if isinstance(value, (bool, int, float, str)):
        return value
    return None


@torch.no_grad()
def decode_batch(sampler, model, prompt_ids: list[list[int]], *, pad_token_id: int, eos_ids: list[int],
                 max_new_tokens: int, seeds: list[int], on_model_call: Callable[[], None] | None = None) -> list[dict]:
    """One continuation per prompt through ``qllm_samplers.generate`` (any sampler kind); per-row dicts with
    the tokens, whether the row stopped at EOS, and the sampler's statistics for that row."""
    from qllm_samplers.generate import generate

    device = next(model.parameters()).device
    input_ids, mask = left_pad(prompt_ids, pad_token_id)
    with count_model_calls(model, on_model_call):
        out = generate(model, input_ids.to(device), sampler=sampler, max_new_tokens=max_new_tokens,
                       attention_mask=mask.to(device), eos_token_id=eos_ids or None, generator=seeds)
    batch = len(prompt_ids)
    # one copy to the host per batch, not one read per row and statistic
    new, lengths = out.new_tokens.cpu(), out.lengths.tolist()
    log_p, forward_tokens = out.log_p.cpu(), out.forward_tokens.cpu()
    stats = {key: value.cpu() if isinstance(value, torch.Tensor) else value for key, value in out.stats.items()}
    rows = []
    for row in range(batch):
        tokens = new[row, :lengths[row]].tolist()
        row_stats = {key: _row_value(value, row, batch) for key, value in stats.items()}
        row_stats.setdefault("log_p", float(log_p[row]))
        row_stats["forward_tokens"] = _row_value(forward_tokens, row, batch)
        rows.append({"tokens": tokens, "stopped": bool(tokens) and tokens[-1] in eos_ids,
                     "stats": {k: v for k, v in row_stats.items() if v is not None}})
    return rows


def grade_rows(plan: RunPlan, tokenizer, units: list[Unit], rows: list[dict], *, seconds: float,
               row_seeds: list[int]) -> list[dict]:
    """Decode and grade each row; the records that go to the samples file."""
    records = []
    for unit, row, seed in zip(units, rows, row_seeds):
        problem = plan.problems[unit.index]
        completion = tokenizer.decode(row["tokens"], skip_special_tokens=True)
        grade = plan.task.grade(problem, completion)
        records.append({
            "sampler": unit.spec.label, "sampler_id": unit.spec.canonical, "seed": unit.seed,
            "problem_id": problem.id, "problem_index": unit.index, "meta": _short_meta(problem.meta),
            "reference": problem.reference, "completion": completion, "correct": bool(grade["correct"]),
            "pred": grade.get("pred"), "reason": grade.get("reason", ""), "new_tokens": len(row["tokens"]),
            "stopped": row["stopped"], "seconds": seconds, "batch_rows": len(units), "row_seed": seed,
            "stats": row["stats"], "shard": f"{plan.shard[0]}/{plan.shard[1]}",
        })
    return records


def append_records(sink, records: list[dict]) -> None:
    """Append whole lines and fsync: a batch is either on disk or recomputed, never half-lost."""
    sink.write("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    sink.flush()
    os.fsync(sink.fileno())


class _Progress:
    """A bar over samples that moves on every model call, so a long batch (power sampling) shows its pace.

    Within a batch the share done is model calls / the calls this sampler's previous batch took (the budget
    before the first one), capped below the whole batch, which lands when the batch's records are written.
    """

    def __init__(self, total: int, done: int, desc: str, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=done, unit="sample", desc=desc, smoothing=0.05,
                            bar_format="{l_bar}{bar}| {n:.1f}/{total} [{elapsed}<{remaining}, {rate_fmt}{postfix}]")
        self.calls_per_batch: dict[str, int] = {}
        self.correct: dict[str, list[bool]] = {}

    def start_batch(self, sampler: str, rows: int, budget: int) -> None:
        self.sampler, self.rows, self.calls, self.moved = sampler, rows, 0, 0.0
        self.expected = max(self.calls_per_batch.get(sampler, budget), 1)

    def model_call(self) -> None:
        self.calls += 1
        if self.bar is not None:
            share = min(self.calls / self.expected, 0.95) * self.rows
            self.bar.update(share - self.moved)
            self.moved = share
            self.bar.set_postfix_str(f"{self.sampler}, model call {self.calls}/~{self.expected}", refresh=False)

    def end_batch(self, records: list[dict]) -> None:
        self.calls_per_batch[self.sampler] = max(self.calls, self.calls_per_batch.get(self.sampler, 0))
        scores = self.correct.setdefault(self.sampler, [])
        scores.extend(r["correct"] for r in records)
        if self.bar is not None:
            self.bar.update(self.rows - self.moved)
            self.bar.set_postfix_str(f"{self.sampler}, acc {sum(scores) / len(scores):.2f}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _batches(plan: RunPlan, pending: list[Unit], prompt_ids: Callable[[int], list[int]]) -> Iterator[list[Unit]]:
    """Pending units grouped by (sampler, seed), longest prompts first (less padding; a too-long prompt fails
    at once), cut into batches."""
    for spec in plan.specs:
        for seed in plan.config.seeds:
            todo = sorted((u for u in pending if u.spec is spec and u.seed == seed),
                          key=lambda u: -len(prompt_ids(u.index)))
            for first in range(0, len(todo), plan.batch_size):
                yield todo[first:first + plan.batch_size]


def execute_run(plan: RunPlan, *, model=None, tokenizer=None, progress: bool = True, chart: bool = True,
                log=print) -> dict:
    """Produce this shard's missing samples (loading the model only if there are any), then summarise when the
    run is complete. Returns {"run_dir", "summary" (None until complete), "done", "total", "seconds"}."""
    start = time.perf_counter()
    with lock_shard(plan.run_dir, plan.shard):
        pending = pending_units(plan)
        mine = plan.mine
        log(f"run directory: {plan.run_dir}")
        log(f"{len(plan.units)} samples in all, {len(mine)} in shard {plan.shard[0]}/{plan.shard[1]}, "
            f"{len(mine) - len(pending)} already done, {len(pending)} to go")
        if pending:
            if model is None or tokenizer is None:
                from qllm_evals.models import load_causal_lm

                model, tokenizer = load_causal_lm(plan.config.model, device=plan.device, offline=plan.offline)
            _decode_pending(plan, pending, model, tokenizer,
                            _Progress(len(mine), len(mine) - len(pending), plan.config.task, progress))
    elapsed = time.perf_counter() - start
    finished = len({(r["sampler_id"], r["seed"], r["problem_id"]) for r in read_records(plan.run_dir)
                    if r["sampler_id"] in plan.expected})
    result = {"run_dir": plan.run_dir, "summary": None, "done": finished, "total": len(plan.units),
              "seconds": elapsed}
    if finished >= len(plan.units):
        result["summary"] = merge(plan.run_dir, chart=chart)
    else:
        log(f"{finished}/{len(plan.units)} samples on disk: the summary is written when all shards are done "
            f"(or run merge on {plan.run_dir})")
    return result


def _decode_pending(plan: RunPlan, pending: list[Unit], model, tokenizer, bar: _Progress) -> None:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos_ids = eos_token_ids(model, tokenizer)
    encoded: dict[int, list[int]] = {}

    def prompt_ids(index: int) -> list[int]:
        if index not in encoded:
            encoded[index] = encode_prompt(tokenizer, plan.problems[index].prompt, plan.task.use_chat_template,
                                           plan.config.system_prompt)
        return encoded[index]

    _repair_tail(plan.samples_path)
    try:
        with open(plan.samples_path, "a", encoding="utf-8") as sink:
            for batch in _batches(plan, pending, prompt_ids):
                spec = batch[0].spec
                seeds = [row_seed(unit.seed, plan.problems[unit.index].id) for unit in batch]
                bar.start_batch(spec.label, len(batch), plan.max_new_tokens)
                tick = time.perf_counter()
                rows = decode_batch(plan.samplers[spec.canonical], model, [prompt_ids(u.index) for u in batch],
                                    pad_token_id=pad_id, eos_ids=eos_ids, max_new_tokens=plan.max_new_tokens,
                                    seeds=seeds, on_model_call=bar.model_call)
                seconds = (time.perf_counter() - tick) / len(batch)
                records = grade_rows(plan, tokenizer, batch, rows, seconds=seconds, row_seeds=seeds)
                append_records(sink, records)
                bar.end_batch(records)
    finally:
        bar.close()


def run_eval(config: EvalConfig, out: Path, *, name: str | None = None, shard: str | None = None,
             batch_size: int = 16, model=None, tokenizer=None, task=None, data_dir: Path | None = None,
             device: str | None = None, offline: bool | None = None, progress: bool = True, chart: bool = True,
             log=print) -> dict:
    """Run (or resume) an evaluation; returns {"run_dir", "summary" (None until complete), "done", "total"}.

    ``model``/``tokenizer``/``task`` may be given already built (tests, notebooks); otherwise they are loaded
    from ``config.model`` (``load_causal_lm`` on ``device``, default CUDA when available) and ``config.task``
    (``get_task``). ``offline`` (default ``HF_HUB_OFFLINE``): never contact the hub.
    """
    plan = plan_run(config, out, name=name, shard=shard, batch_size=batch_size, task=task, data_dir=data_dir,
                    device=device, model_given=model is not None, offline=offline)
    return execute_run(plan, model=model, tokenizer=tokenizer, progress=progress, chart=chart, log=log)


# ------------------------------------------------------------------------------------------------ summarise


def merge(run_dir: Path, *, allow_incomplete: bool = False, chart: bool = True) -> dict:
    """Combine the shards of ``run_dir`` into summary.json / results.md / accuracy.png.

    Every expected sample must be present once (duplicates of one key must agree) unless ``allow_incomplete``.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise ConfigError("merge", f"{run_dir} is not a run directory (no config.json)")
    identity = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
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
        raise ConfigError("merge", f"{run_dir} has {len(unique)} of {total} samples; finish the missing shards (or "
                                   f"pass allow_incomplete / --allow-incomplete for a partial summary)")
    return write_report(run_dir, identity, [unique[key] for key in sorted(unique, key=str)], expected, chart=chart,
                        notes=_config_notes(identity))


# Task options a reader of the results must see stated beside them: option -> the note (when the option is true).
WARNING_OPTIONS = {
    "allow_unsandboxed": "run with --unsafe-no-sandbox: where bubblewrap was unavailable, model-written code ran "
                         "without the sandbox, with the harness user's access to this machine.",
}


def _config_notes(identity: dict) -> list[str]:
    options = identity.get("task_options", {})
    return [note for option, note in WARNING_OPTIONS.items() if options.get(option)]


def _deterministic(sampler_config: dict) -> bool:
    return SamplerSpec(sampler_config["label"], sampler_config["name"], sampler_config["params"]).deterministic
