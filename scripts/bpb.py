"""Bits per byte of a causal LM on a text file (default: SmolLM2-135M on the WikiText-2 test split, offline).

    python scripts/bpb.py                                  # whole WikiText-2 test, window 2048, stride 2048
    python scripts/bpb.py --max-bytes 200000 --stride 1024  # a prefix, overlapping windows
    python scripts/bpb.py --text my.txt --model path/to/hf_model_dir

Writes a JSON result (default under results/bpb/) and checkpoints the running sums after every forward pass, so a
killed run continues where it stopped when started again with the same arguments.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from qllm_evals.metrics.bpb import bits_per_byte, default_prefix_token_id, utf8_prefix
from qllm_evals.models import DEFAULT_MODEL, load_causal_lm

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = REPO_ROOT.parent / "shared" / "data" / "wikitext-2" / "test.txt"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="short name, local HF directory or .gguf file")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="UTF-8 text file to score")
    parser.add_argument("--window", type=int, default=2048, help="tokens per forward pass")
    parser.add_argument("--stride", type=int, default=None, help="new tokens scored per window (default: window)")
    parser.add_argument("--max-bytes", type=int, default=None, help="score only this UTF-8 prefix of the text")
    parser.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    parser.add_argument("--prefix", default="auto",
                        help="token string put before the text: 'auto' (BOS, else EOS), 'none', or a token such "
                             "as '<|endoftext|>'")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    parser.add_argument("--out", type=Path, default=None, help="result JSON (default: results/bpb/<run>.json)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.text.is_file():
        raise SystemExit(f"--text: {args.text} does not exist (the offline data lives in ../shared/data)")
    text = utf8_prefix(args.text.read_text(encoding="utf-8"), args.max_bytes)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_causal_lm(args.model, device=device)
    if args.prefix == "auto":
        prefix_id = default_prefix_token_id(tokenizer)
    elif args.prefix == "none":
        prefix_id = None
    else:
        prefix_id = tokenizer.convert_tokens_to_ids(args.prefix)
        if prefix_id is None or prefix_id == tokenizer.unk_token_id:
            raise SystemExit(f"--prefix: {args.prefix!r} is not a single token of this tokenizer")
    stride = args.stride or args.window
    config = {
        "model": args.model, "text": str(args.text), "max_bytes": args.max_bytes, "window": args.window,
        "stride": stride, "prefix_token_id": prefix_id,
        "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
    }
    run_name = (f"{Path(args.model).stem}-{args.text.parent.name}-{args.text.stem}-w{args.window}-s{stride}"
                f"{'-b' + str(args.max_bytes) if args.max_bytes else ''}")
    out = args.out or REPO_ROOT / "results" / "bpb" / f"{run_name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    partial_path = out.with_suffix(".partial.json")
    resume = None
    if partial_path.is_file():
        saved = json.loads(partial_path.read_text())
        if saved.get("config") == config:
            resume = saved["state"]
            print(f"resuming from {partial_path}: {resume['windows_done']}/{resume['windows_total']} windows done")
        else:
            print(f"ignoring {partial_path}: it was written with different settings")

    def checkpoint(state: dict) -> None:
        tmp = partial_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"config": config, "state": state}))
        os.replace(tmp, partial_path)  # atomic: a kill never leaves a half-written checkpoint

    result = bits_per_byte(model, tokenizer, text, window=args.window, stride=stride, prefix_token_id=prefix_id,
                           batch_size=args.batch_size, progress=True, resume=resume, on_checkpoint=checkpoint)
    record = {**config, **result.to_dict(), "resumed": resume is not None, "threads": torch.get_num_threads(),
              "device": device}
    out.write_text(json.dumps(record, indent=2) + "\n")
    partial_path.unlink(missing_ok=True)
    print(f"\n{args.model} on {args.text} ({result.text_bytes:,} bytes, {result.scored_tokens:,} tokens, "
          f"window {args.window}, stride {stride})")
    print(f"  bits per byte     {result.bits_per_byte:.4f}")
    print(f"  byte perplexity   {result.byte_perplexity:.4f}")
    print(f"  token perplexity  {result.token_perplexity:.3f}")
    print(f"  tokens per byte   {result.scored_tokens / result.scored_bytes:.4f}")
    print(f"  seconds           {result.seconds:.1f}" + ("  (this session only; resumed)" if resume else ""))
    print(f"result written to {out}")
    return record


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
