"""Turn an existing checkpoint into another variant, or import a Hugging Face GPT-2 checkpoint.

Converting a trained QKV model to Q-K=V merges the key and value projections; converting to
GQA/MQA pools key/value heads within each group. The converted model needs a short fine-tune
(uptraining). Converting a tied model to an untied one (Q-K=V -> QKV) is exact. Merges:

- ``mean``: the mean of the key and value projections, heads mean-pooled (GQA uptraining);
- ``k`` / ``v``: keep the key (value) projection, heads mean-pooled;
- ``lsq``: a least-squares fit on calibration inputs. The literal objective "reproduce K and V
  on calibration inputs", ``min_W ||X W_k - X W||^2 + ||X W_v - X W||^2``, is solved by the mean
  for any inputs X, so it adds nothing. ``lsq`` instead minimises the errors the model sees: for
  each merged head s and each source head j it replaces, the score error of the queries that read
  it, ``E (q_h . (k_j - s))^2`` over the query heads h of j, and the value error through the output
  projection, ``E ||W_o,h (v_j - s)||^2``. With queries and keys taken as independent (a
  Kronecker-factored expectation) the input covariance cancels and the fit is closed-form:
  ``S = (sum_j A_j + B_j)^-1 sum_j (A_j K_j + B_j V_j)`` with ``A_j = sum_h E[q_h q_h^T]`` (the
  source's queries on the calibration inputs) and ``B_j = sum_h W_o,h^T W_o,h``, each divided by
  its mean trace over the layer's heads so that scores and values weigh alike. Isotropic A and B
  give back the mean. Untied GQA targets fit keys with A and values with B. Rotary positions are
  ignored in A (exact for learned positions, an approximation with rotary).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar, cast, overload

import torch
from safetensors import SafetensorError

from qkvlab.errors import QkvlabError, check
from qkvlab.models import Model
from qkvlab.models.config import ModelConfig
from qkvlab.models.gpt import GPT
from qkvlab.nn.attention import Attention
from qkvlab.variants import parse_variant

MERGES = ("mean", "k", "v", "lsq")
GPT2_SIZES = ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size")
M = TypeVar("M", bound=Model)  # convert_variant returns the kind of model it is given


@overload
def _regroup_heads(t: torch.Tensor, heads: int, target: int, head_dim: int) -> torch.Tensor: ...
@overload
def _regroup_heads(t: None, heads: int, target: int, head_dim: int) -> None: ...

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


def _augmented(w: torch.Tensor, b: torch.Tensor | None, heads: int, head_dim: int) -> torch.Tensor:
    """A projection's weight with its bias as one more column, per head: (heads, D, C[+1]) in float64."""
    full = w if b is None else torch.cat([w, b[:, None]], dim=1)  # (heads*D, C[+1])
    return full.double().reshape(heads, head_dim, -1)


def _fit(terms: list[tuple[torch.Tensor, torch.Tensor]], target: int) -> torch.Tensor:
    """Per target head g: argmin_S sum over terms and the source heads j of g of tr(M_j (X_j - S) (X_j - S)^T),
    i.e. (sum M_j)^-1 sum M_j X_j. `terms` are (M (heads, D, D), X (heads, D, C')); fewer source heads than
    `target` fit each head alone, then repeat it (exact)."""
    heads, D = terms[0][1].shape[:2]
    group = max(heads // target, 1)
    lhs = torch.stack([m.reshape(-1, group, D, D).sum(1) for m, _ in terms]).sum(0)  # (G, D, D)
    rhs = torch.stack([(m @ x).reshape(-1, group, D, x.shape[-1]).sum(1) for m, x in terms]).sum(0)  # (G, D, C')
    scale = lhs.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None]  # (G, 1, 1)
    lhs = lhs + 1e-9 * scale * torch.eye(D, dtype=lhs.dtype)  # a ridge far below any real curvature
    fitted = torch.linalg.solve(lhs, rhs)  # (G, D, C')
    return fitted.repeat_interleave(max(target // heads, 1), dim=0)  # (target, D, C')


def _lsq_kv(attn: Attention, k, v, kv_heads: int, tied: bool, query_moments: torch.Tensor):
    """(k, v) as (weight, bias) pairs with `kv_heads` heads, fitted by `lsq` (see the module docstring)."""
    H, S, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    w_o = attn.proj.weight.detach().double().reshape(-1, H, D).transpose(0, 1)  # (H, C, D)
    per_query = {"A": query_moments.double(), "B": w_o.transpose(1, 2) @ w_o}  # (H, D, D) each
    weights = {}
    for name, m in per_query.items():
        m = m.reshape(S, H // S, D, D).sum(1)  # (S, D, D): every query head that reads source head j
        weights[name] = m / m.diagonal(dim1=-2, dim2=-1).sum(-1).mean().clamp_min(1e-30)
    keys, values = _augmented(k[0], k[1], S, D), _augmented(v[0], v[1], S, D)
    if tied:
        fitted_k = fitted_v = _fit([(weights["A"], keys), (weights["B"], values)], kv_heads)
    else:
        fitted_k, fitted_v = _fit([(weights["A"], keys)], kv_heads), _fit([(weights["B"], values)], kv_heads)

    def split(t: torch.Tensor, like: tuple) -> tuple:
        flat = t.reshape(kv_heads * D, -1).to(like[0].dtype)  # (kv_heads*D, C[+1])
        return (flat, None) if like[1] is None else (flat[:, :-1].contiguous(), flat[:, -1].contiguous())

    return split(fitted_k, k), split(fitted_v, v)


def converted_projections(attn: Attention, config: ModelConfig, merge: str,
                          query_moments: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fused (weight, bias) that `config.variant` needs, derived from `attn`'s projections.

    `query_moments` (H, D, D), E[q q^T] of each query head on calibration inputs, is needed by `lsq` only.
    """
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
    if q[0].shape[0] != H * D:
        raise QkvlabError("the source's query comes from grouped heads; it cannot be converted to this variant")
    if merge == "lsq":
        if query_moments is None:
            raise QkvlabError("merge 'lsq' needs calibration inputs (the source's queries on them)")
        k, v = _lsq_kv(attn, k, v, kv_heads, spec.kv_tied, query_moments)
    else:
        k = (_regroup_heads(k[0], attn.n_kv_heads, kv_heads, D), _regroup_heads(k[1], attn.n_kv_heads, kv_heads, D))
        v = (_regroup_heads(v[0], attn.n_kv_heads, kv_heads, D), _regroup_heads(v[1], attn.n_kv_heads, kv_heads, D))
        if spec.kv_tied:
            k = v = tuple(_merge(a, b, merge) for a, b in zip(k, v, strict=True))
    if spec.q_source == "k":
        q = k = tuple(_merge(a, b, "mean") for a, b in zip(q, k, strict=True))
    parts = {"q": q, "k": k, "v": v}
    names = spec.projections
    weight = torch.cat([parts[n][0] for n in names], dim=0)  # (sum widths, d_model)
    biases = [b for n in names if (b := parts[n][1]) is not None]  # all of them when the layer has a bias
    bias = torch.cat(biases, dim=0) if attn.qkv.bias is not None else None
    return weight, bias


@torch.no_grad()
def query_moments(model: Model, calibration: torch.Tensor) -> list[torch.Tensor]:
    """Per attention layer, E[q q^T] (H, D, D, float64) of each query head of `model` on the inputs
    `calibration` (token ids (B, T) for a decoder), queries before rotation, in eval mode."""
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}

    def hook(index: int):
        def record(attn: Attention, args: tuple) -> None:
            q = attn.project(args[0])[0].double()  # (B, H, T, D)
            sums[index] = sums.get(index, 0) + torch.einsum("bhtd,bhte->hde", q, q)
            counts[index] = counts.get(index, 0) + q.shape[0] * q.shape[2]
        return record

    layers = [m for m in model.modules() if isinstance(m, Attention)]  # one per block, in order
    handles = [attn.register_forward_pre_hook(hook(i)) for i, attn in enumerate(layers)]
    was_training = model.training
    try:
        model.eval()
        model(calibration)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return [sums[i] / counts[i] for i in range(len(layers))]


@torch.no_grad()
def convert_variant(model: M, variant: str, merge: str = "mean", calibration: torch.Tensor | None = None) -> M:
    """A new model of the same size as `model` with projections tied/shared as `variant` says.

    `merge` says how key and value projections (and pooled heads) become one: mean, k, v, or lsq,
    which fits them on `calibration` (model inputs, e.g. token ids (B, T)); see the module docstring.
    """
    check(merge in MERGES, f"merge {merge!r} is not one of {', '.join(MERGES)}")
    if merge == "lsq" and calibration is None:
        raise QkvlabError("merge 'lsq' fits the merged projection on calibration inputs; "
                          "give some (e.g. a batch of token ids)")
    config = model.config.replace(variant=parse_variant(variant).name)
    check(config.resolved_head_dim == model.config.resolved_head_dim, "head_dim must not change")
    moments: list[torch.Tensor | None] = [None] * len(model.backbone.blocks)
    if merge == "lsq" and calibration is not None:
        moments = list(query_moments(model, calibration))
    new = type(model)(config)
    target = new.state_dict()
    source = model.state_dict()
    for name in target:  # every tensor both variants have (the "+" pair bias too) is carried over
        if ".attn.qkv." not in name and name in source and source[name].shape == target[name].shape:
            target[name] = source[name]
    old_layers = [m for m in model.modules() if isinstance(m, Attention)]  # one per block, in order
    for i, (attn, stats) in enumerate(zip(old_layers, moments, strict=True)):
        weight, bias = converted_projections(attn, config, merge, stats)
        prefix = f"backbone.blocks.{i}.attn.qkv."
        target[prefix + "weight"] = weight
        if bias is not None:
            target[prefix + "bias"] = bias
    new.load_state_dict(target)
    new.train(model.training)
    return new


def with_rotary_values(model: M, on: bool = True) -> M:
    """`model` with rotary values switched on (or off): the same weights in a model that also turns each value
    by its position and each head's output back by its query's (`ModelConfig.rotary_values`). A different
    function, not a re-parametrisation: the result needs uptraining. Needs rotary positions (a one-line error
    otherwise); the model is returned unchanged if it already has the setting."""
    if model.config.rotary_values == on:
        return model
    new = type(model)(model.config.replace(rotary_values=on))  # validated: rotary positions only
    new.load_state_dict(model.state_dict())  # rotation tables are buffers, not weights: the same state dict
    new.train(model.training)
    return new


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
    found = {key: hf_config.get(key) for key in GPT2_SIZES}
    for key, value in found.items():
        check(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
              f"GPT-2 config field {key!r} must be a positive integer, got {value!r}")
    sizes = cast(dict[str, int], found)  # checked just above
    n_inner = hf_config.get("n_inner") or 4 * sizes["n_embd"]
    eps = hf_config.get("layer_norm_epsilon", 1e-5)
    check(isinstance(n_inner, int) and n_inner >= 1, f"GPT-2 config field 'n_inner' must be a positive integer, "
                                                      f"got {n_inner!r}")
    check(isinstance(eps, (int, float)) and eps > 0,
          f"GPT-2 config field 'layer_norm_epsilon' must be > 0, got {eps!r}")
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
