"""Code that runs on CPU and CUDA unchanged makes every tensor where its inputs are. With no GPU here, this runs
each path on PyTorch's "meta" device (shapes only, no data): a tensor made on the CPU beside meta ones is an error,
which is what a forgotten `device=` is on CUDA."""

from __future__ import annotations

import pytest
import torch

from qkvlab.models import build_model
from tests.core.helpers import small

META = torch.device("meta")
LLAMA = dict(mlp="swiglu", norm="rmsnorm", bias=False, tie_embeddings=False)
DECODERS = [("QKV", "learned", {}), ("Q-K=V", "rotary", {}), ("Q=K-V", "rotary", {}), ("Q=K=V", "sinusoidal", {}),
            ("Q=X", "rotary", {}), ("Q-MQA", "rotary", {}), ("GQA-2", "rotary", LLAMA), ("Q-K=V+", "rotary", {}),
            ("Q-K=V", "rotary", dict(rotary_fraction=0.5))]


def _decoder(variant: str, positions: str, extra: dict):
    return build_model(small(variant=variant, positions=positions, **extra), seed=0).to(META)


@pytest.mark.parametrize("variant, positions, extra", DECODERS)
def test_training_runs_where_the_model_is(variant, positions, extra):
    model = _decoder(variant, positions, extra)
    x = torch.zeros(2, 8, dtype=torch.long, device=META)
    loss = model(x, targets=x)  # the chunked output layer and loss
    loss.backward()
    assert loss.device == META and model.tok_emb.weight.grad.device == META


@pytest.mark.parametrize("cache_dtype", [None, "int8"])
@pytest.mark.parametrize("variant, positions, extra", DECODERS)
def test_cached_decoding_runs_where_the_model_is(variant, positions, extra, cache_dtype):
    model = _decoder(variant, positions, extra).eval()
    x = torch.zeros(2, 6, dtype=torch.long, device=META)
    with torch.no_grad():
        cache = model.make_cache(2, 16, **({} if cache_dtype is None else {"dtype": cache_dtype}))
        model(x[:, :5], cache)  # prompt
        logits = model(x[:, 5:], cache)  # one token
    assert logits.device == META and all(b.device == META for b in cache.buffers)


@pytest.mark.parametrize("kind, extra", [("encoder", dict(variant="Q-K=V+", pair_bias_dim=8)),
                                         ("vit", dict(image_size=8, patch_size=4, in_channels=3, max_seq_len=5))])
def test_classifiers_run_where_the_model_is(kind, extra):
    model = build_model(small(kind, **extra), seed=0).to(META)
    x = (torch.zeros(2, 8, dtype=torch.long, device=META) if kind == "encoder"
         else torch.zeros(2, 3, 8, 8, device=META))
    model(x).sum().backward()
