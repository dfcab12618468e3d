"""Run summaries: paired comparisons against the first sampler, the exact sign test, incomplete runs, the table
and the chart."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qllm_evals import runner
from qllm_evals.report import (
    bar_chart,
    bootstrap_interval,
    markdown_table,
    paired_comparison,
    sign_test_p_value,
    summarize,
)


def record(sampler: str, problem: int, seed: int, correct: bool, **extra) -> dict:
    return {"sampler": sampler, "sampler_id": sampler, "seed": seed, "problem_id": f"p{problem}", "correct": correct,
            "new_tokens": 4, "seconds": 0.5, "stopped": True, "meta": {"level": 1 + problem % 2}, **extra}


def test_sign_test_is_the_exact_binomial_tail():
    assert sign_test_p_value(0, 5) == 2 / 32  # all five discordant problems go one way
    assert sign_test_p_value(9, 1) == pytest.approx(2 * (1 + 10) / 1024)
    assert sign_test_p_value(3, 3) == 1.0 and sign_test_p_value(0, 0) == 1.0
    # symmetric, and it matches a brute-force sum over the binomial distribution
    n = 17
    for wins in range(n + 1):
        brute = sum(math.comb(n, i) for i in range(n + 1) if abs(i - n / 2) >= abs(wins - n / 2)) / 2**n
        assert sign_test_p_value(wins, n - wins) == pytest.approx(min(1.0, brute))
    with pytest.raises(ValueError, match="wins must be an int >= 0"):
        sign_test_p_value(-1, 2)


def test_paired_comparison_matches_its_definition():
    rng = np.random.default_rng(0)
    base = {f"p{i}": float(v) for i, v in enumerate(rng.integers(0, 2, 60))}
    # the other sampler agrees except on 12 problems it gets right and 3 it gets wrong
    other = dict(base)
    changed = list(base)
    for key in changed[:15]:
        other[key] = 1.0 - base[key]
    wins = sum(other[k] > base[k] for k in base)
    losses = sum(other[k] < base[k] for k in base)
    result = paired_comparison(base, other)
    assert result["difference"] == pytest.approx(np.mean([other[k] - base[k] for k in base]))
    assert (result["better"], result["worse"], result["tied"]) == (wins, losses, 60 - wins - losses)
    assert result["sign_test_p"] == sign_test_p_value(wins, losses)
    assert result["ci95"] == list(bootstrap_interval([other[k] - base[k] for k in sorted(base)]))
    assert result["ci95"][0] <= result["difference"] <= result["ci95"][1]
    # pairing removes the between-problem spread: the paired interval is narrower than the unpaired difference's
    assert result["ci95"][1] - result["ci95"][0] < 2 * (np.diff(bootstrap_interval(list(base.values())))[0])
    only_common = paired_comparison({"a": 1.0, "b": 0.0}, {"b": 1.0, "c": 0.0})
    assert only_common["problems"] == 1 and only_common["difference"] == 1.0


def test_summary_pairs_every_sampler_with_the_first_and_reports_pass_at_k_and_acceptance():
    records = [record("greedy", p, 0, p < 3) for p in range(6)]
    records += [record("temp", p, s, p < 4 or (p == 5 and s == 0)) for p in range(6) for s in (0, 1)]
    records += [record("power", p, s, p < 2, stats={"proposed": 4, "accepted": 3}) for p in range(6) for s in (0, 1)]
    summary = summarize(records, ["greedy", "temp", "power"])
    greedy, temp, power = summary["samplers"]
    assert "paired_vs_first" not in greedy
    assert temp["paired_vs_first"]["against"] == "greedy"
    assert temp["paired_vs_first"]["difference"] == pytest.approx(temp["accuracy"] - greedy["accuracy"])
    assert (temp["paired_vs_first"]["better"], temp["paired_vs_first"]["worse"]) == (2, 0)
    assert (power["paired_vs_first"]["better"], power["paired_vs_first"]["worse"]) == (0, 1)
    assert temp["pass_at_k"] == {"k": 2, "value": pytest.approx(5 / 6)}
    assert power["mh_acceptance"] == 0.75 and "mh_acceptance" not in temp
    table = markdown_table(summary)
    header = table.splitlines()[0]
    assert "| pass@2 | MH acceptance |" in header
    assert "| `power` | 0.333 |" in table and "| 0.75 |" in table
    assert "Paired against `greedy`" in table and "| `temp` | 0.250 |" in table and "2 / 0 / 4" in table


def test_an_incomplete_run_keeps_accuracy_inside_its_interval_and_the_table_intact():
    # Problem 0 has both seeds (both right), problems 1-3 only one (all wrong): the mean over samples (0.4) is not
    # the per-problem mean the interval is about (0.25).
    records = [record("temp", 0, 0, True), record("temp", 0, 1, True)]
    records += [record("temp", p, 0, False) for p in (1, 2, 3)]
    summary = summarize(records, ["temp"], {"temp": 8})
    row = summary["samplers"][0]
    assert row["accuracy"] == 0.25 and row["ci95"][0] <= row["accuracy"] <= row["ci95"][1]
    assert not row["complete"] and not summary["complete"]
    line = next(line for line in markdown_table(summary).splitlines() if line.startswith("| `temp`"))
    assert line.startswith("| `temp` (incomplete) |") and line.endswith("|")


def test_notes_are_printed_under_the_table():
    summary = summarize([record("greedy", 0, 0, True)], ["greedy"])
    summary["notes"] = [runner.WARNING_OPTIONS["allow_unsandboxed"]]
    assert "**Note:** run with --unsafe-no-sandbox" in markdown_table(summary)
    assert runner._config_notes({"task_options": {"allow_unsandboxed": True}}) == summary["notes"]
    assert runner._config_notes({"task_options": {"allow_unsandboxed": False}}) == []


def test_the_chart_has_intervals_and_labels_on_every_panel(tmp_path, monkeypatch):
    import matplotlib.axes

    records = [record(name, p, 0, (p + i) % 3 == 0) for i, name in
               enumerate(["greedy", "power:alpha=4:steps=2:blocks=4:proposal_temperature=0.25"]) for p in range(8)]
    summary = summarize(records, ["greedy", "power:alpha=4:steps=2:blocks=4:proposal_temperature=0.25"])
    seen = []
    real_bar = matplotlib.axes.Axes.bar

    def bar(self, *args, **kwargs):
        seen.append(self)
        assert kwargs.get("yerr") is not None  # every bar carries its interval
        return real_bar(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", bar)
    path = bar_chart(summary, tmp_path / "accuracy.png", "arith / smollm2")
    assert path.read_bytes()[:4] == b"\x89PNG"
    axes = list(dict.fromkeys(seen))
    assert len(axes) == 2
    assert [ax.get_xlabel() for ax in axes] == ["sampler", "difficulty level"]
    assert all(ax.get_ylabel().startswith("accuracy") for ax in axes)
    assert all(max(len(line) for line in tick.get_text().splitlines()) <= 28 for ax in axes
               for tick in ax.get_xticklabels())


def test_mean_log_p_per_token_weights_samples_by_their_tokens():
    records = [record("a", 0, 0, True, stats={"log_p": -2.0}), record("a", 1, 0, False, new_tokens=12,
                                                                         stats={"log_p": -3.0}),
               record("b", 0, 0, True), record("b", 1, 0, True)]  # b reports no log p
    rows = {row["sampler"]: row for row in summarize(records, ["a", "b"])["samplers"]}
    assert rows["a"]["mean_logp_per_token"] == pytest.approx(-5.0 / 16)  # (-2 - 3) / (4 + 12), not the mean of ratios
    assert math.isnan(rows["b"]["mean_logp_per_token"])
    table = markdown_table(summarize(records, ["a", "b"]))
    assert "log p / token" in table and "-0.312" in table and "n/a" in table
