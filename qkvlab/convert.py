"""Turn an existing checkpoint into another variant, or import a Hugging Face GPT-2 checkpoint.

Converting a trained QKV model to Q-K=V merges the key and value projections (by default their
mean, as GQA "uptraining" mean-pools heads; or keep one of them); converting to GQA/MQA
mean-pools key/value heads within each group. The converted model needs a short fine-tune.
Converting a tied model to an untied one (Q-K=V -> QKV) is exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qkvlab.errors import QkvlabError, check
from qkvlab.models.config import ModelConfig
from qkvlab.models.gpt import GPT
from qkvlab.nn.attention import Attention
from qkvlab.variants import parse_variant

MERGES = ("mean", "k", "v")


def _regroup_heads(t: torch.Tensor | None, heads: int, target: int, head_dim: int) -> torch.Tensor | None:
    """Rows of a key/value weight or bias with `heads` heads, as `target` heads.

    Fewer heads: mean-pool groups of consecutive heads (GQA uptraining). More heads: repeat each
    head for the query heads that shared it, which is exact.
    """
    if t is None or heads == target:
        return t
    per_head = t.reshape(heads, head_dim, *t.shape[1:])  # (heads, D, ...)
    if target > heads:
        per_head = per_head.repeat_interleave(target // heads, dim=0)  # (target, D, ...)
    else:
        per_head = per_head.reshape(target, heads // target, head_dim, *t.shape[1:]).mean(dim=1)
    return per_head.reshape(target * head_dim, *t.shape[1:])


def _merge(a, b, how: str):
    if a is None:
        return None
    return {"mean": lambda: (a + b) / 2, "k": lambda: a, "v": lambda: b}[how]()


def converted_projections(attn: Attention, config: ModelConfig, merge: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fused (weight, bias) that `config.variant` needs, derived from `attn`'s projections."""
    spec, src = config.spec, attn.projection_weights()
    D, H = attn.head_dim, attn.n_heads
    identity = (torch.eye(attn.qkv.in_features, dtype=attn.qkv.weight.dtype),  # Q = X as a projection
                None if attn.qkv.bias is None else attn.qkv.bias.new_zeros(attn.qkv.in_features))
    q = src.get("q") or (src["k"] if attn.spec.q_source == "k" else identity)
    k = src["k"]
    v = src.get("v", k)
    kv_heads = config.n_kv_heads
    if max(kv_heads, attn.n_kv_heads) % min(kv_heads, attn.n_kv_heads):
        raise QkvlabError(f"cannot regroup {attn.n_kv_heads} key/value heads into {kv_heads}: "
                          "one count must divide the other")
    k = tuple(_regroup_heads(t, attn.n_kv_heads, kv_heads, D) for t in k)
    v = tuple(_regroup_heads(t, attn.n_kv_heads, kv_heads, D) for t in v)
    if q[0].shape[0] != H * D:
        raise QkvlabError("the source's query comes from grouped heads; it cannot be converted to this variant")
    if spec.kv_tied:
        k = v = tuple(_merge(a, b, merge) for a, b in zip(k, v))
    if spec.q_source == "k":
        q = k = tuple(_merge(a, b, "mean") for a, b in zip(q, k))
    parts = {"q": q, "k": k, "v": v}
    names = spec.projections
    weight = torch.cat([parts[n][0] for n in names], dim=0)  # (sum widths, d_model)
    bias = torch.cat([parts[n][1] for n in names], dim=0) if attn.qkv.bias is not None else None
    return weight, bias


@torch.no_grad()
def convert_variant(model: GPT, variant: str, merge: str = "mean") -> GPT:
    """A new model of the same size as `model` with projections tied/shared as `variant` says."""
    check(merge in MERGES, f"merge {merge!r} is not one of {', '.join(MERGES)}")
    config = model.config.replace(variant=parse_variant(variant).name)
    check(config.resolved_head_dim == model.config.resolved_head_dim, "head_dim must not change")
    new = type(model)(config)
    target = new.state_dict()
    source = model.state_dict()
    for name in target:
        if ".attn.qkv." in name or ".attn.pair_bias." in name:
            continue
        target[name] = source[name]
    for block_new, block_old in zip(new.backbone.blocks, model.backbone.blocks):
        weight, bias = converted_projections(block_old.attn, config, merge)
        prefix = f"backbone.blocks.{block_new.attn.layer_idx}.attn.qkv."
        target[prefix + "weight"] = weight
        if bias is not None:
            target[prefix + "bias"] = bias
    new.load_state_dict(target)
    return new.train(model.training)


def _gpt2_key(state: dict, name: str) -> torch.Tensor:
    for prefix in ("transformer.", ""):
        if prefix + name in state:
            return state[prefix + name]
    raise QkvlabError(f"not a GPT-2 checkpoint: tensor {name!r} is missing")


@torch.no_grad()
def gpt2_from_state_dict(state: dict[str, torch.Tensor], hf_config: dict, variant: str = "QKV",
                         merge: str = "mean") -> GPT:
    """Our decoder from a Hugging Face GPT-2 state dict and its config.json (then converted to `variant`)."""
    act = hf_config.get("activation_function", "gelu_new")
    check(act in ("gelu_new", "gelu_pytorch_tanh"), f"GPT-2 activation {act!r} is not supported; accepted: gelu_new")
    n_inner = hf_config.get("n_inner") or 4 * hf_config["n_embd"]
    config = ModelConfig(kind="decoder", variant="QKV", n_layers=hf_config["n_layer"], d_model=hf_config["n_embd"],
                         n_heads=hf_config["n_head"], d_mlp=n_inner, max_seq_len=hf_config["n_positions"],
                         vocab_size=hf_config["vocab_size"], positions="learned", norm="layernorm", mlp="gelu",
                         bias=True, tie_embeddings=True, norm_eps=hf_config.get("layer_norm_epsilon", 1e-5))
    model = GPT(config)
    ours = {"tok_emb.weight": _gpt2_key(state, "wte.weight"),
            "backbone.pos_emb.weight": _gpt2_key(state, "wpe.weight"),
            "backbone.norm.weight": _gpt2_key(state, "ln_f.weight"),
            "backbone.norm.bias": _gpt2_key(state, "ln_f.bias")}
    renames = {"ln_1": "norm1", "ln_2": "norm2", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj",
               "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj"}
    for i in range(config.n_layers):
        for theirs, mine in renames.items():
            weight = _gpt2_key(state, f"h.{i}.{theirs}.weight")
            is_conv1d = not theirs.startswith("ln")
            ours[f"backbone.blocks.{i}.{mine}.weight"] = weight.t() if is_conv1d else weight  # Conv1D is (in, out)
            ours[f"backbone.blocks.{i}.{mine}.bias"] = _gpt2_key(state, f"h.{i}.{theirs}.bias")
    ours["lm_head.weight"] = ours["tok_emb.weight"]
    model.load_state_dict({k: v.float() for k, v in ours.items()})
    return model if parse_variant(variant).name == "QKV" else convert_variant(model, variant, merge)


def load_gpt2(path: str | Path, variant: str = "QKV", merge: str = "mean") -> GPT:
    """A GPT-2 checkpoint directory a user supplies (config.json + model.safetensors), as our decoder."""
    from safetensors.torch import load_file

    path = Path(path)
    weights, config_file = path / "model.safetensors", path / "config.json"
    if not (weights.is_file() and config_file.is_file()):
        raise QkvlabError(f"{str(path)!r} is not a GPT-2 checkpoint directory: expected config.json and "
                          "model.safetensors (the Hugging Face layout)")
    return gpt2_from_state_dict(load_file(str(weights)), json.loads(config_file.read_text()), variant, merge)
