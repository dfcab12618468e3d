"""Sampler specs: short strings that name a sampler and its settings, for command lines and result tables.

Syntax (it nests inside a comma-separated ``--samplers`` list, so it never uses commas itself)::

    spec   := name ( ":" item )*
    item   := value | key "=" value          (at most one bare value, and only first: the sampler's main setting)

    greedy                          argmax
    temp:0.25                       temperature 0.25 (temp:0 is greedy)
    temp:0.7:top_p=0.9:top_k=50     classic chain: any of temperature/top_k/top_p/min_p/typical_p/rep
    topk:40   topp:0.9   minp:0.1   typical:0.9      one truncation at temperature 1 (add :temp=0.7 etc.)
    sample                          plain ancestral sampling (temperature 1, no truncation)
    power:alpha=4:steps=2:blocks=4  power sampling (PowerSampler); power:4 is power:alpha=4
    alpha    alpha:base_temperature=0.5          adaptive AlphaSampler (keys: AlphaSamplerConfig fields)
    entropix entropix:faithful   entropix:use_attention=false   EntropixSampler (keys: EntropixConfig fields)
    pbit     pbit:swap   pbit:mode=gibbs:sweeps=50   p-bit network sampler (PBitSampler)

Values are parsed as int, float, true/false or none, else kept as strings. Keys have short aliases (``steps`` for
``mcmc_steps``, ``topp`` for ``top_p``...). ``parse_sampler`` checks the syntax and the key names;
``SamplerSpec.build()`` constructs the sampler (importing its module only then), which validates the values.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# ------------------------------------------------------------------------------------------------ values


def parse_value(text: str) -> Any:
    """'4' -> 4, '0.25' -> 0.25, 'true' -> True, 'none' -> None, anything else stays a string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text.strip()


def _format_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value)) if abs(value) < 1e15 else repr(value)
    return str(value)


def _coerce(name: str, value: Any, kind: type | None, spec: str) -> Any:
    """Give a parsed value the type the sampler expects (4 -> 4.0 for a float setting); refuse impossible ones."""
    if kind is None or value is None:
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise ValueError(f"sampler spec {spec!r}: {name} must be {kind.__name__}, got {value!r}")


# ------------------------------------------------------------------------------------------------ registry

# Parameter types a spec string can carry; anything else (callables, tensors, lists) is not a spec key.
_SCALAR_TYPES = (bool, int, float, str)


@dataclass(frozen=True)
class Key:
    name: str  # the constructor argument (or config field)
    kind: type | None = None  # float/int/bool/str, or None to keep the parsed value
    aliases: tuple[str, ...] = ()


def _scalar_kind(annotation: Any, default: Any) -> type | None | bool:
    """The scalar type behind an annotation such as ``float | None`` or ``ParamLike | None``; False if none."""
    import types
    import typing

    if annotation in _SCALAR_TYPES:
        return annotation
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and args:
        scalars = [a for a in args if a in _SCALAR_TYPES]
        # ``int | float`` style unions and per-row parameters (``float | Tensor``): the widest scalar wins.
        for kind in (str, float, int, bool):
            if kind in scalars:
                return kind
        if all(a is type(None) for a in args):
            return None
        return False
    if annotation is Any or annotation is None:
        return type(default) if isinstance(default, _SCALAR_TYPES) else None
    return False


def signature_keys(target: Callable, aliases: dict[str, tuple[str, ...]] | None = None,
                   exclude: tuple[str, ...] = ()) -> tuple[Key, ...]:
    """Spec keys read from a constructor's signature, or a config dataclass's fields (one home for key names).

    Only scalar parameters (bool/int/float/str, optionally None) become keys; ``aliases`` adds short names.
    """
    import inspect
    import typing

    aliases = aliases or {}
    if dataclasses.is_dataclass(target):
        hints = typing.get_type_hints(target)
        items = [(f.name, hints.get(f.name, Any), f.default) for f in dataclasses.fields(target)]
    else:
        init = target.__init__ if isinstance(target, type) else target
        hints = typing.get_type_hints(init)
        parameters = inspect.signature(init).parameters.items()
        items = [(name, hints.get(name, Any), param.default) for name, param in parameters
                 if name != "self" and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD)]
    keys = []
    for name, annotation, default in items:
        kind = _scalar_kind(annotation, None if default is inspect.Parameter.empty else default)
        if kind is False or name in exclude:
            continue
        keys.append(Key(name, kind, aliases.get(name, ())))
    unknown = set(aliases) - {k.name for k in keys}
    if unknown:  # an alias for a parameter that no longer exists: the table drifted from the code
        raise RuntimeError(f"spec aliases {sorted(unknown)} name no parameter of {target.__name__}")
    return tuple(keys)


def _import(path: str):
    import importlib

    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class SamplerType:
    """One sampler name. Keys come from ``target``'s constructor signature (or ``config``'s fields), never copied."""

    name: str
    help: str
    target: str  # "module:Class", imported only when needed
    config: str | None = None  # "module:ConfigDataclass" for samplers built as Class(Config(**params))
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    exclude: tuple[str, ...] = ()  # constructor arguments that are not spec keys (e.g. pad_token_id)
    positional: str | None = None  # which key a bare value sets
    kind: str = "token"  # transitional: "sequence" samplers have .generate (generate() accepts both)
    fixed: dict = field(default_factory=dict)  # settings implied by the name (topp -> temperature 1)
    family: str = ""  # names of one family build the same class: temp:0.7 == sample:temp=0.7

    def keys(self) -> tuple[Key, ...]:
        return signature_keys(_import(self.config or self.target), self.aliases, self.exclude)

    def key_table(self) -> dict[str, Key]:
        table = {}
        for key in self.keys():
            for alias in (key.name, *key.aliases):
                table[alias] = key
        return table

    def build(self, params: dict):
        if self.config:
            return _import(self.target)(_import(self.config)(**params))
        return _import(self.target)(**params)


_CHAIN = "qllm_samplers.chain:SamplingChain"
_CHAIN_ALIASES = {
    "temperature": ("temp", "t"), "top_k": ("topk", "k"), "top_p": ("topp", "p"), "min_p": ("minp",),
    "typical_p": ("typical",), "repetition_penalty": ("rep", "penalty"), "repetition_window": ("rep_window",),
}
_POWER_ALIASES = {
    "alpha": ("a",), "mcmc_steps": ("steps", "mcmc"), "block_size": ("block",), "num_blocks": ("blocks",),
    "proposal_temperature": ("ptemp", "proposal_temp"), "early_rejection": ("early",), "stop_at_eos": ("stop",),
    "draft_tokens": ("drafts",), "proposals": ("tries",), "proposal_top_k": ("ptop_k", "ptopk"),
    "proposal_top_p": ("ptop_p", "ptopp"),
}
_POWER_SMC_ALIASES = {
    "alpha": ("a",), "particles": ("n",), "ess_threshold": ("ess",), "proposal_temperature": ("ptemp", "proposal_temp"),
    "proposal_top_k": ("ptop_k", "ptopk"), "proposal_top_p": ("ptop_p", "ptopp"),
}
_CHAIN_ONLY = ("min_tokens_to_keep", "candidates")


def _chain_type(name: str, help: str, positional: str | None, fixed: dict | None = None) -> SamplerType:
    return SamplerType(name, help, _CHAIN, aliases=_CHAIN_ALIASES, positional=positional, fixed=fixed or {},
                       family="chain")


SAMPLER_TYPES: dict[str, SamplerType] = {t.name: t for t in [
    SamplerType("greedy", "argmax decoding", "qllm_samplers.chain:Greedy"),
    _chain_type("temp", "temperature sampling, temp:T (0 = greedy); chain keys allowed", "temperature"),
    _chain_type("sample", "ancestral sampling at temperature 1; chain keys allowed", None, {"temperature": 1.0}),
    _chain_type("topk", "top-k sampling, topk:K", "top_k", {"temperature": 1.0}),
    _chain_type("topp", "nucleus sampling, topp:P", "top_p", {"temperature": 1.0}),
    _chain_type("minp", "min-p sampling, minp:P", "min_p", {"temperature": 1.0}),
    _chain_type("typical", "locally typical sampling, typical:P", "typical_p", {"temperature": 1.0}),
    SamplerType("power", "power sampling p^alpha by MCMC, power:alpha=4:steps=2:blocks=4",
                "qllm_samplers.power:PowerSampler", aliases=_POWER_ALIASES, exclude=("pad_token_id",),
                positional="alpha", kind="sequence"),
    SamplerType("power-smc", "power sampling p^alpha by sequential Monte Carlo, power-smc:alpha=4:particles=8",
                "qllm_samplers.smc:PowerSMC", aliases=_POWER_SMC_ALIASES, exclude=("pad_token_id", "return_particles"),
                positional="alpha", kind="sequence"),
    SamplerType("alpha", "adaptive alpha sampler; keys: AlphaSamplerConfig fields", "qllm_samplers.alpha:AlphaSampler",
                config="qllm_samplers.alpha:AlphaSamplerConfig"),
    SamplerType("entropix", "entropix quadrant sampler, entropix:MODE (normalised, faithful); keys: EntropixConfig "
                "fields", "qllm_samplers.entropix:EntropixSampler", config="qllm_samplers.entropix:EntropixConfig",
                positional="mode"),
    SamplerType("pbit", "p-bit network sampler over the top-50 tokens, pbit:MODE (gibbs, swap, shifted, tempering, "
                "original)",
                "qllm_samplers.pbit.token:PBitSampler", aliases={"max_retries": ("retries",), "top_k": ("topk",),
                                                                 "top_p": ("topp",)}, positional="mode"),
]}

SAMPLERS = tuple(SAMPLER_TYPES)


def sampler_help() -> str:
    """One line per sampler name, for --help texts."""
    return "\n".join(f"  {t.name:<9} {t.help}" for t in SAMPLER_TYPES.values())


# ------------------------------------------------------------------------------------------------ specs


@dataclass(frozen=True)
class SamplerSpec:
    """A parsed sampler spec. ``label`` is what the user wrote; ``canonical`` identifies the configuration."""

    label: str
    name: str
    params: dict  # constructor arguments given explicitly (canonical names, typed)

    @property
    def type(self) -> SamplerType:
        return SAMPLER_TYPES[self.name]

    @property
    def kind(self) -> str:
        return self.type.kind

    @property
    def kwargs(self) -> dict:
        return {**self.type.fixed, **self.params}

    @property
    def deterministic(self) -> bool:
        """True when the seed cannot change the output (greedy, temperature 0), so one seed is enough."""
        return self.name == "greedy" or (self.type.family == "chain" and self.kwargs.get("temperature") == 0)

    @property
    def canonical(self) -> str:
        items = [f"{k}={_format_value(v)}" for k, v in sorted(self.params.items())]
        return ":".join([self.name, *items])

    @property
    def identity(self) -> str:
        """Equal for specs that build the same sampler (temp:0.7 and sample:temp=0.7)."""
        items = [f"{k}={_format_value(v)}" for k, v in sorted(self.kwargs.items())]
        return ":".join([self.type.family or self.name, *items])

    def config(self) -> dict:
        return {"label": self.label, "name": self.name, "params": dict(sorted(self.params.items())),
                "canonical": self.canonical}

    def build(self):
        """Construct the sampler. Values are checked by the sampler itself (its ValueError names the spec)."""
        try:
            return self.type.build(self.kwargs)
        except ValueError as error:
            raise ValueError(f"sampler spec {self.label!r}: {error}") from error


def parse_sampler(spec: str) -> SamplerSpec:
    """Parse one spec such as ``power:alpha=4:steps=2``; unknown names or keys raise ValueError listing valid ones."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"sampler spec must be a non-empty string such as 'greedy' or 'temp:0.7', got {spec!r}")
    label = spec.strip()
    name, *items = [part.strip() for part in label.split(":")]
    name = name.lower()
    if name not in SAMPLER_TYPES:
        raise ValueError(f"unknown sampler {name!r} in spec {label!r}; valid samplers: {', '.join(SAMPLERS)}")
    sampler_type = SAMPLER_TYPES[name]
    table = sampler_type.key_table()
    params: dict[str, Any] = {}
    for position, item in enumerate(items):
        if not item:
            raise ValueError(f"sampler spec {label!r}: empty item between ':' separators")
        if "=" in item:
            key_text, _, value_text = item.partition("=")
            key = table.get(key_text.strip().lower())
            if key is None:
                raise ValueError(f"sampler spec {label!r}: unknown key {key_text.strip()!r} for {name!r}; valid "
                                 f"keys: {_describe_keys(table)}")
        else:
            if position != 0 or sampler_type.positional is None:
                where = "only first" if sampler_type.positional else f"not at all ({name!r} has no main setting)"
                raise ValueError(f"sampler spec {label!r}: bare value {item!r} allowed {where}; use key=value")
            key, value_text = table[sampler_type.positional], item
        if key.name in params:
            raise ValueError(f"sampler spec {label!r}: {key.name} is given twice")
        value = _coerce(key.name, parse_value(value_text), key.kind, label)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"sampler spec {label!r}: {key.name} must be finite, got {value}")
        params[key.name] = value
    if sampler_type.positional and sampler_type.positional not in params and name in ("temp", "topk", "topp",
                                                                                       "minp", "typical"):
        raise ValueError(f"sampler spec {label!r}: {name} needs a value, e.g. {name}:{_EXAMPLES[name]}")
    return SamplerSpec(label=label, name=name, params=params)


def _describe_keys(table: dict[str, Key]) -> str:
    """'alpha (a), block_size (block), ...': every key with its aliases, for error messages."""
    keys = sorted({k.name: k for k in table.values()}.values(), key=lambda k: k.name)
    return ", ".join(f"{k.name} ({', '.join(k.aliases)})" if k.aliases else k.name for k in keys) or "(none)"


_EXAMPLES = {"temp": "0.7", "topk": "40", "topp": "0.9", "minp": "0.1", "typical": "0.9"}


def parse_samplers(specs: str | list[str]) -> list[SamplerSpec]:
    """Parse a comma-separated list (or a list) of specs; the same configuration twice is an error."""
    items = specs.split(",") if isinstance(specs, str) else list(specs)
    parsed = [parse_sampler(item) for item in items if not isinstance(item, str) or item.strip()]
    if not parsed:
        raise ValueError(f"samplers: give at least one sampler spec; valid samplers: {', '.join(SAMPLERS)}")
    seen: dict[str, str] = {}
    for spec in parsed:
        if spec.identity in seen:
            raise ValueError(f"samplers: {seen[spec.identity]!r} and {spec.label!r} are the same configuration")
        seen[spec.identity] = spec.label
    return parsed
