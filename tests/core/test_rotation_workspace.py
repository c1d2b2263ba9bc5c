"""The K = V rotary workspace: one layer's rotated keys, reused, counted apart from the cache."""

import pytest
import torch

from qkvlab.models import ModelConfig, build_model


def _decode(variant: str, positions: str):
    torch.manual_seed(0)
    cfg = ModelConfig(variant=variant, n_layers=3, d_model=32, n_heads=4, max_seq_len=24, vocab_size=40,
                      positions=positions)
    model = build_model(cfg).eval()
    cache = model.make_cache(2)
    idx = torch.randint(0, 40, (2, 6))
    with torch.no_grad():
        model(idx[:, :4], cache)
        model(idx[:, 4:5], cache)
        model(idx[:, 5:6], cache)
    return cfg, cache


@pytest.mark.parametrize("variant", ["Q-K=V", "Q=K=V", "Q-MQA"])
def test_rotary_kv_tied_uses_one_layer_of_workspace(variant):
    cfg, cache = _decode(variant, "rotary")
    D, layer_stream_bytes = cfg.resolved_head_dim, cache.nbytes // cfg.n_layers  # one stream, one layer
    assert cache.workspace_nbytes == 2 * cfg.n_kv_heads * cfg.max_seq_len * (D // 2) * 8  # complex64
    assert cache.workspace_nbytes == layer_stream_bytes  # float32 cache: 1/n_layers of what is stored


@pytest.mark.parametrize("variant, positions", [("QKV", "rotary"), ("Q-K=V", "learned"), ("GQA-2", "rotary")])
def test_no_workspace_when_keys_are_stored_rotated_or_not_rotated(variant, positions):
    _, cache = _decode(variant, positions)
    assert cache.workspace_nbytes == 0
