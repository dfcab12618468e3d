"""The evaluation loop on a tiny random model: records, resume after a kill, refusal of mixed runs, shards."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from qllm_evals import runner
from qllm_evals.report import bootstrap_interval, markdown_table, summarize
from qllm_evals.runner import EvalConfig, merge, parse_shard, read_records, row_seed, run_eval
from qllm_evals.tasks.base import Problem

SAMPLERS = ["greedy", "temp:0.8", "power:alpha=2:steps=1:blocks=2"]
FAST = ["greedy", "temp:0.8"]  # where power sampling adds nothing to what a test checks


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer (300 ids) trained offline on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Count: 0 1 2 3 4 5 6 7 8 9 10. The answer is 11."] * 3, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.padding_side = "left"
    return tokenizer


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
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=4,
                        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    return GPT2LMHeadModel(config).eval(), tokenizer


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
    assert all(r["stats"]["mh_proposed"] >= 1 for r in records if r["sampler"].startswith("power"))
    summary = json.loads((run_dir / "summary.json").read_text())
    for row in summary["samplers"]:
        mine = [r for r in records if r["sampler"] == row["sampler"]]
        assert row["accuracy"] == pytest.approx(sum(r["correct"] for r in mine) / len(mine))
        assert row["ci95"][0] <= row["accuracy"] <= row["ci95"][1]
        assert row["new_tokens_per_sample"] == pytest.approx(sum(r["new_tokens"] for r in mine) / len(mine))
    assert "pass@2" in summary["samplers"][1]
    power = [r for r in records if r["sampler"].startswith("power")]
    assert summary["samplers"][2]["mh_acceptance"] == pytest.approx(
        sum(r["stats"]["mh_accepted"] for r in power) / sum(r["stats"]["mh_proposed"] for r in power))
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
    real = runner.generate_batch

    def counting(*args, **kwargs):
        rows = real(*args, **kwargs)
        generated.append(len(rows))
        return rows

    monkeypatch.setattr(runner, "generate_batch", counting)
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
    with pytest.raises(ValueError, match="seeds must be"):
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
    with pytest.raises(SystemExit, match=r"shard I/N needs N >= 1 and 0 <= I < N"):
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
