"""The evaluation loop on a tiny random model: records, resume after a kill, refusal of mixed runs, shards, the
run-directory lock, the model's identity, corrupt samples files, and the command line's errors."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from qllm_evals import models, runner
from qllm_evals.errors import ConfigError
from qllm_evals.report import bootstrap_interval, markdown_table, summarize
from qllm_evals.runner import EvalConfig, merge, parse_shard, read_records, row_seed, run_eval
from qllm_evals.tasks.base import Problem
from qllm_samplers.testing import tiny_bpe_tokenizer, tiny_gpt2

SAMPLERS = ["greedy", "temp:0.8", "power:alpha=2:steps=1:blocks=2"]
FAST = ["greedy", "temp:0.8"]  # where power sampling adds nothing to what a test checks


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer (300 ids), left padding, trained offline on a few sentences."""
    return tiny_bpe_tokenizer(["Count: 0 1 2 3 4 5 6 7 8 9 10. The answer is 11."] * 3, padding_side="left")


@dataclass
class ParityTask:
    """A fake task with a deterministic grade that a random model passes about half the time."""

    name: str = "parity"
    max_new_tokens: int = 6
    use_chat_template: bool = False

    def load(self, n=None, seed=0, data_dir=None):
        return [Problem(self.name, f"parity/{seed}/{i}", "Count: " + " ".join(str(j) for j in range(i % 5 + 1)),
                        "even", {"level": 1 + i % 2}) for i in range(n or 6)]

    def grade(self, problem, completion):
        even = sum(completion.encode()) % 2 == 0
        return {"correct": even, "pred": "even" if even else "odd", "reason": "byte-sum parity"}


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tiny_tokenizer()
    eos = tokenizer.eos_token_id
    return tiny_gpt2(len(tokenizer), n_positions=1024, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos), tokenizer


def run(tiny, out, *, seeds=(0, 1), n=6, batch_size=4, name="run", samplers=SAMPLERS, chart=False, **kwargs):
    model, tokenizer = tiny
    config = EvalConfig(model="tiny-gpt2", task="parity", samplers=list(samplers), n=n, seeds=list(seeds))
    return run_eval(config, out, name=name, batch_size=batch_size, model=model, tokenizer=tokenizer,
                    task=ParityTask(), progress=False, chart=chart, log=lambda *_: None, **kwargs)


@pytest.fixture(scope="module")
def full_run(tiny, tmp_path_factory):
    """Every sampler, 6 problems, seeds 0 and 1, batches of 4: the reference the other tests compare with."""
    return run(tiny, tmp_path_factory.mktemp("runs"), name="whole", chart=True)


def completions(run_dir: Path) -> dict:
    return {(r["sampler_id"], r["seed"], r["problem_id"]): r["completion"] for r in read_records(run_dir)}


def test_a_run_writes_records_summary_table_and_chart(full_run):
    result = full_run
    run_dir = result["run_dir"]
    records = read_records(run_dir)
    # greedy is deterministic, so it runs one seed; the other samplers run both: 6 + 12 + 12
    assert len(records) == result["total"] == 30
    assert {(r["sampler"], r["seed"]) for r in records} == {("greedy", 0), ("temp:0.8", 0), ("temp:0.8", 1),
                                                           ("power:alpha=2:steps=1:blocks=2", 0),
                                                           ("power:alpha=2:steps=1:blocks=2", 1)}
    assert all(1 <= r["new_tokens"] <= 6 and r["seconds"] > 0 for r in records)
    assert all(r["correct"] == (sum(r["completion"].encode()) % 2 == 0) for r in records)
    # the same (seed, problem) row seed for every sampler
    seeds = {(r["seed"], r["problem_id"]): r["row_seed"] for r in records if r["sampler"] == "temp:0.8"}
    assert all(r["row_seed"] == seeds[(r["seed"], r["problem_id"])] for r in records if r["sampler"] != "greedy")
    assert all(r["stats"]["proposed"] >= 1 for r in records if r["sampler"].startswith("power"))
    summary = json.loads((run_dir / "summary.json").read_text())
    for row in summary["samplers"]:
        mine = [r for r in records if r["sampler"] == row["sampler"]]
        assert row["accuracy"] == pytest.approx(sum(r["correct"] for r in mine) / len(mine))
        assert row["ci95"][0] <= row["accuracy"] <= row["ci95"][1]
        assert row["new_tokens_per_sample"] == pytest.approx(sum(r["new_tokens"] for r in mine) / len(mine))
    assert summary["samplers"][1]["pass_at_k"]["k"] == 2
    power = [r for r in records if r["sampler"].startswith("power")]
    assert summary["samplers"][2]["mh_acceptance"] == pytest.approx(
        sum(r["stats"]["accepted"] for r in power) / sum(r["stats"]["proposed"] for r in power))
    table = (run_dir / "results.md").read_text()
    assert all(f"`{s}`" in table for s in SAMPLERS) and "95% CI" in table and "L1" in table
    assert (run_dir / "accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_results_do_not_depend_on_batching(tiny, tmp_path, full_run):
    batched = completions(full_run["run_dir"])
    single = completions(run(tiny, tmp_path, name="b3", batch_size=3)["run_dir"])
    assert len(batched) == 30
    assert batched == single


def test_a_killed_run_resumes_without_recomputing(tiny, tmp_path, monkeypatch):
    reference = completions(run(tiny, tmp_path, name="whole", samplers=FAST)["run_dir"])
    result = run(tiny, tmp_path, name="killed", samplers=FAST)
    path = result["run_dir"] / "samples.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    # keep 13 whole records and half of the 14th, as a kill during a write would
    path.write_text("".join(lines[:13]) + lines[13][: len(lines[13]) // 2])
    (result["run_dir"] / "summary.json").unlink()
    generated = []
    real = runner.decode_batch

    def counting(*args, **kwargs):
        rows = real(*args, **kwargs)
        generated.append(len(rows))
        return rows

    monkeypatch.setattr(runner, "decode_batch", counting)
    resumed = run(tiny, tmp_path, name="killed", samplers=FAST)
    assert sum(generated) == 18 - 13
    assert completions(resumed["run_dir"]) == reference
    assert len(read_records(resumed["run_dir"])) == 18  # the torn line was dropped, not duplicated
    assert (resumed["run_dir"] / "summary.json").is_file()
    generated.clear()
    run(tiny, tmp_path, name="killed", samplers=FAST)  # a finished run is not recomputed
    assert generated == []


def test_a_directory_from_another_configuration_is_refused(tiny, tmp_path):
    run(tiny, tmp_path, name="same", samplers=["greedy"], seeds=(0,))
    with pytest.raises(ValueError, match=r"different configuration; refusing to mix.*seeds: \[0\] -> \[0, 1\]"):
        run(tiny, tmp_path, name="same", samplers=["greedy"], seeds=(0, 1))
    with pytest.raises(ValueError, match=r"different configuration.*samplers"):
        run(tiny, tmp_path, name="same", samplers=["temp:0.5"], seeds=(0,))


def test_shards_split_the_work_and_merge(tiny, tmp_path, full_run):
    reference = completions(full_run["run_dir"])
    first = run(tiny, tmp_path, name="sharded", shard="0/2")
    assert first["summary"] is None and first["done"] == 15
    with pytest.raises(ValueError, match=r"has 15 of 30 samples"):
        merge(first["run_dir"], chart=False)
    partial = merge(first["run_dir"], allow_incomplete=True, chart=False)
    assert not partial["complete"]
    second = run(tiny, tmp_path, name="sharded", shard="1/2")
    assert second["summary"] is not None and second["summary"]["complete"]
    assert completions(second["run_dir"]) == reference
    assert sorted(p.name for p in second["run_dir"].glob("samples*")) == ["samples.shard-0-of-2.jsonl",
                                                                         "samples.shard-1-of-2.jsonl"]
    assert merge(second["run_dir"], chart=False)["samplers"] == second["summary"]["samplers"]


def test_helpers():
    assert parse_shard(None) == (0, 1) and parse_shard("3/4") == (3, 4)
    for bad in ("4/4", "1", "a/b", "0/0"):
        with pytest.raises(ValueError, match="shard"):
            parse_shard(bad)
    assert row_seed(0, "p1") == row_seed(0, "p1") != row_seed(1, "p1") != row_seed(0, "p2")
    assert 0 <= row_seed(7, "x") < 2**62
    assert bootstrap_interval([1.0] * 10) == (1.0, 1.0)
    low, high = bootstrap_interval([0.0] * 5 + [1.0] * 5)
    assert 0.1 <= low < 0.5 < high <= 0.9
    with pytest.raises(ValueError, match="seeds: must be"):
        EvalConfig(model="m", task="t", samplers=["greedy"], seeds=[0, 0])
    with pytest.raises(ValueError, match="unknown task 'nope'; valid tasks: arith"):
        run_eval(EvalConfig(model="m", task="nope", samplers=["greedy"]), Path("/nonexistent"), progress=False)


def test_summary_counts_incomplete_samplers():
    records = [{"sampler": "greedy", "sampler_id": "greedy", "seed": 0, "problem_id": str(i), "correct": i < 3,
                "new_tokens": 4, "seconds": 0.5, "stopped": True, "meta": {}} for i in range(4)]
    summary = summarize(records, ["greedy"], {"greedy": 5})
    row = summary["samplers"][0]
    assert row["accuracy"] == 0.75 and row["tokens_per_second"] == 8.0 and not row["complete"]
    assert "(incomplete)" in markdown_table(summary)


def _eval_script():
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "scripts" / "eval.py"
    spec = importlib.util.spec_from_file_location("eval_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_refuses_bad_specs_before_loading_a_model(tmp_path):
    script = _eval_script()
    with pytest.raises(SystemExit, match=r"unknown sampler 'nucleus'.*valid samplers: greedy"):
        script.main(["--samplers", "greedy,nucleus", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"--shard: I/N needs N >= 1 and 0 <= I < N"):
        script.main(["--shard", "2/2", "--out", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_cli_end_to_end_with_smollm2(tmp_path, capsys):
    script = _eval_script()
    args = ["--n", "2", "--samplers", "greedy,temp:0.5", "--seeds", "0", "--max-new-tokens", "8",
            "--out", str(tmp_path), "--name", "smoke", "--no-progress"]
    assert script.main(args) == 0
    records = read_records(tmp_path / "smoke")
    assert len(records) == 4 and all(1 <= r["new_tokens"] <= 8 for r in records)
    assert "`temp:0.5`" in (tmp_path / "smoke" / "results.md").read_text()
    assert "results:" in capsys.readouterr().out
    assert script.main(args) == 0  # rerun: everything is on disk, nothing to generate
    assert len(read_records(tmp_path / "smoke")) == 4


# ------------------------------------------------------------------------------------------------ run directory


def test_a_second_process_on_the_same_shard_is_refused(tiny, tmp_path):
    config = EvalConfig(model="tiny-gpt2", task="parity", samplers=["greedy"], n=2, seeds=[0, 1])
    plan = runner.plan_run(config, tmp_path, name="locked", task=ParityTask(), model_given=True)
    with runner.lock_shard(plan.run_dir, (0, 1)):  # flock: a second open file description conflicts, as another
        with pytest.raises(ConfigError, match=r"is being written by pid \d+ on .*; refusing to write it twice"):
            run(tiny, tmp_path, name="locked", samplers=["greedy"], n=2)  # process's would
        run(tiny, tmp_path, name="locked", samplers=["greedy"], n=2, shard="1/2")  # another shard may run
    assert run(tiny, tmp_path, name="locked", samplers=["greedy"], n=2)["summary"] is not None  # lock released


def test_swapped_weights_at_the_same_path_are_refused(tiny, tmp_path):
    weights = tmp_path / "model"
    weights.mkdir()
    (weights / "config.json").write_text("{}")
    (weights / "model.safetensors").write_bytes(bytes(range(256)) * 20_000)  # 5 MB: first and last MiB hashed
    model, tokenizer = tiny
    config = EvalConfig(model=str(weights), task="parity", samplers=["greedy"], n=2)

    def go():
        return run_eval(config, tmp_path / "runs", name="w", model=model, tokenizer=tokenizer, task=ParityTask(),
                        progress=False, chart=False, log=lambda *_: None)

    go()
    saved = json.loads((tmp_path / "runs" / "w" / "config.json").read_text())["model_identity"]
    assert saved["kind"] == "directory" and saved["files"][0]["size"] == 5_120_000
    data = bytearray((weights / "model.safetensors").read_bytes())
    data[-10] ^= 1  # same size, same first MiB: only the last MiB differs
    (weights / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=r"different configuration.*model_identity"):
        go()


def test_model_identity_of_files_and_names(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x" * 100)
    first = models.model_identity(str(gguf))
    assert first == {"kind": "file", "file": "m.gguf", "size": 100, "sha256_first_last_mib": first[
        "sha256_first_last_mib"]}
    gguf.write_bytes(b"y" * 100)
    assert models.model_identity(str(gguf)) != first
    assert models.model_identity("someone/some-model", offline=True) == {"kind": "hub", "name": "someone/some-model",
                                                                         "revision": None}
    with pytest.raises(ConfigError, match=r"model: .*/nope.gguf does not exist"):
        models.model_identity(str(tmp_path / "nope.gguf"))


@pytest.mark.parametrize("line, message, a_cut_write", [
    (b'{"sampler": "greedy"', r"samples.jsonl:2: corrupt record", True),
    (b'{"sampler": "gr\xffedy"}', r"samples.jsonl:2: not UTF-8 \(byte 15", True),
    (b'[1, 2]', r"samples.jsonl:2: expected a JSON object \(one sample\), got list", False),
    (b'{"sampler": "greedy"}', r"samples.jsonl:2: record has no 'sampler_id'", False),
])
def test_a_bad_record_is_named_by_file_and_line(tmp_path, line, message, a_cut_write):
    good = {"sampler": "greedy", "sampler_id": "greedy", "seed": 0, "problem_id": "p", "completion": "x",
            "correct": True, "new_tokens": 1, "seconds": 0.1, "stopped": True}
    (tmp_path / "samples.jsonl").write_bytes(json.dumps(good).encode() + b"\n" + line + b"\n")
    with pytest.raises(ValueError, match=message):
        read_records(tmp_path)
    (tmp_path / "samples.jsonl").write_bytes(json.dumps({**good, "seed": "0"}).encode() + b"\n")
    with pytest.raises(ValueError, match=r"samples.jsonl:1: 'seed' must be int, got '0'"):
        read_records(tmp_path)
    if a_cut_write:  # as the last line, without its newline, it is what a kill during a write leaves: dropped
        (tmp_path / "samples.jsonl").write_bytes(json.dumps(good).encode() + b"\n" + line)
        assert len(read_records(tmp_path)) == 1


def test_every_sampler_kind_reports_progress_per_model_call(tiny):
    from qllm_samplers.generate import generate
    from qllm_samplers.specs import parse_sampler

    model, tokenizer = tiny
    ids = torch.tensor([tokenizer("Count: 0 1 2")["input_ids"]] * 2)
    calls = []
    for spec in ("temp:0.8", "power:alpha=2:steps=1:blocks=2", "power-smc:alpha=2:particles=2"):
        calls.clear()
        with runner.count_model_calls(model, lambda: calls.append(1)):
            out = generate(model, ids, sampler=parse_sampler(spec).build(), max_new_tokens=6, generator=[0, 1])
        assert len(calls) == out.model_calls >= 6, spec  # one tick per forward call: per token, per MH proposal
    calls.clear()
    generate(model, ids, sampler=parse_sampler("greedy").build(), max_new_tokens=3)  # outside the context
    assert calls == []  # the hook is removed afterwards


# ------------------------------------------------------------------------------------------------ command line


@pytest.fixture
def tiny_cli(tiny, monkeypatch, tmp_path):
    """scripts/eval.py with the tiny model standing in for SmolLM2 (the arith task, raw prompts)."""
    monkeypatch.setattr(models, "load_causal_lm", lambda *args, **kwargs: tiny)
    script = _eval_script()
    base = ["--n", "2", "--seeds", "0", "--samplers", "greedy,temp:0.5", "--max-new-tokens", "4", "--batch-size",
            "1", "--out", str(tmp_path), "--name", "cli", "--no-progress", "--offline"]
    return script, base


def test_cli_ctrl_c_says_how_to_resume_and_the_rerun_finishes(tiny_cli, tmp_path, monkeypatch, capsys):
    script, base = tiny_cli
    real, batches = runner.decode_batch, []

    def interrupted(*args, **kwargs):
        if len(batches) == 2:
            raise KeyboardInterrupt
        batches.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "decode_batch", interrupted)
    assert script.main(base) == 130
    err = capsys.readouterr().err
    assert "interrupted: finished batches are saved in" in err and "run the same command again to resume" in err
    assert "Traceback" not in err and len(read_records(tmp_path / "cli")) == 2
    monkeypatch.setattr(runner, "decode_batch", real)
    assert script.main(base) == 0
    assert len(read_records(tmp_path / "cli")) == 4
    out = capsys.readouterr().out
    assert "2 already done, 2 to go" in out and "Paired against `greedy`" in out


@pytest.mark.parametrize("args, message", [
    (["--sampelrs", "greedy"], None),
    (["--task-option", "levels=1,2"], r"--task-option 'levels=1,2': the value of levels .* must be JSON, e\.g\. "
                                      r"levels=\[1,2\]"),
    (["--task-option", "nope=1"], r"--task-option: unknown option\(s\) nope for task 'arith'"),
    (["--model", "no-such-model"], r"--model: 'no-such-model' is not a local path or a known short name.*offline"),
    (["--data-dir", "/nonexistent/data"], r"--data-dir: /nonexistent/data is not a directory"),
    (["--n", "-3"], r"--n: must be an int >= 1"),
    (["--unsafe-no-sandbox"], r"--unsafe-no-sandbox applies to tasks that run model-written code"),
])
def test_cli_errors_name_the_flag_before_any_model_loads(tiny_cli, tmp_path, monkeypatch, capsys, args, message):
    script, base = tiny_cli
    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as error:
        script.main(base + args)
    if message is None:  # argparse: exit status 2 and a suggestion
        assert error.value.code == 2 and "did you mean --samplers?" in capsys.readouterr().err
    else:
        assert re.search(message, str(error.value.code)), error.value.code
        assert not (tmp_path / "cli" / "samples.jsonl").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cli_device_cuda_without_cuda_fails_before_anything_loads(tiny_cli, tmp_path, monkeypatch):
    script, base = tiny_cli
    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit, match=r"--device: 'cuda' was asked for, but CUDA is not available"):
        script.main(base + ["--device", "cuda"])
    assert not (tmp_path / "cli").exists()


def test_sequence_samplers_go_through_the_same_path_and_keep_their_stats(tiny, tmp_path):
    result = run(tiny, tmp_path, name="smc", samplers=["greedy", "power-smc:alpha=2:particles=2"], seeds=(0,), n=3)
    records = [r for r in read_records(result["run_dir"]) if r["sampler"].startswith("power-smc")]
    assert len(records) == 3 and result["summary"]["complete"]
    for r in records:
        assert r["stats"]["particles"] == 2 and r["stats"]["resamples"] >= 0
        assert isinstance(r["stats"]["ess"], list) and r["stats"]["forward_tokens"] > 0
        assert r["stats"]["log_p"] <= 0


def test_offline_loading_fails_at_once_naming_the_model(monkeypatch):
    import time

    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"model: could not load 'nobody/no-such-model' \(offline: not in the local "
                                          r"hub cache\)"):
        models.load_causal_lm("nobody/no-such-model", offline=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the environment variable is the same setting
    with pytest.raises(ConfigError, match=r"offline: not in the local hub cache"):
        models.load_causal_lm("nobody/no-such-model")
    assert time.perf_counter() - start < 30  # no hub retries (they took 40-66 s); generous for a loaded machine
    with pytest.raises(ConfigError, match=r"device: 'gpu' is not a torch device"):
        models.resolve_device("gpu")
    assert models.resolve_device("cpu") == torch.device("cpu")


def test_cli_unsafe_no_sandbox_is_stated_in_the_summary(tiny_cli, tmp_path):
    script, base = tiny_cli
    assert script.main(base + ["--task", "humaneval", "--samplers", "greedy", "--unsafe-no-sandbox"]) == 0
    summary = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert summary["config"]["task_options"]["allow_unsandboxed"] is True
    assert summary["notes"] == [runner.WARNING_OPTIONS["allow_unsandboxed"]]
    assert "**Note:** run with --unsafe-no-sandbox" in (tmp_path / "cli" / "results.md").read_text()


def test_cli_merges_a_partial_run_on_request(tiny_cli, tmp_path, capsys):
    script, base = tiny_cli
    assert script.main(base + ["--shard", "0/2"]) == 0
    assert "--merge" in capsys.readouterr().out  # the shard says how to merge
    with pytest.raises(SystemExit, match=r"--merge: .* has 2 of 4 samples"):
        script.main(["--merge", str(tmp_path / "cli")])
    assert script.main(["--merge", str(tmp_path / "cli"), "--allow-incomplete"]) == 0
    table = capsys.readouterr().out
    assert "(incomplete) |" in table and "results:" in table


@pytest.mark.slow
def test_the_dequantized_copy_loads_the_same_model(tmp_path, monkeypatch):
    monkeypatch.setenv("QLLM_MODEL_CACHE", str(tmp_path / "cache"))
    fresh, fresh_tokenizer = models.load_causal_lm("smollm2-135m-instruct")  # de-quantizes the GGUF, keeps a copy
    (copy,) = list((tmp_path / "cache").iterdir())
    assert (copy / "model.safetensors").is_file() and not list((tmp_path / "cache").glob(".*"))
    cached, cached_tokenizer = models.load_causal_lm("smollm2-135m-instruct")  # reads the copy
    prompt = models.chat_prompt_ids(fresh_tokenizer, ["What is 12 + 7?"], system="Be brief.")
    assert models.chat_prompt_ids(cached_tokenizer, ["What is 12 + 7?"], system="Be brief.") == prompt
    for name in ("eos_token_id", "pad_token_id", "bos_token_id", "padding_side", "chat_template"):
        assert getattr(cached_tokenizer, name) == getattr(fresh_tokenizer, name), name
    assert cached.generation_config.eos_token_id == fresh.generation_config.eos_token_id
    with torch.no_grad():
        ids = torch.tensor(prompt)
        assert torch.equal(cached(ids).logits, fresh(ids).logits)
    monkeypatch.setenv("QLLM_MODEL_CACHE", "off")
    assert models.dequantized_cache_dir(models.embedded_model_path("smollm2-135m-instruct")) is None
