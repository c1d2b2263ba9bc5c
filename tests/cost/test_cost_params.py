"""Analytic parameter counts equal the built models' for every variant, preset, kind and named arch."""

from __future__ import annotations

import pytest
from cost_helpers import SMALL_ARCHS, build, numel
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from qkvlab.arch import ModelConfig
from qkvlab.cost import ARCHS, STUDY_VARIANTS, pair_bias_widths, param_counts, resolve_variant
from qkvlab.errors import QkvlabError
from qkvlab.models import PRESETS, preset
from qkvlab.nn.positions import PairBias
from qkvlab.variants import PAPER_VARIANTS, VariantSpec, format_variant

MORE_VARIANTS = STUDY_VARIANTS + ("Q=X/MQA", "Q=X-K=V/GQA-2", "GQA-2+", "Q-MQA+", "Q=X+")


def test_study_variants_are_the_papers_plus_q_x_k_v():
    assert set(STUDY_VARIANTS) == set(PAPER_VARIANTS) | {"Q=X-K=V"}
    assert len(STUDY_VARIANTS) == len(set(STUDY_VARIANTS))


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("variant", STUDY_VARIANTS)
def test_presets_every_variant(name, variant):
    if PRESETS[name].n_heads % 8 and "8" in variant:
        pytest.skip(f"{variant} does not fit {name}'s {PRESETS[name].n_heads} heads")
    cfg = preset(name, variant=variant)
    arch = cfg
    counts = param_counts(arch, cfg.variant)
    assert counts["total"] == numel(build(cfg))
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")


@pytest.mark.parametrize("arch_name", list(SMALL_ARCHS))
@pytest.mark.parametrize("variant", MORE_VARIANTS)
def test_every_kind_every_variant(arch_name, variant):
    arch = SMALL_ARCHS[arch_name]
    try:
        cfg = arch.with_variant(variant)
    except QkvlabError:  # Q=X on an arch whose heads do not span d_model: refused by both
        with pytest.raises(QkvlabError):
            resolve_variant(arch, variant)
        return
    assert param_counts(arch, variant)["total"] == numel(build(cfg))


@pytest.mark.parametrize("arch_name", [name for name in ARCHS if name not in PRESETS])  # presets: above
@pytest.mark.parametrize("variant", ["QKV", "Q-K=V", "Q=X-K=V", "Q-MQA", "Q=K=V+"])
def test_named_archs(arch_name, variant):
    arch = ARCHS[arch_name]
    try:
        cfg = arch.with_variant(variant)
    except QkvlabError:  # Q=K=V+ on a GQA model
        assert arch.spec.kv_heads is not None and variant == "Q=K=V+"
        return
    assert param_counts(arch, variant)["total"] == numel(build(cfg))


# Totals the original releases report (e.g. `num_parameters()` of the Hugging Face checkpoints).
PUBLISHED = {"llama-3-8b": 8_030_261_248, "llama-2-7b": 6_738_415_616, "mistral-7b": 7_241_732_096,
             "gpt2": 124_439_808, "gpt2-medium": 354_823_168}


@pytest.mark.parametrize("arch_name", list(PUBLISHED))
def test_real_models_match_published_totals(arch_name):
    assert param_counts(ARCHS[arch_name])["total"] == PUBLISHED[arch_name]


def test_paper_archs_are_the_presets():
    for name in ("paper-300m", "paper-1.2b"):
        assert ARCHS[name] is PRESETS[name]  # one description of an architecture, not a copy


def test_a_configs_head_sharing_is_the_archs():
    arch = preset("tiny", variant="Q-GQA-2")
    assert arch.n_kv_heads == 2
    assert resolve_variant(arch, "QKV").name == "GQA-2"
    assert param_counts(arch) == param_counts(arch, "Q-K=V") == param_counts(arch, "Q-GQA-2")
    assert param_counts(arch) != param_counts(arch, "QKV")


@pytest.mark.parametrize("dim", [8, 16, 24, 32, 64])
def test_pair_bias_widths_match_the_module(dim):
    module = PairBias(4, dim)
    assert pair_bias_widths(dim) == (module.rel.shape[1], module.abs.shape[1])
    assert sum(p.numel() for p in module.parameters()) == dim + 1


def _heads(kv_heads: int | None) -> str:
    return format_variant(VariantSpec(kv_heads=kv_heads))


@st.composite
def small_configs(draw):
    kind = draw(st.sampled_from(["decoder", "encoder", "vit"]))
    n_heads = draw(st.sampled_from([1, 2, 3, 4, 6, 8]))
    head_dim = draw(st.sampled_from([2, 3, 4, 8]))
    positions = draw(st.sampled_from(["learned", "sinusoidal", "rotary", "none"]))
    explicit_head_dim = draw(st.booleans())
    d_model = draw(st.integers(4, 48)) if explicit_head_dim else n_heads * head_dim
    if (positions == "rotary" and head_dim % 2) or (positions == "sinusoidal" and d_model % 2):
        positions = "learned"
    kv_choices = [None] + [g for g in range(1, n_heads + 1) if n_heads % g == 0]
    fields = dict(
        kind=kind, n_layers=draw(st.integers(1, 3)), d_model=d_model, n_heads=n_heads,
        variant=_heads(draw(st.sampled_from(kv_choices))), head_dim=head_dim if explicit_head_dim else None,
        d_mlp=draw(st.one_of(st.none(), st.integers(1, 64))), vocab_size=draw(st.integers(1, 100)),
        mlp=draw(st.sampled_from(["gelu", "swiglu"])), norm=draw(st.sampled_from(["layernorm", "rmsnorm"])),
        bias=draw(st.booleans()), tie_embeddings=draw(st.booleans()), positions=positions,
        max_seq_len=draw(st.integers(1, 40)), pair_bias_dim=8 * draw(st.integers(1, 5)),
        n_classes=draw(st.integers(1, 12)),
    )
    if kind == "encoder":
        fields["input_dim"] = draw(st.one_of(st.none(), st.integers(1, 9)))
    if kind == "vit":
        patch = draw(st.integers(1, 4))
        fields.update(patch_size=patch, image_size=patch * draw(st.integers(1, 3)), in_channels=draw(st.integers(1, 3)),
                      dense_head=draw(st.booleans()))
        fields["max_seq_len"] = (fields["image_size"] // patch) ** 2 + 1 + draw(st.integers(0, 3))
    return ModelConfig(**fields), draw(st.sampled_from(MORE_VARIANTS))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_configs())
def test_random_small_configs(case):
    arch, variant = case
    try:
        spec = resolve_variant(arch, variant)
    except QkvlabError:
        assume(False)
    cfg = arch.with_variant(variant)
    assert cfg.spec == spec
    assert param_counts(arch, variant)["total"] == numel(build(cfg))
