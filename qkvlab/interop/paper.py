"""Import the study's language-model checkpoints: `torch.save` dicts in GPT-2 naming, `nn.Linear` layout.

The released training scripts save `{"model_state_dict": ..., ...}` (keys prefixed `module.` under
DDP, `_orig_mod.` under `torch.compile`, `transformer.` in nanoGPT's naming; all are stripped):
`wte`, `wpe`, `h.{i}.ln_1`, `h.{i}.attn.<projections>`, `h.{i}.attn.c_proj`, `h.{i}.ln_2`,
`h.{i}.mlp.c_fc`, `h.{i}.mlp.c_proj`, `ln_f`; weights are `(out, in)` (unlike Hugging Face GPT-2's
transposed Conv1D) and the output head is `wte` (tied). The model is the paper's decoder: learned
positions, pre-LayerNorm, exact (erf) GELU, biases as found.

The attention projections found in `h.0.attn` name the variant. Key/value heads (GQA, MQA) follow
from the key projection's rows once the number of heads is known:

    found                    variant                       fused into our [q | k | v] as
    c_attn                   QKV (or GQA-g: rows (H+2g)·D)  c_attn split [q | k | v]
    c_q, c_k, c_v            QKV, GQA-g, MQA               [c_q | c_k | c_v]
    c_q, c_kv                Q-K=V, Q-GQA-g, Q-MQA         [c_q | c_kv]
    c_qk, c_v                Q=K-V                         [c_qk | c_v]
    c_qkv                    Q=K=V                         [c_qkv]
    c_k, c_v                 Q=K-V or Q=X (ambiguous)      [c_k | c_v]
    c_kv                     Q=K=V or Q=X-K=V (ambiguous)  [c_kv]

In the two ambiguous cases (no query projection: is the query the key, or the input itself?) the
weights cannot tell, so the variant asked for must be one of the two; with grouped key/value heads
only Q=X/Q=X-K=V is possible (Q = K cannot be grouped). The number of heads is read from a config
dict saved beside the weights (`config`, `model_args`, `model_config`: `n_head`/`n_heads`), else
from the paper preset of the same depth and width (`paper-300m`: 16, `paper-1.2b`: 32), else it
must be given.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from qkvlab.arch import PRESETS
from qkvlab.convert import MERGES, convert_variant
from qkvlab.errors import QkvlabError, check
from qkvlab.models.gpt import GPT
from qkvlab.variants import VariantSpec, parse_variant

PREFIXES = ("module.", "_orig_mod.", "transformer.")
STATE_KEYS = ("model_state_dict", "state_dict", "model")
CONFIG_KEYS = ("config", "model_args", "model_config")
# projection modules found in h.0.attn -> the variants (q_source, kv_tied) they can be
LAYOUTS: dict[frozenset[str], tuple[tuple[str, bool], ...]] = {
    frozenset({"c_attn"}): (("q", False),),
    frozenset({"c_q", "c_k", "c_v"}): (("q", False),),
    frozenset({"c_q", "c_kv"}): (("q", True),),
    frozenset({"c_qk", "c_v"}): (("k", False),),
    frozenset({"c_qkv"}): (("k", True),),
    frozenset({"c_k", "c_v"}): (("k", False), ("x", False)),
    frozenset({"c_kv"}): (("k", True), ("x", True)),
}
# which of their modules hold our "k" and "v" rows (the query is c_q, or a slice of c_attn)
_KEY_MODULE = ("c_kv", "c_qkv", "c_qk", "c_k")
_MASK_BUFFER = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")  # nanoGPT's causal-mask buffer
_LAYER = re.compile(r"^h\.(\d+)\.")
_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_UNPICKLER = re.compile(r"WeightsUnpickler error:\s*(\S[^\n]*)")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def read_paper_checkpoint(path: str | Path, trust_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """(weights with prefixes stripped, the config dict saved beside them or {}) of a `torch.save` file.

    The file is read with `torch.load(weights_only=True)` (no code runs); a checkpoint that pickled
    other Python objects needs `trust_pickle=True`, for files from a source the user trusts.
    """
    path = Path(path)
    check(path.is_file(), f"{str(path)!r} is not a checkpoint file (expected what torch.save wrote)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as err:
        found = _GLOBAL.search(str(err))
        if found:
            raise QkvlabError(f"{path} pickles a Python object ({found.group(1)}) beyond tensors, which a weights-only "
                              "load refuses (no code from the file runs); if you trust the file, pass "
                              "--trust-pickle") from None
        reason = _UNPICKLER.search(str(err))
        raise QkvlabError(f"cannot read {path} as a torch.save checkpoint: "
                          f"{reason.group(1) if reason else _first_line(err)}") from None
    except Exception as err:  # torch.load raises RuntimeError, EOFError, ... on files it cannot parse
        raise QkvlabError(f"cannot read {path} as a torch.save checkpoint: {_first_line(err)}") from None
    check(isinstance(obj, dict), f"{path} holds a {type(obj).__name__}, not a dict with 'model_state_dict'")
    state = next((obj[k] for k in STATE_KEYS if isinstance(obj.get(k), dict)), None)
    if state is None:
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            state = obj  # a bare state dict
        else:
            keys = ", ".join(map(repr, list(obj)[:8])) or "none"
            raise QkvlabError(f"{path} has no 'model_state_dict' (top-level keys: {keys})")
    config: dict = next((obj[k] for k in CONFIG_KEYS if isinstance(obj.get(k), dict)), {})
    weights = {}
    for key, value in state.items():
        check(isinstance(key, str) and isinstance(value, torch.Tensor),
              f"{path}: the state dict holds {key!r} = {type(value).__name__}, not a tensor")
        name = key
        while name.startswith(PREFIXES):
            name = next(name[len(p):] for p in PREFIXES if name.startswith(p))
        weights[name] = value
    return weights, config


def _heads_from(config: dict, n_layers: int, d_model: int, n_heads: int | None) -> int:
    if n_heads is not None:
        return n_heads
    for key in ("n_head", "n_heads", "num_heads", "num_attention_heads"):
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    for name, p in PRESETS.items():
        if name.startswith("paper-") and (p.n_layers, p.d_model) == (n_layers, d_model):
            return p.n_heads
    raise QkvlabError(f"the weights do not say how many heads the model has ({n_layers} layers, d_model "
                      f"{d_model}, no saved config); pass --n-heads (n_heads=)")


def _source_variant(found: frozenset[str], variant: str | None) -> tuple[str, bool]:
    """(q_source, kv_tied) of the checkpoint, using the variant asked for where the weights cannot tell."""
    options = LAYOUTS[found]
    if len(options) == 1:
        return options[0]
    names = [VariantSpec(q, tied).projection_name for q, tied in options]
    if variant is not None:
        asked = parse_variant(variant)
        if (asked.q_source, asked.kv_tied) in options:
            return asked.q_source, asked.kv_tied
    mods = " and ".join(sorted(found))
    raise QkvlabError(f"h.0.attn has {mods} and no query projection: the checkpoint is {names[0]} (the key is "
                      f"the query) or {names[1]} (the input is the query), which the weights cannot tell apart; "
                      f"pass --variant {names[0]} or --variant {names[1]} (convert further afterwards)")


@torch.no_grad()
def paper_from_state_dict(state: dict[str, torch.Tensor], variant: str | None = None, n_heads: int | None = None,
                          merge: str = "mean", config: dict | None = None) -> GPT:
    """Our decoder from a paper-format state dict (prefixes stripped), converted to `variant` if given.

    `config` is the dict saved beside the weights (read for the number of heads); `n_heads` overrides it.
    """
    check(merge in MERGES, f"merge {merge!r} is not one of {', '.join(MERGES)}")
    if variant is not None:
        parse_variant(variant)  # an unknown name fails before anything is read
    check(n_heads is None or (isinstance(n_heads, int) and n_heads > 0), f"n_heads must be positive, got {n_heads!r}")
    used: set[str] = set()

    def need(key: str) -> torch.Tensor:
        if key not in state:
            raise QkvlabError(f"not a paper checkpoint: tensor {key!r} is missing")
        used.add(key)
        return state[key]

    wte, wpe = need("wte.weight"), need("wpe.weight")
    check(wte.dim() == 2 and wpe.dim() == 2 and wte.shape[1] == wpe.shape[1],
          f"wte.weight {tuple(wte.shape)} and wpe.weight {tuple(wpe.shape)} must be (rows, d_model) alike")
    (vocab, d_model), max_len = wte.shape, wpe.shape[0]
    layers = {int(m.group(1)) for key in state if (m := _LAYER.match(key))}
    check(bool(layers), "not a paper checkpoint: no h.{i}.* tensors (transformer blocks)")
    n_layers = max(layers) + 1
    heads = _heads_from(config or {}, n_layers, d_model, n_heads)
    check(d_model % heads == 0, f"n_heads={heads} does not divide d_model={d_model}")
    head_dim = d_model // heads
    bias = "h.0.mlp.c_fc.bias" in state
    found = frozenset(key.split(".")[3] for key in state
                      if key.startswith("h.0.attn.") and key.count(".") == 4 and key.split(".")[3] != "c_proj")
    if found not in LAYOUTS:
        accepted = " | ".join("+".join(sorted(s)) for s in LAYOUTS)
        raise QkvlabError(f"h.0.attn has projections {', '.join(sorted(found)) or 'none'}; "
                          f"accepted layouts: {accepted}")
    # key/value heads from the key projection's rows
    if "c_attn" in found:
        rows = need("h.0.attn.c_attn.weight").shape[0] - d_model
        check(rows > 0 and rows % (2 * head_dim) == 0,
              f"h.0.attn.c_attn.weight has {rows + d_model} rows: not [q | k | v] of {heads} heads of {head_dim}")
        kv_rows = rows // 2
    else:
        key_module = next(m for m in _KEY_MODULE if m in found)
        kv_rows = need(f"h.0.attn.{key_module}.weight").shape[0]
    kv_heads = kv_rows // head_dim
    check(kv_rows % head_dim == 0 and kv_heads > 0 and heads % kv_heads == 0,
          f"the key projection has {kv_rows} rows: not a whole number of key/value heads of {head_dim} "
          f"dividing {heads} heads")
    if kv_heads < heads:  # grouped keys: the query cannot be the key
        found_options = tuple(o for o in LAYOUTS[found] if o[0] != "k")
        check(bool(found_options), f"{'+'.join(sorted(found))} with {kv_heads} key/value heads of {heads}: "
                                   "a query tied to grouped keys is not a variant")
        q_source, kv_tied = found_options[0]
    else:
        q_source, kv_tied = _source_variant(found, variant)
    source = VariantSpec(q_source, kv_tied, None if kv_heads == heads else kv_heads).name
    head = state.get("lm_head.weight")
    tied = head is None or torch.equal(head, wte)
    base = PRESETS["paper-300m"]  # the paper's decoder: learned positions, LayerNorm, exact GELU, dropout 0.1
    cfg = base.replace(variant=source, n_layers=n_layers, d_model=d_model, n_heads=heads,
                       d_mlp=need("h.0.mlp.c_fc.weight").shape[0], max_seq_len=max_len, vocab_size=vocab,
                       bias=bias, tie_embeddings=tied)
    model = GPT(cfg, seed=0)
    expected = model.state_dict()
    ours: dict[str, torch.Tensor] = {}

    def put(name: str, tensor: torch.Tensor, key: str) -> None:
        want = tuple(expected[name].shape)
        if tuple(tensor.shape) != want:
            raise QkvlabError(f"tensor {key!r} has shape {tuple(tensor.shape)}, expected {want} "
                              f"(a {source} model with d_model {d_model}, {heads} heads, from wte/wpe/h.0)")
        ours[name] = tensor.float()

    put("tok_emb.weight", wte, "wte.weight")
    put("backbone.pos_emb.weight", wpe, "wpe.weight")
    if not tied:
        put("lm_head.weight", need("lm_head.weight"), "lm_head.weight")
    else:
        used.add("lm_head.weight")
    params = ("weight", "bias") if bias else ("weight",)
    finals = {"backbone.norm": "ln_f"}
    for i in range(n_layers):
        finals.update({f"backbone.blocks.{i}.{mine}": f"h.{i}.{theirs}" for mine, theirs in
                       (("norm1", "ln_1"), ("norm2", "ln_2"), ("attn.proj", "attn.c_proj"),
                        ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj"))})
    for mine, theirs in finals.items():
        for p in params:
            put(f"{mine}.{p}", need(f"{theirs}.{p}"), f"{theirs}.{p}")
    spec = parse_variant(source)
    widths = {"q": d_model if spec.has_q_proj else 0, "k": kv_rows, "v": kv_rows if spec.has_v_proj else 0}
    for i in range(n_layers):
        for p in params:
            if "c_attn" in found:
                fused = need(f"h.{i}.attn.c_attn.{p}")
                put(f"backbone.blocks.{i}.attn.qkv.{p}", fused, f"h.{i}.attn.c_attn.{p}")
                continue
            parts = []
            names = {"q": "c_q", "k": next(m for m in _KEY_MODULE if m in found), "v": "c_v"}
            for proj in spec.projections:
                key = f"h.{i}.attn.{names[proj]}.{p}"
                tensor = need(key)
                want = (widths[proj], d_model) if p == "weight" else (widths[proj],)
                if tuple(tensor.shape) != want:
                    raise QkvlabError(f"tensor {key!r} has shape {tuple(tensor.shape)}, expected {want} "
                                      f"(a {source} model with d_model {d_model}, {heads} heads)")
                parts.append(tensor)
            put(f"backbone.blocks.{i}.attn.qkv.{p}", torch.cat(parts, dim=0), f"h.{i}.attn.*.{p}")
    unused = sorted(k for k in state if k not in used and not _MASK_BUFFER.match(k))
    if unused:
        more = f" and {len(unused) - 3} more" if len(unused) > 3 else ""
        raise QkvlabError(f"unexpected tensor(s) {', '.join(map(repr, unused[:3]))}{more}: not part of the "
                          f"paper's {source} layout")
    missing = sorted(set(expected) - set(ours) - ({"lm_head.weight"} if tied else set()))
    check(not missing, f"internal: no source for {', '.join(missing)}")
    if tied:
        ours["lm_head.weight"] = ours["tok_emb.weight"]
    model.load_state_dict(ours)
    model.eval()
    if variant is None or parse_variant(variant).name == source:
        return model
    return convert_variant(model, variant, merge).eval()


def load_paper(path: str | Path, variant: str | None = None, n_heads: int | None = None, merge: str = "mean",
               trust_pickle: bool = False) -> GPT:
    """A study checkpoint file (`torch.save`) as our decoder, converted to `variant` when given."""
    state, config = read_paper_checkpoint(path, trust_pickle)
    try:
        return paper_from_state_dict(state, variant, n_heads, merge, config)
    except QkvlabError as err:
        raise QkvlabError(f"{path}: {err}") from None
