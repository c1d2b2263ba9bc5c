"""Import Hugging Face Llama weights (`LlamaForCausalLM`: config.json + safetensors) into our modern decoder.

The architecture maps one to one: rotary positions (`rope_theta`, default rope only; a
`partial_rotary_factor` below 1 only where the installed Llama honours it), RMSNorm,
SwiGLU (`[gate | up]` fused into our `mlp.fc`), grouped key/value heads (`num_key_value_heads` ->
GQA-g / MQA), no biases (or biases on both attention and MLP), tied or untied output head.

One layout differs: Hugging Face rotates the pairs (x[i], x[i + D/2]) of each head (`rotate_half`),
qkvlab the pairs (x[2i], x[2i + 1]) (`qkvlab.nn.positions`). Within every head we reorder the rows
of the query and key projections so that HF row i becomes our row 2i and HF row i + D/2 our row
2i + 1; the same rotation then acts on the same numbers and q·k is unchanged. The value rows (and
the matching columns of the output projection) are reordered the same way, which changes nothing
in the output but keeps K and V in one basis: a Llama whose keys equal its values stays so, and
merging K and V (`qkvlab convert --variant Q-GQA-2`) averages the rows Hugging Face would.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from safetensors import SafetensorError

from qkvlab.arch import ModelConfig
from qkvlab.convert import MERGES, convert_variant
from qkvlab.errors import QkvlabError, check
from qkvlab.models.gpt import GPT
from qkvlab.variants import VariantSpec, parse_variant

SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
_IGNORED = (".rotary_emb.inv_freq",)  # buffers older checkpoints saved


def _positive_int(cfg: dict, key: str, default=None) -> int:
    value = cfg.get(key)
    value = default if value is None else value
    check(isinstance(value, int) and not isinstance(value, bool) and value > 0,
          f"Llama config field {key!r} must be a positive integer, got {value!r}")
    return value


def rope_theta(cfg: dict) -> float:
    """The rotary base of a Llama config.json (older `rope_theta` + `rope_scaling`, or `rope_parameters`);
    scaled rope variants (linear, dynamic, llama3, yarn, ...) are refused."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    check(isinstance(params, dict) and isinstance(scaling, dict), "Llama rope_parameters/rope_scaling must be objects")
    kinds = [k for k in (params.get("rope_type"), scaling.get("rope_type"), scaling.get("type"))
             if k not in (None, "default")]
    if kinds:
        raise QkvlabError(f"Llama rope type {kinds[0]!r} is not supported; accepted: default (plain rotary)")
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    check(isinstance(theta, (int, float)) and not isinstance(theta, bool) and theta > 0,
          f"Llama rope_theta must be a positive number, got {theta!r}")
    return float(theta)


def rotary_fraction(cfg: dict) -> float:
    """The `partial_rotary_factor` of a Llama config.json (1.0 when absent). Below 1 it is accepted only
    where the installed transformers' LlamaForCausalLM honours it; one that ignores it rotates every dim."""
    params = cfg.get("rope_parameters") or {}
    factor = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    factor = 1.0 if factor is None else factor
    check(isinstance(factor, (int, float)) and not isinstance(factor, bool) and 0 < factor <= 1,
          f"Llama partial_rotary_factor must be a number in (0, 1], got {factor!r}")
    if factor != 1.0:
        try:
            honoured = llama_partial_rotary()
        except ImportError:
            honoured = False
        check(honoured, f"Llama partial_rotary_factor={factor!r} is ambiguous: the installed transformers' "
                        "LlamaForCausalLM ignores it (rotates every dim); accepted: 1.0")
    return float(factor)


def llama_config(cfg: dict) -> ModelConfig:
    """Our ModelConfig (GQA-g / MQA / QKV, rotary, RMSNorm, SwiGLU) for a Llama config.json."""
    check(isinstance(cfg, dict), f"a Llama config.json must hold a JSON object, not {type(cfg).__name__}")
    kind = cfg.get("model_type", "llama")
    check(kind == "llama", f"model_type {kind!r} is not supported here; accepted: llama")
    act = cfg.get("hidden_act", "silu")
    check(act == "silu", f"Llama hidden_act {act!r} is not supported; accepted: silu (SwiGLU)")
    d_model, d_mlp, n_layers, heads, vocab = (_positive_int(cfg, k) for k in SIZES)
    kv_heads = _positive_int(cfg, "num_key_value_heads", heads)
    check(heads % kv_heads == 0, f"num_key_value_heads={kv_heads} does not divide num_attention_heads={heads}")
    head_dim = _positive_int(cfg, "head_dim", d_model // heads if d_model % heads == 0 else None)
    attn_bias, mlp_bias = bool(cfg.get("attention_bias", False)), bool(cfg.get("mlp_bias", False))
    check(attn_bias == mlp_bias, f"attention_bias={attn_bias} with mlp_bias={mlp_bias} is not supported: "
                                 "qkvlab has one bias switch for both")
    eps = cfg.get("rms_norm_eps", 1e-6)
    check(isinstance(eps, (int, float)) and eps > 0, f"Llama rms_norm_eps must be > 0, got {eps!r}")
    return ModelConfig(
        kind="decoder", variant=VariantSpec(kv_heads=None if kv_heads == heads else kv_heads).name,
        n_layers=n_layers, d_model=d_model, n_heads=heads, head_dim=None if head_dim * heads == d_model else head_dim,
        d_mlp=d_mlp, max_seq_len=_positive_int(cfg, "max_position_embeddings", 2048), vocab_size=vocab,
        positions="rotary", norm="rmsnorm", mlp="swiglu", bias=attn_bias,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), rope_theta=rope_theta(cfg),
        rotary_fraction=rotary_fraction(cfg), norm_eps=float(eps))


def rotary_order(head_dim: int, rotary_dim: int | None = None) -> torch.Tensor:
    """Row order within a head taking Hugging Face's half-split pairs to qkvlab's adjacent pairs:
    ours[2i] = theirs[i], ours[2i + 1] = theirs[i + R/2] for the R = rotary_dim (default head_dim)
    rotated rows; the unrotated rows R.. keep their place."""
    R = head_dim if rotary_dim is None else rotary_dim
    half = torch.arange(R // 2)
    return torch.cat([torch.stack([half, half + R // 2], dim=1).flatten(), torch.arange(R, head_dim)])  # (D,)


def _rows(t: torch.Tensor, head_dim: int, order: torch.Tensor) -> torch.Tensor:
    """Rows (heads * D, ...) reordered within each head."""
    return t.reshape(-1, head_dim, *t.shape[1:])[:, order].reshape(t.shape)


@torch.no_grad()
def llama_from_state_dict(state: dict[str, torch.Tensor], hf_config: dict, variant: str | None = None,
                          merge: str = "mean") -> GPT:
    """Our modern decoder from a Llama state dict and its config.json (then converted to `variant`)."""
    check(merge in MERGES, f"merge {merge!r} is not one of {', '.join(MERGES)}")
    if variant is not None:
        parse_variant(variant)
    config = llama_config(hf_config)
    model = GPT(config, seed=0)
    expected = model.state_dict()
    D, order = config.resolved_head_dim, rotary_order(config.resolved_head_dim, config.rotary_dim)
    used: set[str] = set()
    ours: dict[str, torch.Tensor] = {}

    def need(key: str) -> torch.Tensor:
        if key not in state:
            raise QkvlabError(f"not a Llama checkpoint: tensor {key!r} is missing")
        used.add(key)
        return state[key]

    def put(name: str, key: str, tensor: torch.Tensor | None = None) -> None:
        tensor = need(key) if tensor is None else tensor
        want = tuple(expected[name].shape)
        if tuple(tensor.shape) != want:
            raise QkvlabError(f"tensor {key!r} has shape {tuple(tensor.shape)}, but config.json implies {want}")
        ours[name] = tensor.float()

    put("tok_emb.weight", "model.embed_tokens.weight")
    put("backbone.norm.weight", "model.norm.weight")
    if not config.tie_embeddings:
        put("lm_head.weight", "lm_head.weight")
    params = ("weight", "bias") if config.bias else ("weight",)
    widths = {"q": config.n_heads * D, "k": config.n_kv_heads * D, "v": config.n_kv_heads * D}
    for i in range(config.n_layers):
        pre, mine = f"model.layers.{i}.", f"backbone.blocks.{i}."
        put(mine + "norm1.weight", pre + "input_layernorm.weight")
        put(mine + "norm2.weight", pre + "post_attention_layernorm.weight")
        for p in params:
            parts = []
            for proj in ("q", "k", "v"):
                key = f"{pre}self_attn.{proj}_proj.{p}"
                tensor = need(key)
                want = (widths[proj], config.d_model) if p == "weight" else (widths[proj],)
                if tuple(tensor.shape) != want:
                    raise QkvlabError(f"tensor {key!r} has shape {tuple(tensor.shape)}, but config.json implies {want}")
                parts.append(_rows(tensor, D, order))
            put(mine + f"attn.qkv.{p}", f"{pre}self_attn.[qkv]_proj.{p}", torch.cat(parts, dim=0))
            o = need(f"{pre}self_attn.o_proj.{p}")
            if p == "weight":
                check(tuple(o.shape) == (config.d_model, widths["q"]),
                      f"tensor {pre}self_attn.o_proj.weight has shape {tuple(o.shape)}, but config.json implies "
                      f"{(config.d_model, widths['q'])}")
                o = _rows(o.t(), D, order).t()  # columns follow the values' order
            put(mine + f"attn.proj.{p}", f"{pre}self_attn.o_proj.{p}", o)
            gate, up = need(f"{pre}mlp.gate_proj.{p}"), need(f"{pre}mlp.up_proj.{p}")
            check(gate.shape == up.shape, f"{pre}mlp.gate_proj.{p} {tuple(gate.shape)} and up_proj "
                                          f"{tuple(up.shape)} differ")
            put(mine + f"mlp.fc.{p}", f"{pre}mlp.[gate|up]_proj.{p}", torch.cat([gate, up], dim=0))
            put(mine + f"mlp.proj.{p}", f"{pre}mlp.down_proj.{p}")
    if config.tie_embeddings:
        used.add("lm_head.weight")
        ours["lm_head.weight"] = ours["tok_emb.weight"]
    unused = sorted(k for k in state if k not in used and not k.endswith(_IGNORED))
    if unused:
        more = f" and {len(unused) - 3} more" if len(unused) > 3 else ""
        raise QkvlabError(f"unexpected tensor(s) {', '.join(map(repr, unused[:3]))}{more}: not part of the Llama "
                          f"layout config.json describes")
    model.load_state_dict(ours)
    model.eval()
    if variant is None or parse_variant(variant).name == config.variant:
        return model
    return convert_variant(model, variant, merge).eval()


def read_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of `model.safetensors`, or of the shards `model.safetensors.index.json` lists."""
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = [path / name for name in sorted(set(weight_map.values()))]
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
            raise QkvlabError(f"{index} is not a safetensors index (a 'weight_map' object): {err}") from None
    else:
        raise QkvlabError(f"{str(path)!r} has no model.safetensors (or model.safetensors.index.json with shards)")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(str(file)))
        except (SafetensorError, OSError) as err:
            raise QkvlabError(f"cannot read {file}: {err}") from None
    return state


def load_llama(path: str | Path, variant: str | None = None, merge: str = "mean") -> GPT:
    """A Hugging Face Llama directory (config.json + safetensors, read offline) as our decoder."""
    path = Path(path)
    config_file = path / "config.json"
    if not (path.is_dir() and config_file.is_file()):
        raise QkvlabError(f"{str(path)!r} is not a Llama checkpoint directory: expected config.json and "
                          "model.safetensors (the Hugging Face save_pretrained layout)")
    try:
        hf_config = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise QkvlabError(f"{config_file} is not valid JSON: {err}") from None
    try:
        llama_config(hf_config)  # a bad config fails before the weights are read
        return llama_from_state_dict(read_safetensors_dir(path), hf_config, variant, merge)
    except QkvlabError as err:
        raise QkvlabError(f"{path}: {err}") from None


@functools.cache
def llama_partial_rotary() -> bool:
    """Whether this transformers' `LlamaForCausalLM` honours `partial_rotary_factor`: probed once on a
    one-layer model (its rotary frequencies cover only that share of a head, and a forward pass runs)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=4, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, head_dim=4, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    try:
        model = LlamaForCausalLM(config).eval()
        inv_freq = getattr(getattr(model.model, "rotary_emb", None), "inv_freq", None)
        if inv_freq is None or inv_freq.numel() != 1:  # 2 of 4 dims rotate: one frequency
            return False
        with torch.no_grad():
            model(torch.zeros(1, 2, dtype=torch.long))
    except (RuntimeError, ValueError, TypeError, KeyError):
        return False
    return True
