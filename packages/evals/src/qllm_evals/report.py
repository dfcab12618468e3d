"""Summaries of an evaluation run: accuracy with bootstrap intervals, cost per sample, a markdown table, a chart.

Everything here reads the per-sample records only, so it works the same on one finished run, a partial run, or
the merged shards of a distributed one.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000


def bootstrap_interval(per_problem: list[float], *, level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean, resampling problems (each problem's score already averages its
    seeds, so seeds of one problem stay together: they are not independent evidence)."""
    values = np.asarray(per_problem, dtype=np.float64)
    if values.size == 0:
        return (math.nan, math.nan)
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def summarize(records: list[dict], sampler_order: list[str], expected: dict[str, int] | None = None) -> dict:
    """Per-sampler statistics from the per-sample records (keyed by the sampler's canonical id).

    ``expected``: the number of samples each sampler should have; a sampler with fewer is marked incomplete.
    """
    from qllm_evals.passk import pass_at_k

    by_sampler: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        by_sampler[record["sampler_id"]].append(record)
    rows = []
    for sampler_id in sampler_order:
        items = by_sampler.get(sampler_id, [])
        label = items[0]["sampler"] if items else sampler_id
        per_problem: dict[str, list[bool]] = defaultdict(list)
        per_seed: dict[int, list[bool]] = defaultdict(list)
        per_level: dict[str, list[bool]] = defaultdict(list)
        for item in items:
            per_problem[item["problem_id"]].append(bool(item["correct"]))
            per_seed[item["seed"]].append(bool(item["correct"]))
            if "level" in item.get("meta", {}):
                per_level[str(item["meta"]["level"])].append(bool(item["correct"]))
        problem_scores = [sum(v) / len(v) for v in per_problem.values()]
        low, high = bootstrap_interval(problem_scores)
        tokens = sum(item["new_tokens"] for item in items)
        seconds = sum(item["seconds"] for item in items)
        seeds_per_problem = min((len(v) for v in per_problem.values()), default=0)
        row = {
            "sampler": label,
            "sampler_id": sampler_id,
            "samples": len(items),
            "problems": len(per_problem),
            "seeds": sorted(per_seed),
            "accuracy": float(np.mean([item["correct"] for item in items])) if items else math.nan,
            "ci95": [low, high],
            "accuracy_per_seed": {str(s): sum(v) / len(v) for s, v in sorted(per_seed.items())},
            "accuracy_per_level": {k: sum(v) / len(v) for k, v in sorted(per_level.items(), key=lambda kv: kv[0])},
            "new_tokens_per_sample": tokens / len(items) if items else math.nan,
            "seconds_per_sample": seconds / len(items) if items else math.nan,
            "tokens_per_second": tokens / seconds if seconds > 0 else math.nan,
            "stopped_fraction": float(np.mean([item["stopped"] for item in items])) if items else math.nan,
            "complete": expected is None or len(items) >= expected.get(sampler_id, 0),
        }
        proposed = sum(item.get("stats", {}).get("mh_proposed", 0) for item in items)
        if proposed:  # power sampling: how often the Metropolis-Hastings moves were accepted
            row["mh_acceptance"] = sum(item["stats"].get("mh_accepted", 0) for item in items) / proposed
        if seeds_per_problem > 1:  # unbiased pass@k over the seeds of each problem (Codex paper estimator)
            row[f"pass@{seeds_per_problem}"] = float(np.mean([
                pass_at_k(len(v), sum(v), seeds_per_problem) for v in per_problem.values()]))
        rows.append(row)
    return {"samplers": rows, "complete": all(row["complete"] for row in rows)}


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def markdown_table(summary: dict, title: str = "") -> str:
    """Accuracy with 95% bootstrap intervals and cost per sample, one row per sampler."""
    lines = [f"## {title}", ""] if title else []
    lines += ["| sampler | accuracy | 95% CI | samples (problems x seeds) | new tokens / sample | s / sample | "
              "tokens / s |",
              "|---|---:|---|---:|---:|---:|---:|"]
    for row in summary["samplers"]:
        low, high = row["ci95"]
        seeds = len(row["seeds"])
        lines.append(
            f"| `{row['sampler']}` | {_fmt(row['accuracy'])} | [{_fmt(low)}, {_fmt(high)}] | "
            f"{row['samples']} ({row['problems']} x {seeds}) | {_fmt(row['new_tokens_per_sample'], 1)} | "
            f"{_fmt(row['seconds_per_sample'], 2)} | {_fmt(row['tokens_per_second'], 1)} |"
            + ("" if row["complete"] else " (incomplete)"))
    levels = sorted({level for row in summary["samplers"] for level in row["accuracy_per_level"]}, key=int)
    if levels:
        lines += ["", "Accuracy per difficulty level:", "",
                  "| sampler | " + " | ".join(f"L{level}" for level in levels) + " |",
                  "|---|" + "---:|" * len(levels)]
        for row in summary["samplers"]:
            cells = [_fmt(row["accuracy_per_level"].get(level, math.nan), 2) for level in levels]
            lines.append(f"| `{row['sampler']}` | " + " | ".join(cells) + " |")
    lines += ["", "Intervals: percentile bootstrap over problems (10,000 resamples; a problem's seeds stay "
              "together). s / sample: batch wall time divided by the rows of the batch."]
    return "\n".join(lines) + "\n"


def bar_chart(summary: dict, path: Path, title: str = "") -> Path:
    """Accuracy per sampler with its 95% interval (and per difficulty level when the task has levels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["samplers"]
    levels = sorted({level for row in rows for level in row["accuracy_per_level"]}, key=int)
    fig, axes = plt.subplots(1, 2 if levels else 1, figsize=(12 if levels else 6, 4), squeeze=False)
    ax = axes[0][0]
    x = np.arange(len(rows))
    accuracy = np.array([row["accuracy"] for row in rows])
    low = np.array([row["ci95"][0] for row in rows])
    high = np.array([row["ci95"][1] for row in rows])
    ax.bar(x, accuracy, yerr=[np.maximum(accuracy - low, 0), np.maximum(high - accuracy, 0)], capsize=4,
           color="tab:blue")
    ax.set_xticks(x, [row["sampler"] for row in rows], rotation=20, ha="right")
    ax.set_ylabel("accuracy (95% bootstrap CI)")
    ax.set_ylim(0, 1)
    ax.set_title(title or "accuracy per sampler")
    if levels:
        ax = axes[0][1]
        width = 0.8 / len(rows)
        for i, row in enumerate(rows):
            values = [row["accuracy_per_level"].get(level, np.nan) for level in levels]
            ax.bar(np.arange(len(levels)) + i * width - 0.4 + width / 2, values, width, label=row["sampler"])
        ax.set_xticks(np.arange(len(levels)), [f"L{level}" for level in levels])
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1)
        ax.set_title("per difficulty level")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(run_dir: Path, config: dict, records: list[dict], expected: dict[str, int], *,
                 chart: bool = True) -> dict:
    """summary.json, results.md and (``chart``) accuracy.png in ``run_dir``; returns the summary."""
    order = [s["canonical"] for s in config["samplers"]]
    summary = summarize(records, order, expected)
    summary["config"] = config
    title = f"{config['task']} / {config['model']}"
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (run_dir / "results.md").write_text(markdown_table(summary, title))
    if chart:
        bar_chart(summary, run_dir / "accuracy.png", title)
    return summary
