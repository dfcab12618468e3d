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
    entropix entropix:use_attention=false        EntropixSampler (keys: EntropixConfig fields)
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


@dataclass(frozen=True)
class Key:
    name: str  # the constructor argument
    kind: type | None = None  # float/int/bool/str, or None to keep the parsed value
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class SamplerType:
    name: str
    help: str
    build: Callable[[dict], Any]
    keys: tuple[Key, ...] | Callable[[], tuple[Key, ...]] = ()  # a callable reads them from a config dataclass
    positional: str | None = None  # which key a bare value sets
    kind: str = "token"  # "token": a TokenSampler for qllm_samplers.generate; "sequence": has .generate(...)
    fixed: dict = field(default_factory=dict)  # settings implied by the name (topp -> temperature 1)
    family: str = ""  # names of one family build the same class: temp:0.7 == sample:temp=0.7

    def key_table(self) -> dict[str, Key]:
        keys = self.keys() if callable(self.keys) else self.keys
        table = {}
        for key in keys:
            for alias in (key.name, *key.aliases):
                table[alias] = key
        return table


def _chain(params: dict):
    from qllm_samplers.chain import SamplingChain

    return SamplingChain(**params)


def _greedy(params: dict):
    from qllm_samplers.chain import Greedy

    return Greedy(**params)


def _power(params: dict):
    from qllm_samplers.power import PowerSampler

    return PowerSampler(**params)


def _dataclass_keys(module: str, config_class: str) -> Callable[[], tuple[Key, ...]]:
    def keys() -> tuple[Key, ...]:
        import importlib

        config = getattr(importlib.import_module(module), config_class)
        out = []
        for f in dataclasses.fields(config):
            default = f.default if f.default is not dataclasses.MISSING else None
            kind = type(default) if isinstance(default, (bool, int, float, str)) else None
            out.append(Key(f.name, kind))
        return tuple(out)

    return keys


def _with_config(module: str, sampler_class: str, config_class: str) -> Callable[[dict], Any]:
    def build(params: dict):
        import importlib

        mod = importlib.import_module(module)
        return getattr(mod, sampler_class)(getattr(mod, config_class)(**params))

    return build


def _pbit(params: dict):
    from qllm_samplers.pbit.token import PBitSampler

    return PBitSampler(**params)


_CHAIN_KEYS = (
    Key("temperature", float, ("temp", "t")),
    Key("top_k", int, ("topk", "k")),
    Key("top_p", float, ("topp", "p")),
    Key("min_p", float, ("minp",)),
    Key("typical_p", float, ("typical",)),
    Key("repetition_penalty", float, ("rep", "penalty")),
)

SAMPLER_TYPES: dict[str, SamplerType] = {t.name: t for t in [
    SamplerType("greedy", "argmax decoding", _greedy),
    SamplerType("temp", "temperature sampling, temp:T (0 = greedy); chain keys allowed", _chain, _CHAIN_KEYS,
                positional="temperature", family="chain"),
    SamplerType("sample", "ancestral sampling at temperature 1; chain keys allowed", _chain, _CHAIN_KEYS,
                fixed={"temperature": 1.0}, family="chain"),
    SamplerType("topk", "top-k sampling, topk:K", _chain, _CHAIN_KEYS, positional="top_k",
                fixed={"temperature": 1.0}, family="chain"),
    SamplerType("topp", "nucleus sampling, topp:P", _chain, _CHAIN_KEYS, positional="top_p",
                fixed={"temperature": 1.0}, family="chain"),
    SamplerType("minp", "min-p sampling, minp:P", _chain, _CHAIN_KEYS, positional="min_p",
                fixed={"temperature": 1.0}, family="chain"),
    SamplerType("typical", "locally typical sampling, typical:P", _chain, _CHAIN_KEYS, positional="typical_p",
                fixed={"temperature": 1.0}, family="chain"),
    SamplerType("power", "power sampling p^alpha by MCMC, power:alpha=4:steps=2:blocks=4", _power, (
        Key("alpha", float, ("a",)),
        Key("mcmc_steps", int, ("steps", "mcmc")),
        Key("block_size", int, ("block",)),
        Key("num_blocks", int, ("blocks",)),
        Key("proposal_temperature", float, ("ptemp", "proposal_temp")),
        Key("early_rejection", bool, ("early",)),
        Key("stop_at_eos", bool, ("stop",)),
    ), positional="alpha", kind="sequence"),
    SamplerType("alpha", "adaptive alpha sampler; keys: AlphaSamplerConfig fields",
                _with_config("qllm_samplers.alpha", "AlphaSampler", "AlphaSamplerConfig"),
                _dataclass_keys("qllm_samplers.alpha", "AlphaSamplerConfig")),
    SamplerType("entropix", "entropix quadrant sampler; keys: EntropixConfig fields",
                _with_config("qllm_samplers.entropix", "EntropixSampler", "EntropixConfig"),
                _dataclass_keys("qllm_samplers.entropix", "EntropixConfig")),
    SamplerType("pbit", "p-bit network sampler, pbit:MODE (gibbs, swap, shifted, tempering)", _pbit, (
        Key("mode", str), Key("lam", float), Key("beta", float), Key("sweeps", int), Key("update", str),
        Key("max_retries", int, ("retries",)), Key("replicas", int), Key("top_k", int, ("topk",)),
        Key("top_p", float, ("topp",)), Key("fallback", str),
    ), positional="mode"),
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
        """Construct the sampler. Values are checked by the sampler itself; errors name the spec."""
        try:
            return self.type.build(self.kwargs)
        except ImportError as error:
            raise ValueError(f"sampler {self.label!r} is not available: {error}") from error
        except (TypeError, ValueError) as error:
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
    try:
        table = sampler_type.key_table()
    except ImportError as error:
        raise ValueError(f"sampler {name!r} is not available: {error}") from error
    params: dict[str, Any] = {}
    for position, item in enumerate(items):
        if not item:
            raise ValueError(f"sampler spec {label!r}: empty item between ':' separators")
        if "=" in item:
            key_text, _, value_text = item.partition("=")
            key = table.get(key_text.strip().lower())
            if key is None:
                valid = sorted({k.name for k in table.values()})
                raise ValueError(f"sampler spec {label!r}: unknown key {key_text.strip()!r} for {name!r}; valid "
                                 f"keys: {', '.join(valid) or '(none)'}")
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
