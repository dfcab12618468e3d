"""The ``qllm`` console script: ``qllm fit|validate|test|predict --config configs/<name>.yaml`` (LightningCLI),
``qllm generate --ckpt PATH --prompt TEXT`` (decode with a qllm_samplers sampler) and
``qllm plot --logdir RUN --out PNG`` (learning curves)."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from .data import QLLMDataModule
from .lit import QLLMLitModule


class QLLMCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # A first-class ModelCheckpoint (`--checkpoint.*`) with save_last and a fixed folder, so that
        # `--ckpt_path last` finds the previous run's last.ckpt (a per-version folder would not).
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.dirpath": "runs/qllm/checkpoints",
            "checkpoint.save_last": True,
            "checkpoint.monitor": "val/bpb",
            "checkpoint.mode": "min",
            "checkpoint.filename": "step{step}-bpb{val/bpb:.4f}",
            "checkpoint.auto_insert_metric_name": False,
        })

    def before_instantiate_classes(self) -> None:
        if torch.cuda.is_available():
            torch.set_float32_matmul_precision("high")


TRAINER_DEFAULTS = {
    "default_root_dir": "runs/qllm",
    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
               "init_args": {"save_dir": "runs", "name": "qllm"}},
}


def generate_main(argv: Sequence[str]) -> None:
    from .generation import generate_text
    from .lit import load_model

    parser = argparse.ArgumentParser(prog="qllm generate", description="Sample text from a qllm checkpoint.")
    parser.add_argument("--ckpt", required=True, help="a checkpoint written by `qllm fit` (e.g. runs/.../last.ckpt)")
    parser.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    parser.add_argument("--max_new_tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0, help="row b uses seed + b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(list(argv))
    model = load_model(args.ckpt, map_location=args.device)
    texts = generate_text(model, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    for prompt, text in zip(args.prompt, texts):
        print(f"=== {prompt!r}\n{prompt}{text}\n")


def run_cli(args: Sequence[str] | None = None) -> QLLMCLI | None:
    """Run a subcommand; returns the LightningCLI (its .trainer, .model, .datamodule) or None for generate."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "generate":
        generate_main(argv[1:])
        return None
    if argv and argv[0] == "plot":
        from .curves import plot_main

        plot_main(argv[1:])
        return None
    with warnings.catch_warnings():
        # Called from Python (tests, notebooks) with explicit args while sys.argv holds the caller's own.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return QLLMCLI(QLLMLitModule, QLLMDataModule, trainer_defaults=TRAINER_DEFAULTS,
                       save_config_kwargs={"overwrite": True}, args=None if args is None else argv,
                       seed_everything_default=1337)


def main(args: Sequence[str] | None = None) -> None:
    """Console-script entry point (returns None so the exit status is 0)."""
    run_cli(args)


if __name__ == "__main__":
    main()
