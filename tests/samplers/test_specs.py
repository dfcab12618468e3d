"""Sampler specs: the syntax, the objects they build, and the errors for bad specs."""

from __future__ import annotations

import pytest

from qllm_samplers.specs import SAMPLERS, parse_sampler, parse_samplers, parse_value


def test_values_are_typed():
    assert parse_value("4") == 4 and isinstance(parse_value("4"), int)
    assert parse_value("0.25") == 0.25 and parse_value("1e-3") == 0.001
    assert parse_value("true") is True and parse_value("False") is False and parse_value("none") is None
    assert parse_value("gibbs") == "gibbs"


@pytest.mark.parametrize("spec,name,params,kind", [
    ("greedy", "greedy", {}, "token"),
    ("temp:0.25", "temp", {"temperature": 0.25}, "token"),
    ("topp:0.9", "topp", {"top_p": 0.9}, "token"),
    ("minp:0.1", "minp", {"min_p": 0.1}, "token"),
    ("topk:40:temp=0.7", "topk", {"top_k": 40, "temperature": 0.7}, "token"),
    ("temp:0.7:top_p=0.9:rep=1.1", "temp", {"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1}, "token"),
    ("power:alpha=4", "power", {"alpha": 4.0}, "sequence"),
    ("power:4:steps=2:blocks=4", "power", {"alpha": 4.0, "mcmc_steps": 2, "num_blocks": 4}, "sequence"),
    ("power:alpha=2:block=8:ptemp=0.5:early=false", "power",
     {"alpha": 2.0, "block_size": 8, "proposal_temperature": 0.5, "early_rejection": False}, "sequence"),
    ("alpha", "alpha", {}, "token"),
    ("alpha:base_temperature=0.5:lookahead=false", "alpha", {"base_temperature": 0.5, "lookahead": False}, "token"),
    ("entropix", "entropix", {}, "token"),
    ("pbit", "pbit", {}, "token"),
    ("pbit:swap:sweeps=4", "pbit", {"mode": "swap", "sweeps": 4}, "token"),
    (" Power : alpha = 4 ", "power", {"alpha": 4.0}, "sequence"),
])
def test_specs_parse(spec, name, params, kind):
    parsed = parse_sampler(spec)
    assert (parsed.name, parsed.params, parsed.kind) == (name, params, kind)
    assert parsed.label == spec.strip()


def test_specs_build_the_right_samplers():
    from qllm_samplers.alpha import AlphaSampler
    from qllm_samplers.chain import Greedy, SamplingChain
    from qllm_samplers.entropix import EntropixSampler
    from qllm_samplers.pbit.token import PBitSampler
    from qllm_samplers.power import PowerSampler

    assert isinstance(parse_sampler("greedy").build(), Greedy)
    chain = parse_sampler("topp:0.9:temp=0.7").build()
    assert isinstance(chain, SamplingChain)
    assert [type(w).__name__ for w in chain.warpers] == ["Temperature", "TopP"]
    power = parse_sampler("power:alpha=4:steps=2:blocks=4").build()
    assert isinstance(power, PowerSampler)
    assert (power.alpha, power.mcmc_steps, power.num_blocks, power.proposal_temperature) == (4.0, 2, 4, 0.25)
    alpha = parse_sampler("alpha:base_temperature=0.5").build()
    assert isinstance(alpha, AlphaSampler) and alpha.config.base_temperature == 0.5
    entropix = parse_sampler("entropix:use_attention=false").build()
    assert isinstance(entropix, EntropixSampler) and entropix.config.use_attention is False
    pbit = parse_sampler("pbit:swap:sweeps=4").build()
    assert isinstance(pbit, PBitSampler) and (pbit.mode, pbit.sweeps) == ("swap", 4)


def test_identity_and_determinism():
    assert parse_sampler("temp:0.7").identity == parse_sampler("sample:temp=0.7").identity
    assert parse_sampler("temp:0.7").identity != parse_sampler("topp:0.7").identity
    assert parse_sampler("temp:.25").canonical == parse_sampler("temp:0.25").canonical == "temp:temperature=0.25"
    assert parse_sampler("greedy").deterministic and parse_sampler("temp:0").deterministic
    assert not parse_sampler("temp:0.25").deterministic and not parse_sampler("power:4").deterministic


def test_comma_list():
    specs = parse_samplers("greedy,temp:0.25,power:alpha=4:steps=2,alpha,pbit")
    assert [s.label for s in specs] == ["greedy", "temp:0.25", "power:alpha=4:steps=2", "alpha", "pbit"]
    assert [s.label for s in parse_samplers(["greedy", "minp:0.1"])] == ["greedy", "minp:0.1"]


@pytest.mark.parametrize("spec,message", [
    ("nucleus:0.9", r"unknown sampler 'nucleus'.*valid samplers: greedy, temp, sample, topk, topp, minp, typical, "
                    r"power, power-smc, alpha, entropix, pbit"),
    ("temp", r"temp needs a value, e.g. temp:0.7"),
    ("temp:hot", r"temperature must be float, got 'hot'"),
    ("temp:inf", r"temperature must be finite"),
    ("power:beta=3", r"unknown key 'beta' for 'power'; valid keys: alpha \(a\), block_size \(block\), compaction, "
                     r"draft_tokens \(drafts\), early_rejection \(early\), mcmc_steps \(steps, mcmc\)"),
    ("power:alpha=4:a=2", r"alpha is given twice"),
    ("greedy:1", r"'greedy' has no main setting"),
    ("topp:0.9:0.8", r"bare value '0.8' allowed only first"),
    ("power::alpha=4", r"empty item"),
    ("alpha:nope=1", r"unknown key 'nope' for 'alpha'; valid keys: .*base_temperature"),
    ("", r"non-empty string"),
])
def test_bad_specs_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_samplers(spec) if "," in spec else parse_sampler(spec)


def test_bad_values_fail_at_build_naming_the_spec():
    with pytest.raises(ValueError, match=r"sampler spec 'pbit:mode=bogus': mode must be one of"):
        parse_sampler("pbit:mode=bogus").build()
    with pytest.raises(ValueError, match=r"sampler spec 'power:alpha=-1': alpha must be a finite number > 0"):
        parse_sampler("power:alpha=-1").build()
    with pytest.raises(ValueError, match=r"'temp:0.7' and 'sample:temp=0.7' are the same configuration"):
        parse_samplers("temp:0.7,sample:temp=0.7")
    with pytest.raises(ValueError, match="at least one sampler"):
        parse_samplers(" , ")
    assert set(SAMPLERS) >= {"greedy", "temp", "topp", "minp", "power", "alpha", "entropix", "pbit"}


def test_keys_come_from_constructor_signatures():
    """Every scalar constructor argument is a spec key, so the table cannot drift from the code."""
    import inspect

    from qllm_samplers.power import PowerSampler
    from qllm_samplers.specs import SAMPLER_TYPES

    expected = {name for name, param in inspect.signature(PowerSampler).parameters.items()
                if name not in ("proposal_warpers", "pad_token_id")}
    assert {k.name for k in SAMPLER_TYPES["power"].keys()} >= expected
    assert parse_sampler("power:drafts=0:compaction=prefill").build().draft_tokens == 0


def test_key_kinds_follow_annotations():
    from qllm_samplers.specs import signature_keys

    class Toy:
        def __init__(self, a: float = 1.0, b: int | None = None, c: bool = False, d: str = "x", e: list | None = None,
                     *, f=3):
            pass

    kinds = {k.name: k.kind for k in signature_keys(Toy, {"a": ("alpha_short",)})}
    assert kinds == {"a": float, "b": int, "c": bool, "d": str, "f": int}
    with pytest.raises(RuntimeError, match=r"spec aliases \['zz'\] name no parameter of Toy"):
        signature_keys(Toy, {"zz": ("z",)})
