"""Write a qkvlab decoder in Hugging Face formats, and load one back for generation or evaluation.

- `format="hf"`: `QkvlabConfig` + `QkvlabForCausalLM` (every variant; the compact cache), with
  `configuration_qkvlab.py` / `modeling_qkvlab.py` and an `auto_map` so that
  `trust_remote_code=True` loads it (those files import qkvlab, which must be installed);
- `format="gpt2"`: stock `GPT2LMHeadModel` (QKV, learned positions, LayerNorm, GELU, biases);
- `format="llama"`: stock `LlamaForCausalLM` (QKV or GQA, rotary, RMSNorm, SwiGLU). qkvlab rotates
  interleaved pairs (x[2i], x[2i+1]); Llama rotates halves (x[i], x[i + D/2]), so the rows of each
  query and key head are permuted (evens, then odds), which leaves every score unchanged. A partial-rotary
  model (`rotary_fraction` < 1) exports only where the installed Llama honours `partial_rotary_factor`.

The tokenizer (any `qkvlab.data.tokenizer` name) is written beside the weights as a
`PreTrainedTokenizerFast`. Output directories are written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from qkvlab.arch import ModelConfig
from qkvlab.atomic import atomic_dir
from qkvlab.errors import QkvlabError

if TYPE_CHECKING:
    from qkvlab.models.gpt import GPT

FORMATS = ("hf", "gpt2", "llama")
REMOTE_FILES = {
    "configuration_qkvlab.py": '"""Remote code of a qkvlab export: needs `pip install qkvlab[hf]`."""\n\n'
                               "from qkvlab.hf.configuration import QkvlabConfig\n\n__all__ = [\"QkvlabConfig\"]\n",
    "modeling_qkvlab.py": '"""Remote code of a qkvlab export: needs `pip install qkvlab[hf]`."""\n\n'
                          "from qkvlab.hf.modeling import QkvlabForCausalLM\n\n__all__ = [\"QkvlabForCausalLM\"]\n",
}
AUTO_MAP = {"AutoConfig": "configuration_qkvlab.QkvlabConfig",
            "AutoModelForCausalLM": "modeling_qkvlab.QkvlabForCausalLM"}


def activation(config: ModelConfig) -> str:
    """The GELU form of a config: "gelu_tanh" (GPT-2's) unless the config says "gelu" (exact)."""
    return getattr(config, "activation", "gelu_tanh")


# --- the qkvlab format -------------------------------------------------------------------

def to_hf(model: GPT):
    """An in-memory `QkvlabForCausalLM` holding `model`'s weights (a copy)."""
    from qkvlab.hf.configuration import QkvlabConfig
    from qkvlab.hf.modeling import QkvlabForCausalLM

    config = model.config
    if config.kind != "decoder":
        raise QkvlabError(f"only decoders export to Hugging Face, got a {config.kind} model")
    hf = QkvlabForCausalLM(QkvlabConfig.from_qkvlab(config))
    hf.model.load_state_dict(model.state_dict())
    # transformers types `to` as a wrapped unbound method; the call is the ordinary Module.to(dtype)
    return hf.to(next(model.parameters()).dtype).eval()  # type: ignore[arg-type]


# --- stock formats ---------------------------------------------------------------------------

def _refuse(fmt: str, config: ModelConfig, needs: dict[str, object]) -> None:
    wrong = [f"{k}={getattr(config, k)!r} (needs {v!r})" for k, v in needs.items() if getattr(config, k) != v]
    if wrong:
        raise QkvlabError(f"--format {fmt} cannot hold this model: {'; '.join(wrong)}; use --format hf")


def to_gpt2(model: GPT):
    """A stock `GPT2LMHeadModel` with `model`'s weights (QKV, learned positions, LayerNorm, GELU)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    _refuse("gpt2", c, {"kind": "decoder", "variant": "QKV", "positions": "learned", "norm": "layernorm",
                        "mlp": "gelu", "bias": True})
    if c.resolved_head_dim * c.n_heads != c.d_model:
        raise QkvlabError(f"--format gpt2 needs head_dim * n_heads == d_model, got {c.resolved_head_dim} * "
                          f"{c.n_heads} != {c.d_model}; use --format hf")
    act = {"gelu_tanh": "gelu_new", "gelu": "gelu"}.get(activation(c))
    if act is None:
        raise QkvlabError(f"--format gpt2: activation {activation(c)!r} has no GPT-2 equivalent; use --format hf")
    hf_config = GPT2Config(vocab_size=c.vocab_size, n_positions=c.max_seq_len, n_embd=c.d_model, n_layer=c.n_layers,
                           n_head=c.n_heads, n_inner=c.resolved_d_mlp, activation_function=act,
                           resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.attn_dropout,
                           layer_norm_epsilon=c.norm_eps, tie_word_embeddings=c.tie_embeddings,
                           bos_token_id=None, eos_token_id=None)
    src = model.state_dict()
    state = {"transformer.wte.weight": src["tok_emb.weight"], "transformer.wpe.weight": src["backbone.pos_emb.weight"],
             "transformer.ln_f.weight": src["backbone.norm.weight"], "transformer.ln_f.bias": src["backbone.norm.bias"],
             "lm_head.weight": src["lm_head.weight"]}
    renames = {"ln_1": "norm1", "ln_2": "norm2", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj",
               "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj"}
    for i in range(c.n_layers):
        for theirs, mine in renames.items():
            weight = src[f"backbone.blocks.{i}.{mine}.weight"]
            # GPT-2's Conv1D stores (in, out)
            state[f"transformer.h.{i}.{theirs}.weight"] = weight if theirs.startswith("ln") else weight.t()
            state[f"transformer.h.{i}.{theirs}.bias"] = src[f"backbone.blocks.{i}.{mine}.bias"]
    return _loaded(GPT2LMHeadModel(hf_config), state, model)


def rotary_rows(n_heads: int, head_dim: int, rotary_dim: int | None = None) -> torch.Tensor:
    """Row order taking interleaved-pair rotary heads (qkvlab) to rotate-half heads (Llama): evens, then
    odds, of the first `rotary_dim` rows of each head (default all); the unrotated rows keep their place."""
    R = head_dim if rotary_dim is None else rotary_dim
    per_head = torch.cat([torch.arange(0, R, 2), torch.arange(1, R, 2), torch.arange(R, head_dim)])  # (D,)
    return (torch.arange(n_heads)[:, None] * head_dim + per_head).reshape(-1)  # (H * D,)


def to_llama(model: GPT):
    """A stock `LlamaForCausalLM` with `model`'s weights (QKV or GQA, rotary, RMSNorm, SwiGLU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    _refuse("llama", c, {"kind": "decoder", "positions": "rotary", "rotary_values": False, "norm": "rmsnorm",
                         "mlp": "swiglu"})
    spec = c.spec
    if spec.q_source != "q" or spec.kv_tied or spec.pair_bias:
        raise QkvlabError(f"--format llama holds QKV and GQA/MQA models, not {c.variant} (Llama has separate "
                          "Q, K and V projections and no pair bias); use --format hf")
    rope: dict[str, object] = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rotary_fraction != 1.0:
        from qkvlab.interop.llama import llama_partial_rotary

        if not llama_partial_rotary():
            import transformers

            raise QkvlabError(f"--format llama cannot hold rotary_fraction={c.rotary_fraction}: this transformers "
                              f"({transformers.__version__}) LlamaForCausalLM ignores partial_rotary_factor; "
                              "use --format hf")
        rope["partial_rotary_factor"] = c.rotary_fraction
    H, Hkv, D = c.n_heads, c.n_kv_heads, c.resolved_head_dim
    hf_config = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.resolved_d_mlp,
                            num_hidden_layers=c.n_layers, num_attention_heads=H, num_key_value_heads=Hkv,
                            head_dim=D, max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
                            tie_word_embeddings=c.tie_embeddings, attention_bias=c.bias, mlp_bias=c.bias,
                            attention_dropout=c.attn_dropout, hidden_act="silu",
                            rope_parameters=rope,
                            bos_token_id=None, eos_token_id=None, pad_token_id=None)
    src = model.state_dict()
    state = {"model.embed_tokens.weight": src["tok_emb.weight"], "model.norm.weight": src["backbone.norm.weight"],
             "lm_head.weight": src["lm_head.weight"]}
    q_rows, k_rows = rotary_rows(H, D, c.rotary_dim), rotary_rows(Hkv, D, c.rotary_dim)
    for i in range(c.n_layers):
        ours, theirs = f"backbone.blocks.{i}.", f"model.layers.{i}."
        state[theirs + "input_layernorm.weight"] = src[ours + "norm1.weight"]
        state[theirs + "post_attention_layernorm.weight"] = src[ours + "norm2.weight"]
        for kind in ("weight", "bias") if c.bias else ("weight",):
            q, k, v = src[ours + f"attn.qkv.{kind}"].split([H * D, Hkv * D, Hkv * D])
            state[theirs + f"self_attn.q_proj.{kind}"] = q[q_rows]
            state[theirs + f"self_attn.k_proj.{kind}"] = k[k_rows]
            state[theirs + f"self_attn.v_proj.{kind}"] = v
            state[theirs + f"self_attn.o_proj.{kind}"] = src[ours + f"attn.proj.{kind}"]
            gate, up = src[ours + f"mlp.fc.{kind}"].chunk(2)
            state[theirs + f"mlp.gate_proj.{kind}"] = gate
            state[theirs + f"mlp.up_proj.{kind}"] = up
            state[theirs + f"mlp.down_proj.{kind}"] = src[ours + f"mlp.proj.{kind}"]
    return _loaded(LlamaForCausalLM(hf_config), state, model)


def _loaded(hf_model: nn.Module, state: dict, model: GPT):
    """`hf_model` with `state` loaded; every parameter must be covered (buffers are the model's own)."""
    hf_model = hf_model.to(next(model.parameters()).dtype)
    missing, unexpected = hf_model.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=False)
    params = {name for name, _ in hf_model.named_parameters()}
    missing = [m for m in missing if m in params]
    if missing or unexpected:  # a bug in the mapping, not bad input
        raise RuntimeError(f"weight mapping incomplete: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return hf_model.eval()


# --- tokenizers -------------------------------------------------------------------------------

def _byte_chars() -> list[str]:
    """GPT-2's printable stand-in for each byte 0..255 (the byte-level BPE alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def hf_tokenizer(tok):
    """A `PreTrainedTokenizerFast` giving the same ids as a qkvlab tokenizer (`load_tokenizer`'s result)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from qkvlab.data.tokenizer import EOT, VocabTokenizer

    special = {}
    if isinstance(tok, VocabTokenizer):
        vocab = {t: i for i, t in enumerate(tok.vocab)}
        if tok.words:
            inner = Tokenizer(models.WordLevel(vocab, unk_token="<unk>" if "<unk>" in vocab else None))
            inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
            inner.decoder = None  # tokens joined by single spaces, as qkvlab decodes words
        else:
            inner = Tokenizer(models.WordLevel(vocab, unk_token=None))
            inner.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
            inner.decoder = decoders.Fuse()
        if tok.eot is not None:
            special["eos_token"] = tok.vocab[tok.eot]
            inner.add_special_tokens([tok.vocab[tok.eot]])
    elif tok._tok is None:  # raw bytes: a byte-level BPE without merges maps each byte to its own id
        inner = Tokenizer(models.BPE({c: b for b, c in enumerate(_byte_chars())}, []))
        inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        inner.decoder = decoders.ByteLevel()
    else:
        inner = Tokenizer.from_str(tok._tok.to_str())
        if inner.token_to_id(EOT) is not None:
            special["eos_token"] = EOT
    hf = PreTrainedTokenizerFast(tokenizer_object=inner, clean_up_tokenization_spaces=False, **special)
    if hf.pad_token is None:  # padding is masked, any existing token will do (batched generate, lm-eval)
        hf.pad_token = hf.eos_token or hf.unk_token or hf.convert_ids_to_tokens(0)
    return hf


# --- writing --------------------------------------------------------------------------------

def export(model: GPT, out: str | Path, fmt: str = "hf", tokenizer=None) -> Path:
    """Write `model` (a qkvlab decoder) to `out` in `fmt`, with `tokenizer` (a qkvlab tokenizer) if given."""
    if fmt not in FORMATS:
        raise QkvlabError(f"unknown export format {fmt!r}; accepted: {', '.join(FORMATS)}")
    if model.config.kind != "decoder":
        raise QkvlabError(f"only decoders export to Hugging Face, got a {model.config.kind} model")
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise QkvlabError(f"tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} tokens but the model only "
                          f"{model.config.vocab_size}")
    hf = {"hf": to_hf, "gpt2": to_gpt2, "llama": to_llama}[fmt](model)
    hf_tok = hf_tokenizer(tokenizer) if tokenizer is not None else None
    if hf_tok is not None and hf_tok.eos_token_id is not None:
        hf.config.eos_token_id = hf.generation_config.eos_token_id = hf_tok.eos_token_id
    if fmt == "hf":
        hf.config.auto_map = dict(AUTO_MAP)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(out)
    with atomic_dir(out) as tmp:
        hf.save_pretrained(tmp)
        if hf_tok is not None:
            hf_tok.save_pretrained(tmp)
        if fmt == "hf":
            for name, text in REMOTE_FILES.items():
                (tmp / name).write_text(text)
        info = {"format": fmt, "variant": model.config.variant, "qkvlab_config": model.config.to_dict(),
                "tokenizer": getattr(tokenizer, "name", None)}
        (tmp / "qkvlab_export.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


def is_hf_dir(path: str | Path) -> bool:
    """Whether `path` is a Hugging Face model directory (a config.json with a model_type)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return "model_type" in json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return False


def load_hf(path: str | Path, dtype: torch.dtype | None = None):
    """(model, tokenizer or None) of a Hugging Face directory written by `export` (or any causal LM), offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import qkvlab.hf  # noqa: F401  (registers the qkvlab model type)

    path = Path(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    except (OSError, ValueError, KeyError) as err:
        raise QkvlabError(f"cannot load the Hugging Face model at {path}: {str(err).splitlines()[0]}") from None
    tokenizer = None
    if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer
