"""Weight-decay groups and the learning-rate schedule."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from toy_task import ToyTask

from qkvlab.models import build_model
from qkvlab.models.config import ModelConfig, preset
from qkvlab.train.config import OptimConfig, ScheduleConfig
from qkvlab.train.optim import WarmupCosine, build_optimizer, build_scheduler, split_decay


def _names(model, params):
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_toy_groups_by_module_type_and_shape():
    model = ToyTask().build_model(ToyTask().model_config("QKV"))
    decay, no_decay = split_decay(model)
    assert _names(model, decay) == {"mix.weight"}
    assert _names(model, no_decay) == {"tok_emb.weight", "pos_emb", "mix.bias", "norm.weight", "norm.bias"}


@pytest.mark.parametrize("cfg", [
    preset("tiny", variant="Q-K=V"),
    preset("modern-tiny", variant="Q-GQA-2"),
    ModelConfig(kind="vit", variant="Q=K=V+", n_layers=1, d_model=32, n_heads=4, max_seq_len=17, image_size=8,
                patch_size=2),
    ModelConfig(kind="encoder", variant="Q=X", n_layers=1, d_model=32, n_heads=4, max_seq_len=16),
])
def test_real_models_decay_matrices_only(cfg):
    model = build_model(cfg)
    decay, no_decay = split_decay(model)
    named = dict(model.named_parameters())
    linear = {f"{m}.weight" for m, mod in model.named_modules()
              if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d))}  # e.g. a ViT's patch_emb projection
    assert len(decay) + len(no_decay) == len(named)  # each parameter once (tied ones too)
    assert not _names(model, decay) & _names(model, no_decay)
    for name in _names(model, decay):
        assert named[name].ndim >= 2 and "norm" not in name and "token" not in name, name
        assert "emb" not in name or name in linear, name
    for name, p in named.items():
        if p.ndim < 2 or "norm" in name or ("emb" in name and name not in linear) or "cls_token" in name:
            assert name in _names(model, no_decay), name
    assert decay, "the projections and MLP matrices decay"
    opt = build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.1))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_warmup_then_cosine_to_the_floor():
    f = WarmupCosine(total=100, warmup=10, min_ratio=0.1)
    assert [f(s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    tail = [f(s) for s in range(10, 100)]
    assert tail[0] == 1.0 and all(a >= b for a, b in itertools.pairwise(tail))
    assert f(55) == pytest.approx(0.55) and f(99) == pytest.approx(0.1, abs=1e-3) and f(500) == pytest.approx(0.1)
    assert WarmupCosine(total=10, warmup=0, kind="constant")(7) == 1.0


def test_scheduler_sets_the_optimizer_lr_per_step():
    p = torch.nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.AdamW([p], lr=2e-4)
    sched = build_scheduler(opt, ScheduleConfig(warmup_steps=4, min_lr_ratio=0.0), total_steps=20)
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[3] == pytest.approx(2e-4) and seen[0] == pytest.approx(5e-5)
    assert seen[-1] == pytest.approx(2e-4 * 0.5 * (1 + math.cos(math.pi * 15 / 16)))
