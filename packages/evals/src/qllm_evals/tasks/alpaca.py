"""AlpacaEval 2.0: instruction following judged by GPT-4 Turbo against a reference model's answers.

It cannot be graded offline (the judge is a paid API), so this module does not grade: it loads the 805
instructions and writes the ``model_outputs.json`` that the ``alpaca_eval`` tool takes
(``alpaca_eval --model_outputs model_outputs.json``, run by you, with your own API key). It is therefore not
in ``qllm_evals.tasks.TASKS``.
"""

from __future__ import annotations

import json
from pathlib import Path

from qllm_evals.tasks.base import Problem, read_records, subset

HUB_REPO = "tatsu-lab/alpaca_eval"
HUB_FILE = "alpaca_eval.json"


def load_alpaca_eval(path: Path | None = None, n: int | None = None, seed: int = 0) -> list[Problem]:
    """AlpacaEval instructions as Problems (no reference: there is nothing to grade against offline).

    ``path``: a local ``alpaca_eval.json`` (a JSON list or JSONL with at least ``instruction``); without it
    the file is fetched from the hub dataset ``tatsu-lab/alpaca_eval``, which needs the network.
    """
    if path is None:
        try:
            from huggingface_hub import hf_hub_download
        except ImportError as error:
            raise ImportError(
                f"fetching {HUB_FILE} from the hub needs huggingface_hub; offline, pass path= to a local {HUB_FILE}"
            ) from error
        try:
            path = Path(hf_hub_download(HUB_REPO, HUB_FILE, repo_type="dataset"))
        except OSError as error:  # offline, or the hub refused (huggingface_hub's errors are OSErrors)
            raise FileNotFoundError(
                f"AlpacaEval instructions need the hub ({HUB_REPO}, {error}); offline, pass path= to a local "
                f"{HUB_FILE}"
            ) from error
    problems = [
        Problem(
            "alpaca_eval",
            f"alpaca_eval/{i}",
            record["instruction"],
            "",
            {"dataset": record.get("dataset", "alpaca_eval")},
        )
        for i, (_, record) in enumerate(read_records(Path(path), ("instruction",)))
    ]
    return subset(problems, n, seed, what="instructions")


def write_model_outputs(problems: list[Problem], outputs: list[str], generator: str, path: Path) -> Path:
    """Write AlpacaEval's ``model_outputs.json``: one {instruction, output, generator, dataset} per
    problem."""
    if len(problems) != len(outputs):
        raise ValueError(f"outputs must have one entry per problem ({len(problems)}), got {len(outputs)}")
    if not generator:
        raise ValueError("generator must be a non-empty name for the model/sampler that wrote the outputs")
    rows = [
        {
            "instruction": problem.prompt,
            "output": output,
            "generator": generator,
            "dataset": problem.meta.get("dataset", "alpaca_eval"),
        }
        for problem, output in zip(problems, outputs)
    ]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
