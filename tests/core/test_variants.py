"""Variant names parse to the right spec, format back canonically, and bad names fail clearly."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkvlab.errors import QkvlabError
from qkvlab.models import ModelConfig
from qkvlab.variants import ACCEPTED_FORMS, ALIASES, PAPER_VARIANTS, VariantSpec, format_variant, parse_variant

# name -> (projections, cache_streams, kv_heads, symmetric, pair_bias, canonical name)
DOCUMENTED = {
    "QKV": (("q", "k", "v"), 2, None, False, False, "QKV"),
    "Q=K-V": (("k", "v"), 2, None, True, False, "Q=K-V"),
    "Q-K=V": (("q", "k"), 1, None, False, False, "Q-K=V"),
    "Q=K=V": (("k",), 1, None, True, False, "Q=K=V"),
    "Q=X": (("k", "v"), 2, None, False, False, "Q=X"),
    "Q=X-K=V": (("k",), 1, None, False, False, "Q=X-K=V"),
    "GQA-4": (("q", "k", "v"), 2, 4, False, False, "GQA-4"),
    "GQA-8": (("q", "k", "v"), 2, 8, False, False, "GQA-8"),
    "MQA": (("q", "k", "v"), 2, 1, False, False, "MQA"),
    "Q-GQA-4": (("q", "k"), 1, 4, False, False, "Q-GQA-4"),
    "Q-GQA-8": (("q", "k"), 1, 8, False, False, "Q-GQA-8"),
    "Q-MQA": (("q", "k"), 1, 1, False, False, "Q-MQA"),
    "Q=K-V+": (("k", "v"), 2, None, False, True, "Q=K-V+"),
    "Q=K=V+": (("k",), 1, None, False, True, "Q=K=V+"),
    # general "<proj>/<heads>" form
    "Q=X/GQA-2": (("k", "v"), 2, 2, False, False, "Q=X/GQA-2"),
    "Q=X-K=V/MQA": (("k",), 1, 1, False, False, "Q=X-K=V/MQA"),
    "QKV/GQA-2": (("q", "k", "v"), 2, 2, False, False, "GQA-2"),
    "Q-K=V/MQA": (("q", "k"), 1, 1, False, False, "Q-MQA"),
    "QKV/MHA": (("q", "k", "v"), 2, None, False, False, "QKV"),
    "GQA4": (("q", "k", "v"), 2, 4, False, False, "GQA-4"),
    "QKV+": (("q", "k", "v"), 2, None, False, True, "QKV+"),
    "Q-GQA-4+": (("q", "k"), 1, 4, False, True, "Q-GQA-4+"),
    "tied-kv/GQA-2": (("q", "k"), 1, 2, False, False, "Q-GQA-2"),
}

ALIAS_TARGETS = {
    "MHA": "QKV", "baseline": "QKV", "tied-kv": "Q-K=V", "kv": "Q-K=V", "tied-qk": "Q=K-V", "qk": "Q=K-V",
    "single": "Q=K=V", "tied-qkv": "Q=K=V", "no-q": "Q=X", "no-q-tied-kv": "Q=X-K=V",
    "tied_kv": "Q-K=V", "Tied-QK+": "Q=K-V+", "single+": "Q=K=V+",
}


@pytest.mark.parametrize("name", list(DOCUMENTED))
def test_documented_name_parses_to_its_spec(name):
    projections, streams, kv_heads, symmetric, pair_bias, canonical = DOCUMENTED[name]
    spec = parse_variant(name)
    assert spec.projections == projections
    assert spec.has_q_proj == ("q" in projections)
    assert spec.has_v_proj == ("v" in projections)
    assert spec.cache_streams == streams
    assert spec.kv_tied == (streams == 1)
    assert spec.kv_heads == kv_heads
    assert spec.n_kv_heads(16) == (16 if kv_heads is None else kv_heads)
    assert spec.symmetric is symmetric
    assert spec.pair_bias is pair_bias
    assert spec.name == canonical == format_variant(spec) == str(spec)


def test_every_paper_variant_is_documented_and_canonical():
    for name in PAPER_VARIANTS:
        assert name in DOCUMENTED
        assert parse_variant(name).name == name


@pytest.mark.parametrize("alias", list(ALIAS_TARGETS))
def test_alias_means_the_paper_name(alias):
    assert parse_variant(alias) == parse_variant(ALIAS_TARGETS[alias])
    assert parse_variant(alias).name == ALIAS_TARGETS[alias]


def test_every_alias_is_covered():
    assert {a.upper() for a in ALIAS_TARGETS} >= set(ALIASES)


def test_parse_accepts_a_spec_and_config_stores_the_canonical_name():
    spec = parse_variant("Q-GQA-4")
    assert parse_variant(spec) is spec
    assert ModelConfig(variant="tied-kv").variant == "Q-K=V"
    assert ModelConfig(variant=spec, n_heads=8, d_model=64).variant == "Q-GQA-4"


# --- round trip over every valid spec --------------------------------------------------
def _valid_specs():
    grouped = st.builds(VariantSpec, q_source=st.sampled_from(["q", "x"]), kv_tied=st.booleans(),
                        kv_heads=st.one_of(st.none(), st.integers(1, 256)), pair_bias=st.booleans())
    qk_tied = st.builds(VariantSpec, q_source=st.just("k"), kv_tied=st.booleans(), kv_heads=st.none(),
                        pair_bias=st.booleans())
    return st.one_of(grouped, qk_tied)


@given(_valid_specs())
def test_format_then_parse_round_trips(spec):
    name = format_variant(spec)
    assert parse_variant(name) == spec
    assert format_variant(parse_variant(name)) == name


@given(_valid_specs(), st.data())
def test_parse_ignores_case_and_spaces(spec, data):
    name = format_variant(spec)
    mangled = "".join(
        data.draw(st.sampled_from([c.lower(), c.upper()])) + data.draw(st.sampled_from(["", " ", "\t", "  "]))
        for c in name
    )
    assert parse_variant(" " + mangled + " ") == spec


@settings(max_examples=300)
@given(st.text(alphabet=st.sampled_from(list("QKVXqkvx=-+/ GAMH0123456789_")), max_size=14))
def test_parse_either_succeeds_or_raises_qkvlab_error(text):
    try:
        spec = parse_variant(text)
    except QkvlabError:
        return
    assert parse_variant(spec.name) == spec


# --- errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["", "   ", "QQV", "KQV", "Q=V", "Q=K", "Q-K", "XYZ", "Q=K=V++", "GQA", "GQA-x",
                                  "Q-K=V/XYZ", "FOO/GQA-2", "MQA-2", "Q-Q", "GQA-4/MQA"])
def test_unknown_name_lists_the_accepted_forms(name):
    with pytest.raises(QkvlabError) as info:
        parse_variant(name)
    message = str(info.value)
    assert ACCEPTED_FORMS in message
    for form in ("QKV", "Q=K-V", "Q-K=V", "Q=K=V", "Q=X", "GQA-<g>", "MQA"):
        assert form in message


@pytest.mark.parametrize("bad", [None, 3, ["QKV"]])
def test_non_string_names_raise(bad):
    with pytest.raises(QkvlabError):
        parse_variant(bad)


def test_zero_kv_heads_is_refused():
    with pytest.raises(QkvlabError):
        parse_variant("GQA-0")
    with pytest.raises(QkvlabError):
        VariantSpec(kv_heads=0)
    with pytest.raises(QkvlabError):
        VariantSpec(q_source="y")


@pytest.mark.parametrize("name", ["Q=K-V/GQA-2", "Q=K=V/MQA", "tied-qk/GQA-4", "Q=K=V/GQA-4+", "single/MQA"])
def test_query_tied_to_key_cannot_share_kv_heads(name):
    with pytest.raises(QkvlabError, match="cannot share key/value heads"):
        parse_variant(name)


@pytest.mark.parametrize("kv_tied", [False, True])
def test_query_tied_to_key_spec_with_kv_heads_is_refused(kv_tied):
    with pytest.raises(QkvlabError, match="identical"):
        VariantSpec(q_source="k", kv_tied=kv_tied, kv_heads=2)


@pytest.mark.parametrize("name,n_heads", [("GQA-3", 16), ("GQA-32", 16), ("Q-GQA-5", 16), ("Q=X/GQA-3", 8),
                                          ("GQA-4", 2), ("GQA-2", 3)])
def test_validate_refuses_kv_heads_not_dividing_heads(name, n_heads):
    spec = parse_variant(name)
    with pytest.raises(QkvlabError, match="dividing"):
        spec.validate(n_heads)
    with pytest.raises(QkvlabError):
        spec.n_kv_heads(n_heads)
    with pytest.raises(QkvlabError):
        spec.cache_fraction(n_heads)


@pytest.mark.parametrize("name,n_heads", [("GQA-4", 16), ("GQA-16", 16), ("MQA", 7), ("Q-GQA-2", 8), ("QKV", 5)])
def test_validate_accepts_dividing_kv_heads(name, n_heads):
    parse_variant(name).validate(n_heads)


# From PAPER.md's table, 16 query heads; the untabled rows follow from the first table.
@pytest.mark.parametrize("name,fraction", [
    ("GQA-4", 0.25), ("Q-K=V", 0.5), ("Q-GQA-4", 0.125), ("MQA", 1 / 16), ("Q-MQA", 1 / 32),
    ("QKV", 1.0), ("Q=K-V", 1.0), ("Q=K=V", 0.5), ("Q=X", 1.0), ("Q=X-K=V", 0.5), ("Q=K=V+", 0.5),
])
def test_cache_fraction_matches_the_paper(name, fraction):
    assert parse_variant(name).cache_fraction(16) == fraction
