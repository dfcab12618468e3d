"""Learning curves from a run's TensorBoard event files, as a PNG (``qllm plot``)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path


def read_scalars(logdir: str | Path, tags: Sequence[str] = ("train/bpb", "val/bpb")) -> dict[str, list[dict]]:
    """{tag: [{"step", "value", "seconds"}]} of one training run: the event files directly in ``logdir``.

    A resumed run appends event files to the same folder (the configs fix the logger's version), and steps
    replayed after a kill are kept from the newest file; a file that starts from the first step again (a new run
    in the same folder) drops the older ones. Sub-folders (``validate``, ``test``, other runs) are not read.
    ``seconds`` is wall time since the run's first event.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = Path(logdir)
    files = sorted(folder.glob("events.out.tfevents.*"), key=lambda f: f.stat().st_mtime)
    if not files:
        runs = sorted({str(f.parent) for f in folder.rglob("events.out.tfevents.*")})
        hint = f"; runs under it: {', '.join(runs)}" if runs else ""
        raise ValueError(f"--logdir {logdir}: no TensorBoard event files in this folder{hint}")
    runs = []
    for file in files:
        events = EventAccumulator(str(file))
        events.Reload()
        runs.append({tag: events.Scalars(tag) for tag in tags if tag in events.Tags()["scalars"]})
    # A resumed run's file starts at its checkpoint's step; a file that starts from the first step again is a
    # new run written into the same folder, and the older files are not part of it.
    first_steps = [min((e.step for points in run.values() for e in points), default=None) for run in runs]
    known = [s for s in first_steps if s is not None]
    if known:
        start_step = min(known)
        runs = runs[max(i for i, s in enumerate(first_steps) if s == start_step):]
    by_step: dict[str, dict[int, dict]] = {tag: {} for tag in tags}
    for run in runs:  # oldest first, so a replayed step keeps the resumed run's value
        for tag, points in run.items():
            for e in points:
                by_step[tag][e.step] = {"step": e.step, "value": e.value, "wall": e.wall_time}
    start = min((p["wall"] for points in by_step.values() for p in points.values()), default=0.0)
    return {tag: [{"step": p["step"], "value": p["value"], "seconds": p["wall"] - start}
                  for _, p in sorted(points.items())] for tag, points in by_step.items()}


def plot_curves(logdir: str | Path, out: str | Path, target: float | None = None, title: str | None = None) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_scalars(logdir)
    fig, ax = plt.subplots(figsize=(7, 4))
    for tag, style in (("train/bpb", dict(alpha=0.5, lw=1)), ("val/bpb", dict(marker="o", lw=2))):
        if series[tag]:
            ax.plot([p["step"] for p in series[tag]], [p["value"] for p in series[tag]], label=tag, **style)
    if target is not None:
        ax.axhline(target, color="gray", ls="--", lw=1, label=f"target {target}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("bits per byte")
    ax.set_title(title or str(logdir))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return series


def plot_main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="qllm plot", description="Plot train/val bits per byte of a run.")
    parser.add_argument("--logdir", required=True, help="one training run's TensorBoard folder, e.g. runs/tiny/fit")
    parser.add_argument("--out", required=True, help="PNG path")
    parser.add_argument("--target", type=float, default=None, help="draw a horizontal target line")
    parser.add_argument("--json", default=None, help="also write the curves as JSON")
    args = parser.parse_args(list(argv))
    try:
        series = plot_curves(args.logdir, args.out, args.target)
    except ValueError as error:
        parser.error(str(error))
    if args.json:
        Path(args.json).write_text(json.dumps(series, indent=1))
    for point in series["val/bpb"]:
        print(f"step {point['step']:>6}  val bpb {point['value']:.4f}  after {point['seconds'] / 60:6.1f} min")
    print(f"wrote {args.out}")
