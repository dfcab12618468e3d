"""The ``qllm`` console script.

- ``qllm fit|validate|test|predict --config configs/<name>.yaml``: LightningCLI over ``QLLMLitModule`` and
  ``QLLMDataModule`` (every flag: ``qllm fit --help``);
- ``qllm generate --ckpt PATH --prompt TEXT --sampler SPEC``: decode a checkpoint with any ``qllm_samplers``
  sampler;
- ``qllm plot --logdir RUN --out PNG``: one training run's learning curve.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

import torch
from lightning.pytorch.cli import LightningCLI

from .callbacks import BestCheckpoint, ProgressLog, ResumeCheckpoint
from .data import QLLMDataModule
from .lit import QLLMLitModule

SUBCOMMANDS = {
    "fit": "train (resume with --ckpt_path last)",
    "validate": "val bits per byte of a checkpoint (--ckpt_path FILE)",
    "test": "test bits per byte of a checkpoint (--ckpt_path FILE)",
    "predict": "continue --data.predict_prompts with --data.predict_sampler (--ckpt_path FILE)",
    "generate": "decode a checkpoint with any sampler spec (qllm generate --help)",
    "plot": "plot one training run's train/val bits per byte as a PNG (qllm plot --help)",
}
GPU_ACCELERATORS = ("gpu", "cuda")


class QLLMCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # Fixed checkpoint folder (not per logger version), so that `--ckpt_path last` finds the previous run's.
        parser.add_lightning_class_args(ResumeCheckpoint, "checkpoint")
        parser.add_lightning_class_args(BestCheckpoint, "best_checkpoint")
        parser.add_lightning_class_args(ProgressLog, "progress")
        parser.link_arguments("checkpoint.dirpath", "best_checkpoint.dirpath")
        parser.set_defaults({"checkpoint.dirpath": "runs/qllm/checkpoints"})

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.trainer
        if str(trainer.accelerator) in GPU_ACCELERATORS and not torch.cuda.is_available():
            raise SystemExit(f"qllm {self.subcommand}: this config asks for --trainer.accelerator "
                             f"{trainer.accelerator} and no GPU is visible. Run it on the CPU with "
                             "--trainer.accelerator cpu --trainer.precision 32-true (slow at this size)")
        logger = trainer.logger
        if self.subcommand != "fit" and isinstance(logger, dict | argparse.Namespace):
            # Evaluations log beside the training run, never into it (`qllm plot` reads one run's curve).
            init_args = logger["init_args"] if isinstance(logger, dict) else logger.init_args
            if "version" in init_args:
                init_args["version"] = self.subcommand
        if torch.cuda.is_available():
            torch.set_float32_matmul_precision("high")


TRAINER_DEFAULTS = {
    "default_root_dir": "runs/qllm",
    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
               "init_args": {"save_dir": "runs", "name": "qllm", "version": "fit"}},
    "enable_progress_bar": False,  # ProgressLog prints lines instead, readable in a log file too
}


def generate_main(argv: Sequence[str]) -> None:
    from qllm_samplers.specs import parse_sampler, sampler_help

    from .generation import generate_text
    from .lit import load_model

    parser = argparse.ArgumentParser(
        prog="qllm generate", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Sample text from a qllm checkpoint with any sampler.\n\n"
                    "samplers (--sampler NAME[:VALUE][:KEY=VALUE...]):\n" + sampler_help())
    parser.add_argument("--ckpt", required=True, help="a checkpoint written by `qllm fit` (e.g. runs/.../last.ckpt)")
    parser.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    parser.add_argument("--sampler", default="temp:0.8",
                        help="sampler spec, e.g. greedy, temp:0.8:top_k=40, topp:0.9, power:alpha=4:steps=2, "
                             "entropix (default: temp:0.8)")
    parser.add_argument("--max_new_tokens", type=int, default=None,
                        help="new bytes per prompt (default: fill the model's context after the longest prompt)")
    parser.add_argument("--seed", type=int, default=0, help="prompt b uses seed + b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available)")
    args = parser.parse_args(list(argv))
    try:
        spec = parse_sampler(args.sampler)
        model = load_model(args.ckpt, map_location=args.device)
        texts = generate_text(model, args.prompt, sampler=spec.build(), max_new_tokens=args.max_new_tokens,
                              seed=args.seed, budget_flag="--max_new_tokens")
    except ValueError as error:
        parser.error(str(error))
    for prompt, text in zip(args.prompt, texts):
        print(f"=== {prompt!r} ({spec.canonical})\n{prompt}{text}\n")


def print_overview() -> None:
    print("usage: qllm SUBCOMMAND [options]\n\nsubcommands:")
    for name, help_text in SUBCOMMANDS.items():
        print(f"  {name:<9} {help_text}")
    print("\n`qllm SUBCOMMAND --help` lists a subcommand's flags, e.g. `qllm fit --help`.")


def run_cli(args: Sequence[str] | None = None) -> QLLMCLI | None:
    """Run a subcommand; returns the LightningCLI (its .trainer, .model, .datamodule), or None for generate/plot."""
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] in ("-h", "--help"):
        print_overview()
        return None
    if argv[0] == "generate":
        generate_main(argv[1:])
        return None
    if argv[0] == "plot":
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
