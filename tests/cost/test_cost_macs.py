"""Analytic MACs against what `FlopCounterMode` measures on built models.

Stock `FlopCounterMode` on CPU (PyTorch 2.13) misses two things, asserted exactly here:
SDPA's fused CPU kernel (`_scaled_dot_product_flash_attention_for_cpu`: scores and weighted sum count 0)
and `aten.mv` (the "+" variants' pair-bias reduction). Under the MATH SDPA backend attention is counted.
`measured_flops` registers both and measures exactly 2 x MACs.
"""

from __future__ import annotations

import pytest
import torch
from cost_helpers import SMALL_ARCHS, example_inputs
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from qkvlab.arch import ModelConfig
from qkvlab.cost import STUDY_VARIANTS, macs, measured_flops, resolve_variant
from qkvlab.errors import QkvlabError
from qkvlab.models import build_model

SEQ, BATCH = 12, 2


def stock_flops(model, *inputs, **kwargs) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(*inputs, **kwargs)
    return counter.get_total_flops()


def _model(arch: ModelConfig, variant: str):
    try:
        cfg = arch.with_variant(variant)
    except QkvlabError:
        return None
    torch.manual_seed(0)
    return build_model(cfg).eval()


@pytest.mark.parametrize("arch_name", list(SMALL_ARCHS))
@pytest.mark.parametrize("variant", STUDY_VARIANTS)
def test_flop_counter_agrees_with_macs(arch_name, variant):
    arch = SMALL_ARCHS[arch_name]
    model = _model(arch, variant)
    if model is None:
        pytest.skip(f"{variant} does not apply to {arch_name}")
    inputs = example_inputs(arch, BATCH, SEQ)
    count = macs(arch, variant, None if arch.kind == "vit" else SEQ, BATCH)
    uncounted_sdpa = count["scores"] + count["weighted_sum"]
    # what this library measures: everything
    assert measured_flops(model, *inputs) == 2 * count["total"]
    # stock FlopCounterMode: the CPU SDPA kernel and aten.mv have no formula
    assert stock_flops(model, *inputs) == 2 * (count["total"] - uncounted_sdpa - count["pair_bias"])
    # the MATH backend decomposes SDPA into bmm ops over the full T x T matrix (GQA heads expanded)
    with sdpa_kernel(SDPBackend.MATH):
        assert stock_flops(model, *inputs) == 2 * (count["total"] - count["pair_bias"])


@pytest.mark.parametrize("variant", STUDY_VARIANTS)
@pytest.mark.parametrize("arch_name", ["gpt2-style", "llama-style"])
def test_decoding_with_a_cache(arch_name, variant):
    """A chunk after cached tokens: scores and weighted sum over past + new keys."""
    arch = SMALL_ARCHS[arch_name]
    model = _model(arch, variant)
    cache = model.make_cache(BATCH)
    with torch.no_grad():
        model(*example_inputs(arch, BATCH, 9), cache=cache)
    for new in (3, 1):  # a chunk, then one token
        count = macs(arch, variant, new, BATCH, past=int(cache.lengths.max()))
        assert measured_flops(model, *example_inputs(arch, BATCH, new), cache=cache) == 2 * count["total"]


def test_causal_attention_is_not_halved():
    arch = SMALL_ARCHS["gpt2-style"]
    decoder = macs(arch, "QKV", 16)
    encoder = macs(arch.replace(kind="encoder", n_classes=arch.vocab_size), "QKV", 16)
    assert decoder["scores"] == encoder["scores"] == arch.n_layers * arch.n_heads * 16 * 16 * arch.resolved_head_dim


def test_parts_add_up_and_scale():
    arch = SMALL_ARCHS["llama-style"]
    one, four = macs(arch, "Q-K=V", 10, 1), macs(arch, "Q-K=V", 10, 4)
    layer_parts = ("qkv", "scores", "weighted_sum", "out_proj", "mlp", "pair_bias")
    assert one["total"] == sum(one[p] for p in layer_parts) + one["input"] + one["head"]
    assert one["per_layer"] * arch.n_layers == sum(one[p] for p in layer_parts)
    assert four["total"] == 4 * one["total"]  # no pair bias here: everything scales with the batch


def test_projection_costs_follow_the_paper():
    """3, 2, 2, 1 d x d projections per token for QKV, Q=K-V, Q-K=V, Q=K=V (and Q=X: 2)."""
    arch = ModelConfig(n_layers=3, d_model=64, n_heads=4)
    per_token = {v: macs(arch, v, 5)["qkv"] // (3 * 5 * 64 * 64) for v in ("QKV", "Q=K-V", "Q-K=V", "Q=K=V", "Q=X")}
    assert per_token == {"QKV": 3, "Q=K-V": 2, "Q-K=V": 2, "Q=K=V": 1, "Q=X": 2}


def test_bad_sequence_arguments():
    arch = SMALL_ARCHS["gpt2-style"]
    for kwargs in (dict(seq_len=0), dict(seq_len=-3), dict(seq_len=4, batch=0), dict(seq_len=4, past=-1)):
        with pytest.raises(QkvlabError):
            macs(arch, "QKV", **kwargs)
    with pytest.raises(QkvlabError, match="only decoders"):
        macs(SMALL_ARCHS["encoder"], "QKV", 4, past=2)
    with pytest.raises(QkvlabError, match="5 tokens"):
        macs(SMALL_ARCHS["vit"], "QKV", 7)


@settings(max_examples=25, deadline=None)
@given(n_heads=st.sampled_from([1, 2, 4]), head_dim=st.sampled_from([2, 4, 6]), layers=st.integers(1, 2),
       seq=st.integers(1, 10), batch=st.integers(1, 3), kind=st.sampled_from(["decoder", "encoder"]),
       mlp=st.sampled_from(["gelu", "swiglu"]), bias=st.booleans(), positions=st.sampled_from(["learned", "rotary"]),
       variant=st.sampled_from(STUDY_VARIANTS + ("GQA-2", "Q-GQA-2", "Q=X/MQA")))
def test_random_configs_measure_2x_macs(n_heads, head_dim, layers, seq, batch, kind, mlp, bias, positions, variant):
    arch = ModelConfig(n_layers=layers, d_model=n_heads * head_dim, n_heads=n_heads, vocab_size=17, max_seq_len=12,
                       kind=kind, mlp=mlp, bias=bias, positions=positions, n_classes=3, pair_bias_dim=8)
    try:
        resolve_variant(arch, variant)
    except QkvlabError:
        assume(False)
    model = _model(arch, variant)
    assert measured_flops(model, *example_inputs(arch, batch, seq)) == 2 * macs(arch, variant, seq, batch)["total"]
