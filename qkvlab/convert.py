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
from safetensors import SafetensorError

from qkvlab.errors import QkvlabError, check
from qkvlab.models.config import ModelConfig
from qkvlab.models.gpt import GPT
from qkvlab.nn.attention import Attention
from qkvlab.variants import parse_variant

MERGES = ("mean", "k", "v")
GPT2_SIZES = ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size")


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
    for name in target:  # every tensor both variants have (the "+" pair bias too) is carried over
        if ".attn.qkv." not in name and name in source and source[name].shape == target[name].shape:
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
    check(isinstance(hf_config, dict), f"a GPT-2 config.json must hold a JSON object, not {type(hf_config).__name__}")
    act = hf_config.get("activation_function", "gelu_new")
    check(act in ("gelu_new", "gelu_pytorch_tanh"), f"GPT-2 activation {act!r} is not supported; accepted: gelu_new")
    sizes = {key: hf_config.get(key) for key in GPT2_SIZES}
    for key, value in sizes.items():
        check(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
              f"GPT-2 config field {key!r} must be a positive integer, got {value!r}")
    n_inner = hf_config.get("n_inner") or 4 * sizes["n_embd"]
    eps = hf_config.get("layer_norm_epsilon", 1e-5)
    check(isinstance(n_inner, int) and n_inner >= 1, f"GPT-2 config field 'n_inner' must be a positive integer, "
                                                      f"got {n_inner!r}")
    check(isinstance(eps, (int, float)) and eps > 0, f"GPT-2 config field 'layer_norm_epsilon' must be > 0, got {eps!r}")
    config = ModelConfig(kind="decoder", variant="QKV", n_layers=sizes["n_layer"], d_model=sizes["n_embd"],
                         n_heads=sizes["n_head"], d_mlp=n_inner, max_seq_len=sizes["n_positions"],
                         vocab_size=sizes["vocab_size"], positions="learned", norm="layernorm", mlp="gelu",
                         activation="gelu_tanh", bias=True, tie_embeddings=True, norm_eps=float(eps))
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
    expected = model.state_dict()
    for name, tensor in ours.items():
        if tensor.shape != expected[name].shape:
            raise QkvlabError(f"GPT-2 tensor for {name!r} has shape {tuple(tensor.shape)}, but config.json implies "
                              f"{tuple(expected[name].shape)}")
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
    try:
        hf_config = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise QkvlabError(f"{config_file} is not valid JSON: {err}") from None
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise QkvlabError(f"cannot read {weights}: {err}") from None
    try:
        return gpt2_from_state_dict(state, hf_config, variant, merge)
    except QkvlabError as err:
        raise QkvlabError(f"{path}: {err}") from None
