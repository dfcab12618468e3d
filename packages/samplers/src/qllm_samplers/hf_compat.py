"""Every use of transformers internals in qllm_samplers, one small function per use.

transformers changes its private attributes between releases; keeping each access here (with a comment saying
what it touches and why) means a new release breaks one file, and a reader sees at once what we depend on.
Nothing here imports transformers at module level: ``qllm_samplers`` installs and runs with torch alone.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch


class WarperCapabilities(NamedTuple):
    truncating: bool  # only removes tokens from the distribution it is given (keeps the others' logits)
    reads_input_ids: bool  # its output depends on the context tokens, not only on the scores


# HF's logits warpers, by class name (we do not import transformers to recognise them). Only the ones whose
# behaviour we know: TopK/TopP/MinP/Typical only mask tokens; Temperature rescales; RepetitionPenalty reads ids.
_HF_WARPER_CAPABILITIES = {
    "TopKLogitsWarper": WarperCapabilities(truncating=True, reads_input_ids=False),
    "TopPLogitsWarper": WarperCapabilities(truncating=True, reads_input_ids=False),
    "MinPLogitsWarper": WarperCapabilities(truncating=True, reads_input_ids=False),
    "TypicalLogitsWarper": WarperCapabilities(truncating=True, reads_input_ids=False),
    "EpsilonLogitsWarper": WarperCapabilities(truncating=True, reads_input_ids=False),
    "EtaLogitsWarper": WarperCapabilities(truncating=True, reads_input_ids=False),
    "TemperatureLogitsWarper": WarperCapabilities(truncating=False, reads_input_ids=False),
    "RepetitionPenaltyLogitsProcessor": WarperCapabilities(truncating=False, reads_input_ids=True),
}
# What we assume of a warper that says nothing: it may change any logit and may read the context.
_UNKNOWN_WARPER = WarperCapabilities(truncating=False, reads_input_ids=True)


def hf_warper_capability(warper) -> WarperCapabilities | None:
    """Capabilities of a transformers logits warper, looked up by its class name (None: not a known HF warper)."""
    # Touches: HF class names (TopKLogitsWarper, ...). Why: HF warpers carry no capability attributes.
    if not type(warper).__module__.startswith("transformers"):
        return None
    return _HF_WARPER_CAPABILITIES.get(type(warper).__name__)


def warper_capabilities(warper) -> WarperCapabilities:
    """A warper's declared ``truncating``/``reads_input_ids`` class attributes, else HF's table, else unknown."""
    known = hf_warper_capability(warper) or _UNKNOWN_WARPER
    return WarperCapabilities(truncating=bool(getattr(warper, "truncating", known.truncating)),
                              reads_input_ids=bool(getattr(warper, "reads_input_ids", known.reads_input_ids)))


def is_plain_dynamic_cache(cache) -> bool:
    """True for an HF ``DynamicCache`` whose layers are all plain ``DynamicLayer`` (keys/values tensors)."""
    # Touches: DynamicCache.layers and the class names DynamicCache / DynamicLayer (transformers >= 4.56 layout).
    # Why: PowerSampler squeezes holes out of the cache by gathering each layer's key/value columns, which is
    # only right for full (unwindowed, unquantised) layers; subclasses (sliding window, offloaded) are excluded.
    layers = getattr(cache, "layers", None)
    return (layers is not None and type(cache).__name__ == "DynamicCache"
            and all(type(layer).__name__ == "DynamicLayer" for layer in layers))


def gather_cache_columns(cache, index: torch.Tensor) -> None:
    """Keep, per batch row, the cache positions ``index`` [B, T'] (in that order), in place."""
    # Touches: DynamicLayer.keys / .values ([B, heads, T, head_dim]), rebinding them. Why: there is no public
    # per-row column gather on DynamicCache (crop and batch_select_indices act on whole columns / rows).
    for layer in cache.layers:
        for name in ("keys", "values"):
            tensor = getattr(layer, name)
            expanded = index[:, None, :, None].expand(-1, tensor.shape[1], -1, tensor.shape[3])
            setattr(layer, name, tensor.gather(2, expanded))


def cache_rows_copy(cache, rows: torch.Tensor):
    """A cache holding ``rows`` of ``cache`` (repeats allowed), leaving ``cache`` itself untouched."""
    # Touches: vars(cache) (the cache object's attribute dict: HF's list of layer objects, QLLM's lists of
    # tensors). Why: batch_select_indices rebinds fresh (indexed) tensors rather than writing into the old ones,
    # so a shallow copy of the containers is enough: the original's tensors are shared, never modified, and no
    # full copy of the cache is made.
    selected = copy.copy(cache)
    for name, value in vars(cache).items():
        if isinstance(value, list):
            setattr(selected, name, [item if item is None or isinstance(item, torch.Tensor) else copy.copy(item)
                                     for item in value])
    selected.batch_select_indices(rows)
    return selected


# ---------------------------------------------------------------------------------------------------------------
# attention (qllm_samplers.signals.AttentionProbe)


def attention_implementation(model) -> str | None:
    """The attention implementation a transformers model runs ("sdpa", "eager", a registered name, ...)."""
    # Touches: config._attn_implementation (private). Why: it is the only record of which kernel the model
    # dispatches to; the probe wraps that kernel and must restore it exactly.
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def last_attention_layer(model):
    """The attention module with the largest ``layer_idx`` (the last layer), or None."""
    # Touches: the ``layer_idx`` attribute and the class-name suffix "Attention" of HF attention modules. Why:
    # HF exposes no list of attention modules; this picks them out of model.modules() across architectures.
    layers = [m for m in model.modules() if getattr(m, "layer_idx", None) is not None
              and type(m).__name__.endswith("Attention")]
    return max(layers, key=lambda m: m.layer_idx) if layers else None


def register_attention_function(name: str, function, mask_like: str) -> None:
    """Register ``function`` as attention implementation ``name`` (once), with the mask builder of ``mask_like``."""
    # Touches: AttentionInterface._global_mapping (private registry dict), and AttentionMaskInterface with the
    # sdpa/eager mask builders from transformers.masking_utils. Why: registering twice is harmless but the
    # registry has no public "is registered" query; a custom kernel also needs the mask format it expects.
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, function)
        AttentionMaskInterface.register(name, {"sdpa": sdpa_mask, "eager": eager_mask}[mask_like])


def attention_function(module, implementation: str):
    """The attention kernel ``implementation`` ("sdpa", "eager", ...) for an HF attention ``module``."""
    # Touches: transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS (the kernel registry) and, for "eager", the
    # module-level ``eager_attention_forward`` of the model's own modeling file. Why: eager attention is not in
    # the registry; each architecture defines its own, found next to the module's class.
    if implementation == "eager":
        import importlib

        return importlib.import_module(type(module).__module__).eager_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[implementation]
