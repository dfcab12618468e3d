"""Summaries of an evaluation run: accuracy with bootstrap intervals, paired comparisons, cost, a table, a chart.

Everything here reads the per-sample records only, so it works the same on one finished run, a partial run, or
the merged shards of a distributed one. The unit of evidence is the problem: a problem's seeds are averaged
first (they are not independent evidence about a sampler), and every interval resamples problems.
"""

from __future__ import annotations

import json
import math
import os
import textwrap
from collections import defaultdict
from pathlib import Path

import numpy as np

from qllm_evals.passk import pass_at_k

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


def sign_test_p_value(wins: int, losses: int) -> float:
    """Exact two-sided sign test: P(a split at least this uneven) under Binomial(wins + losses, 1/2).

    On paired binary outcomes (one seed per problem) this is the exact McNemar test, the discordant pairs being
    the wins and losses. Ties carry no evidence about the direction and are left out, as both tests do.
    """
    for name, value in (("wins", wins), ("losses", losses)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    trials = wins + losses
    if trials == 0:
        return 1.0
    tail = sum(math.comb(trials, i) for i in range(min(wins, losses) + 1))
    return min(1.0, 2 * tail / 2**trials)  # exact integers until the one division


def paired_comparison(baseline: dict[str, float], other: dict[str, float], *,
                      resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict:
    """``other`` minus ``baseline`` on the problems both have (per-problem scores, seeds averaged).

    The interval is the paired bootstrap: problems are resampled and both samplers keep their own score on each
    drawn problem, so the between-problem spread, shared by both, cancels out of the difference.
    """
    common = sorted(set(baseline) & set(other))
    differences = [other[key] - baseline[key] for key in common]
    wins = sum(d > 0 for d in differences)
    losses = sum(d < 0 for d in differences)
    low, high = bootstrap_interval(differences, resamples=resamples, seed=seed)
    return {
        "problems": len(common),
        "difference": float(np.mean(differences)) if differences else math.nan,
        "ci95": [low, high],
        "better": wins, "worse": losses, "tied": len(common) - wins - losses,
        "sign_test_p": sign_test_p_value(wins, losses),
    }


def _per_problem_scores(items: list[dict]) -> dict[str, float]:
    outcomes: dict[str, list[bool]] = defaultdict(list)
    for item in items:
        outcomes[item["problem_id"]].append(bool(item["correct"]))
    return {key: sum(v) / len(v) for key, v in outcomes.items()}


def _mean(values) -> float:
    values = list(values)
    return float(np.mean(values)) if values else math.nan


def _mean_logp_per_token(items: list[dict]) -> float:
    """Sum of the samples' base-model log p over their new tokens (NaN when no sample reports log p)."""
    scored = [item for item in items if "log_p" in item.get("stats", {}) and item["new_tokens"] > 0]
    tokens = sum(item["new_tokens"] for item in scored)
    return sum(item["stats"]["log_p"] for item in scored) / tokens if tokens else math.nan


def summarize(records: list[dict], sampler_order: list[str], expected: dict[str, int] | None = None) -> dict:
    """Per-sampler statistics from the per-sample records (keyed by the sampler's canonical id), and each
    sampler paired against the first one.

    ``expected``: the number of samples each sampler should have; a sampler with fewer is marked incomplete.
    Accuracy is the mean of the per-problem scores (seeds averaged first): the quantity the interval is about,
    so it always lies inside it, also when some problems have fewer seeds than others (an incomplete run).
    """
    by_sampler: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        by_sampler[record["sampler_id"]].append(record)
    rows, scores = [], {}
    for sampler_id in sampler_order:
        items = by_sampler.get(sampler_id, [])
        label = items[0]["sampler"] if items else sampler_id
        scores[sampler_id] = per_problem = _per_problem_scores(items)
        per_seed: dict[int, list[bool]] = defaultdict(list)
        per_level: dict[str, list[dict]] = defaultdict(list)
        for item in items:
            per_seed[item["seed"]].append(bool(item["correct"]))
            if "level" in item.get("meta", {}):
                per_level[str(item["meta"]["level"])].append(item)
        level_scores = {level: _per_problem_scores(group) for level, group in per_level.items()}
        tokens = sum(item["new_tokens"] for item in items)
        seconds = sum(item["seconds"] for item in items)
        row = {
            "sampler": label,
            "sampler_id": sampler_id,
            "samples": len(items),
            "problems": len(per_problem),
            "seeds": sorted(per_seed),
            "accuracy": _mean(per_problem.values()),
            "ci95": list(bootstrap_interval(list(per_problem.values()))),
            "accuracy_per_seed": {str(s): sum(v) / len(v) for s, v in sorted(per_seed.items())},
            "accuracy_per_level": {k: _mean(v.values()) for k, v in sorted(level_scores.items(), key=_level_key)},
            "ci95_per_level": {k: list(bootstrap_interval(list(v.values())))
                               for k, v in sorted(level_scores.items(), key=_level_key)},
            "new_tokens_per_sample": tokens / len(items) if items else math.nan,
            # how likely the base model finds what the sampler wrote: power samplers should raise it
            "mean_logp_per_token": _mean_logp_per_token(items),
            "seconds_per_sample": seconds / len(items) if items else math.nan,
            "tokens_per_second": tokens / seconds if seconds > 0 else math.nan,
            "stopped_fraction": _mean(item["stopped"] for item in items),
            "complete": expected is None or len(items) >= expected.get(sampler_id, 0),
        }
        proposed = sum(item.get("stats", {}).get("proposed", 0) for item in items)
        if proposed:  # Metropolis-Hastings samplers report their moves: how often one was accepted
            row["mh_acceptance"] = sum(item["stats"].get("accepted", 0) for item in items) / proposed
        counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # problem -> [samples, correct]
        for item in items:
            counts[item["problem_id"]][0] += 1
            counts[item["problem_id"]][1] += bool(item["correct"])
        k = min((n for n, _ in counts.values()), default=0)
        if k > 1:  # unbiased pass@k over the seeds of each problem (Codex paper estimator)
            row["pass_at_k"] = {"k": k, "value": _mean(pass_at_k(n, c, k) for n, c in counts.values())}
        rows.append(row)
    baseline = sampler_order[0] if sampler_order else None
    for row in rows[1:]:
        row["paired_vs_first"] = {"against": rows[0]["sampler"],
                                  **paired_comparison(scores[baseline], scores[row["sampler_id"]])}
    return {"samplers": rows, "complete": all(row["complete"] for row in rows)}


def _level_key(item: tuple[str, object]):
    key = item[0]
    return (0, int(key), key) if key.lstrip("-").isdigit() else (1, 0, key)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _p_value(p: float) -> str:
    return "n/a" if math.isnan(p) else (f"{p:.2g}" if p < 0.01 else f"{p:.2f}")


def markdown_table(summary: dict, title: str = "") -> str:
    """Accuracy with 95% bootstrap intervals, pass@k, MH acceptance and cost per sample, one row per sampler;
    then each sampler paired against the first, and accuracy per level when the task has levels."""
    rows = summary["samplers"]
    ks = sorted({row["pass_at_k"]["k"] for row in rows if "pass_at_k" in row})
    has_mh = any("mh_acceptance" in row for row in rows)
    lines = [f"## {title}", ""] if title else []
    header = ["sampler", "accuracy", "95% CI", *(f"pass@{k}" for k in ks), *(["MH acceptance"] if has_mh else []),
              "samples (problems x seeds)", "new tokens / sample", "log p / token", "s / sample", "tokens / s"]
    lines += ["| " + " | ".join(header) + " |",
              "|---|---:|---|" + "---:|" * (len(ks) + has_mh) + "---:|---:|---:|---:|---:|"]
    for row in rows:
        low, high = row["ci95"]
        name = f"`{row['sampler']}`" + ("" if row["complete"] else " (incomplete)")
        cells = [name, _fmt(row["accuracy"]), f"[{_fmt(low)}, {_fmt(high)}]"]
        cells += [_fmt(row["pass_at_k"]["value"]) if row.get("pass_at_k", {}).get("k") == k else "" for k in ks]
        if has_mh:
            cells.append(_fmt(row["mh_acceptance"], 2) if "mh_acceptance" in row else "")
        cells += [f"{row['samples']} ({row['problems']} x {len(row['seeds'])})",
                  _fmt(row["new_tokens_per_sample"], 1), _fmt(row.get("mean_logp_per_token", math.nan), 3),
                  _fmt(row["seconds_per_sample"], 2),
                  _fmt(row["tokens_per_second"], 1)]
        lines.append("| " + " | ".join(cells) + " |")
    if len(rows) > 1:
        lines += ["", f"Paired against `{rows[0]['sampler']}` (same problems and seeds; difference of accuracy, "
                      f"positive = better):", "",
                  "| sampler | difference | paired 95% CI | problems better / worse / tied | sign test p |",
                  "|---|---:|---|---:|---:|"]
        for row in rows[1:]:
            paired = row["paired_vs_first"]
            low, high = paired["ci95"]
            lines.append(f"| `{row['sampler']}` | {_fmt(paired['difference'], 3)} | [{_fmt(low)}, {_fmt(high)}] | "
                         f"{paired['better']} / {paired['worse']} / {paired['tied']} | "
                         f"{_p_value(paired['sign_test_p'])} |")
    levels = list(dict.fromkeys(level for row in rows for level in row["accuracy_per_level"]))
    if levels:
        lines += ["", "Accuracy per difficulty level:", "",
                  "| sampler | " + " | ".join(f"L{level}" for level in levels) + " |",
                  "|---|" + "---:|" * len(levels)]
        for row in rows:
            cells = [_fmt(row["accuracy_per_level"].get(level, math.nan), 2) for level in levels]
            lines.append(f"| `{row['sampler']}` | " + " | ".join(cells) + " |")
    lines += ["", "Intervals: percentile bootstrap over problems (10,000 resamples; a problem's seeds are averaged "
              "and stay together). Paired: the same resampling applied to the per-problem differences; sign test: "
              "exact two-sided binomial test on the problems where the two differ (the exact McNemar test when "
              "each problem has one seed). s / sample: batch wall time divided by the rows of the batch."]
    for note in summary.get("notes", []):
        lines += ["", f"**Note:** {note}"]
    return "\n".join(lines) + "\n"


def _wrap(label: str, width: int = 16) -> str:
    # Specs have no spaces; break them at their ':' separators so a long one stays under its bar.
    return "\n".join(textwrap.wrap(label.replace(":", ": "), width)).replace(": ", ":")


def _error_bars(values: np.ndarray, intervals: list[list[float]]) -> np.ndarray:
    low = np.array([i[0] for i in intervals], dtype=float)
    high = np.array([i[1] for i in intervals], dtype=float)
    return np.nan_to_num(np.vstack([np.maximum(values - low, 0), np.maximum(high - values, 0)]))


def bar_chart(summary: dict, path: Path, title: str = "") -> Path:
    """Accuracy per sampler with its 95% interval (and per difficulty level, with intervals, when the task has
    levels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["samplers"]
    levels = list(dict.fromkeys(level for row in rows for level in row["accuracy_per_level"]))
    width = 1.2 + 1.1 * len(rows)
    fig, axes = plt.subplots(1, 2 if levels else 1, figsize=(width + (6 if levels else 0), 5.2), squeeze=False,
                             gridspec_kw={"width_ratios": [width, 6]} if levels else None)
    ax = axes[0][0]
    x = np.arange(len(rows))
    accuracy = np.array([row["accuracy"] for row in rows], dtype=float)
    ax.bar(x, accuracy, yerr=_error_bars(accuracy, [row["ci95"] for row in rows]), capsize=4,
           color=[f"C{i}" for i in range(len(rows))])
    ax.set_xticks(x, [_wrap(row["sampler"]) for row in rows], fontsize=8)
    ax.set_xlabel("sampler")
    ax.set_ylabel("accuracy (95% bootstrap CI)")
    ax.set_ylim(0, 1.05)
    ax.set_title(textwrap.fill(title or "accuracy per sampler", 40), fontsize=10)
    if levels:
        ax = axes[0][1]
        bar = 0.8 / len(rows)
        for i, row in enumerate(rows):
            values = np.array([row["accuracy_per_level"].get(level, np.nan) for level in levels], dtype=float)
            intervals = [row.get("ci95_per_level", {}).get(level, [np.nan, np.nan]) for level in levels]
            ax.bar(np.arange(len(levels)) + i * bar - 0.4 + bar / 2, values, bar, color=f"C{i}",
                   yerr=_error_bars(values, intervals), capsize=2, error_kw={"elinewidth": 0.8},
                   label=_wrap(row["sampler"], 28))
        ax.set_xticks(np.arange(len(levels)), [f"L{level}" for level in levels])
        ax.set_xlabel("difficulty level")
        ax.set_ylabel("accuracy (95% bootstrap CI)")
        ax.set_ylim(0, 1.05)
        ax.set_title("per difficulty level", fontsize=10)
        # Below the panel, so it never hides a bar (all levels can reach 1.0).
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=min(len(rows), 3), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _write_atomic(path: Path, text: str) -> None:
    # Two shards that finish together both write the summary: each write is whole, the last one stays.
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_report(run_dir: Path, config: dict, records: list[dict], expected: dict[str, int], *,
                 chart: bool = True, notes: list[str] = ()) -> dict:
    """summary.json, results.md and (``chart``) accuracy.png in ``run_dir``; returns the summary.

    ``notes``: sentences a reader must see next to the numbers (e.g. that code ran without the sandbox).
    """
    order = [s["canonical"] for s in config["samplers"]]
    summary = summarize(records, order, expected)
    summary["notes"] = list(notes)
    summary["config"] = config
    title = f"{config['task']} / {config['model']}"
    _write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    _write_atomic(run_dir / "results.md", markdown_table(summary, title))
    if chart:
        bar_chart(summary, run_dir / "accuracy.png", title)
    return summary
