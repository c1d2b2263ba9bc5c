"""Test helpers: write a qkvlab model in the study's checkpoint format; cached logits chunk by chunk."""

from __future__ import annotations

import torch

# (q_source, kv_tied) -> the study's module name for each of our projections (see qkvlab.interop.paper)
PAPER_NAMES = {
    ("q", False): {"q": "c_q", "k": "c_k", "v": "c_v"},
    ("q", True): {"q": "c_q", "k": "c_kv"},
    ("k", False): {"k": "c_qk", "v": "c_v"},
    ("k", True): {"k": "c_qkv"},
    ("x", False): {"k": "c_k", "v": "c_v"},
    ("x", True): {"k": "c_kv"},
}


def to_paper_state(model, fused: bool = False, names: dict | None = None, prefix: str = "module.") -> dict:
    """`model`'s weights in the study's naming (nn.Linear layout, head tied to wte), keys prefixed by DDP's."""
    spec = model.config.spec
    names = names or PAPER_NAMES[(spec.q_source, spec.kv_tied)]
    sd = {"wte.weight": model.tok_emb.weight, "wpe.weight": model.backbone.pos_emb.weight}
    bb = model.backbone
    params = ("weight", "bias") if model.config.bias else ("weight",)
    for p in params:
        sd[f"ln_f.{p}"] = getattr(bb.norm, p)
    for i, block in enumerate(bb.blocks):
        for theirs, mod in (("ln_1", block.norm1), ("ln_2", block.norm2), ("attn.c_proj", block.attn.proj),
                            ("mlp.c_fc", block.mlp.fc), ("mlp.c_proj", block.mlp.proj)):
            for p in params:
                sd[f"h.{i}.{theirs}.{p}"] = getattr(mod, p)
        if fused:
            for p in params:
                sd[f"h.{i}.attn.c_attn.{p}"] = getattr(block.attn.qkv, p)
        else:
            for proj, (w, b) in block.attn.projection_weights().items():
                sd[f"h.{i}.attn.{names[proj]}.weight"] = w
                if b is not None:
                    sd[f"h.{i}.attn.{names[proj]}.bias"] = b
    return {prefix + k: v.detach().clone() for k, v in sd.items()}


def save_paper_checkpoint(model, path, **kw) -> None:
    torch.save({"model_state_dict": to_paper_state(model, **kw), "optimizer_state_dict": {}, "step": 7,
                "config": {"n_head": model.config.n_heads}}, path)


@torch.no_grad()
def cached_logits(model, idx: torch.Tensor, chunks: tuple[int, ...]) -> torch.Tensor:
    """Logits of `idx` (B, T) fed through a KV cache in chunks of the given sizes (summing to T)."""
    cache = model.make_cache(idx.shape[0], max_len=idx.shape[1])
    out, start = [], 0
    for n in chunks:
        out.append(model(idx[:, start:start + n], cache))
        start += n
    return torch.cat(out, dim=1)  # (B, T, V)
