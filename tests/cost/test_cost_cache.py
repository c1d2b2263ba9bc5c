"""KV-cache bytes: analytic == `KVCache.nbytes`, and the paper's ratios."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from cost_helpers import SMALL_ARCHS
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from qkvlab.arch import ModelConfig
from qkvlab.cost import (
    ARCHS,
    STUDY_VARIANTS,
    cache_bytes,
    cache_bytes_per_token,
    cache_ratio,
    dtype_bytes,
    resolve_variant,
)
from qkvlab.errors import QkvlabError
from qkvlab.models import PRESETS, preset
from qkvlab.nn.kv_cache import KVCache
from qkvlab.variants import VariantSpec, format_variant

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64,
          "fp8": torch.float8_e4m3fn, "int8": torch.int8}


@pytest.mark.parametrize("variant", STUDY_VARIANTS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_equals_kv_cache_nbytes(variant, dtype):
    arch = SMALL_ARCHS["llama-style"]
    cfg = arch.with_variant(variant)
    for batch, context in ((1, 1), (3, 17), (2, arch.max_seq_len)):
        cache = KVCache.for_model(cfg, batch, context, DTYPES[dtype])
        assert cache_bytes(arch, variant, context, batch, dtype) == cache.nbytes
        assert cache_bytes(arch, variant, context, batch, DTYPES[dtype]) == cache.nbytes
        assert cache_bytes_per_token(arch, variant, dtype) == cache.bytes_per_token


@pytest.mark.parametrize("name", ["paper-300m", "paper-1.2b"])
@pytest.mark.parametrize("variant", STUDY_VARIANTS)
def test_paper_presets_on_meta(name, variant):
    cfg = preset(name, variant=variant)
    cache = KVCache.for_model(cfg, 4, cfg.max_seq_len, torch.bfloat16, device="meta")
    assert cache_bytes(cfg, variant, cfg.max_seq_len, 4, "bf16") == cache.nbytes


def test_llama_at_128k_on_meta():
    arch = ARCHS["llama-3.1-8b"]
    for variant in ("QKV", "Q-K=V", "MQA", "Q-MQA"):
        cache = KVCache.for_model(arch.with_variant(variant), 1, 131072, torch.bfloat16, device="meta")
        assert cache_bytes(arch, variant, 131072, 1, "bf16") == cache.nbytes
    assert cache_bytes(arch, "QKV", 131072, 1, "bf16") == 16 * 2 ** 30  # 32 x 2 x 8 x 128 x 2 bytes per token
    assert cache_bytes(arch, "Q-K=V", 131072, 1, "bf16") == 8 * 2 ** 30


@settings(max_examples=100, deadline=None)
@given(layers=st.integers(1, 4), n_heads=st.sampled_from([1, 2, 3, 4, 6, 8, 12, 16]), head_dim=st.integers(1, 16),
       kv=st.integers(1, 16), own_kv=st.booleans(), batch=st.integers(1, 4), context=st.integers(1, 64),
       dtype=st.sampled_from(list(DTYPES)),
       variant=st.sampled_from(STUDY_VARIANTS + ("GQA-2", "GQA-3", "Q-GQA-2", "Q=X/GQA-2", "Q=X-K=V/MQA")))
def test_random_configs_on_meta(layers, n_heads, head_dim, kv, own_kv, batch, context, dtype, variant):
    assume(not own_kv or n_heads % kv == 0 and kv <= n_heads)
    own = format_variant(VariantSpec(kv_heads=kv if own_kv else None))
    arch = ModelConfig(n_layers=layers, d_model=n_heads * head_dim, n_heads=n_heads, variant=own, max_seq_len=64)
    try:
        cfg = arch.with_variant(variant)
    except QkvlabError:
        with pytest.raises(QkvlabError):
            cache_bytes(arch, variant, context, batch, dtype)
        return
    cache = KVCache.for_model(cfg, batch, context, DTYPES[dtype], device="meta")
    assert cache_bytes(arch, variant, context, batch, dtype) == cache.nbytes


# The paper's table: cache relative to QKV with 16 query heads.
PAPER_RATIOS = {"GQA-4": Fraction(4, 16), "Q-K=V": Fraction(1, 2), "Q-GQA-4": Fraction(4, 32),
                "MQA": Fraction(1, 16), "Q-MQA": Fraction(1, 32), "Q=K-V": Fraction(1), "Q=K=V": Fraction(1, 2)}


@pytest.mark.parametrize("variant", list(PAPER_RATIOS))
def test_paper_ratios_for_16_heads(variant):
    arch = PRESETS["paper-300m"]
    assert arch.n_heads == 16
    arch = arch
    ratio = Fraction(cache_bytes(arch, variant, 2048), cache_bytes(arch, "QKV", 2048))
    assert ratio == PAPER_RATIOS[variant]
    assert Fraction(*cache_ratio(arch, variant)) == PAPER_RATIOS[variant]
    assert resolve_variant(arch, variant).cache_fraction(16) == float(PAPER_RATIOS[variant])


def test_variants_follow_the_models_own_kv_heads():
    arch = ARCHS["llama-3-8b"]
    assert resolve_variant(arch, "QKV").name == "GQA-8"
    assert resolve_variant(arch, "tied-kv").name == "Q-GQA-8"
    assert resolve_variant(arch, "Q=X").name == "Q=X/GQA-8"
    assert resolve_variant(arch, "MQA").name == "MQA"  # a variant's own head sharing wins
    assert cache_ratio(arch, "Q-K=V") == (1, 2)
    for variant in ("Q=K-V", "Q=K=V", "Q=K-V+", "Q=K=V+"):
        with pytest.raises(QkvlabError, match="ties Q to K"):
            resolve_variant(arch, variant)


def test_dtype_names():
    for name, dtype in DTYPES.items():
        assert dtype_bytes(name) == dtype.itemsize == dtype_bytes(dtype)
    assert dtype_bytes("bfloat16") == dtype_bytes("torch.float16") == dtype_bytes("HALF") == 2
    with pytest.raises(QkvlabError, match="unknown dtype 'fp13'; accepted: fp64, fp32, bf16"):
        dtype_bytes("fp13")


def test_bad_context_and_batch():
    arch = SMALL_ARCHS["gpt2-style"]
    for context, batch in ((0, 1), (-1, 1), (4, 0), (4, -2)):
        with pytest.raises(QkvlabError, match="must be a positive integer"):
            cache_bytes(arch, "QKV", context, batch)
