"""Export a decoder with its compact KV cache as explicit state: torch.export + AOTInductor (`.pt2`).

`StaticDecoder` runs a `GPT`'s own modules (embeddings, norms, projections, MLPs, head) over a cache
preallocated for `max_context` tokens and passed in as tensors the program updates in place:

    prefill(tokens (1, T), start (1,), *cache) -> logits (1, V)    T in 2..max_context (dynamic)
    decode(token (1, 1), start (1,), *cache)   -> logits (1, V)

`cache` is, per stream (K and V, or the one shared K = V tensor), the values (L, 1, H_kv, C, D) and,
for a quantised cache (int8), their bfloat16 scales (L, 1, H_kv, C): exactly the bytes
`qkvlab.cost.cache_bytes(config, variant, C, 1, dtype)` gives. With rotary and K = V the shared
tensor is stored before rotation and keys are rotated when read, as in `KVCache` (with rotary values,
`rotary_values`, stored rotated). Keys are always
read over all C slots with the mask `key_pos <= query_pos`, so shapes never depend on the data.

The package holds two AOTInductor models, "prefill" and "decode", and their metadata (config,
cache layout); `Pt2Runner` loads it with `torch._inductor` only, no qkvlab model code.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qkvlab.atomic import check_output
from qkvlab.errors import QkvlabError, check
from qkvlab.nn.kv_cache import QUANT_MAX, SCALE_DTYPE, dequantize, quantize, resolve_cache_dtype

FORMAT = "qkvlab-pt2/1"


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, back: bool = False) -> torch.Tensor:
    """Rotate each pair (x[2i], x[2i+1]) of x (B, H, T, D) by angles with cos, sin (T, D/2), in real arithmetic
    (by the opposite angles when `back`); with cos, sin (T, R/2), R < D (partial rotary), only the first R dims,
    the rest pass through."""
    R = 2 * cos.shape[-1]
    if back:
        sin = -sin
    if R < x.shape[-1]:
        return torch.cat([_rotate(x[..., :R], cos, sin), x[..., R:]], dim=-1)  # (B, H, T, D)
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, H, T, D/2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]  # (B, H, T, D/2)
    out = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)  # (B, H, T, D/2, 2)
    return out.flatten(-2).to(x.dtype)  # (B, H, T, D)


class StaticDecoder(nn.Module):
    """A GPT over a fixed-size cache passed in as tensors (batch 1), for `torch.export`."""

    def __init__(self, model, max_context: int, cache_dtype: str | torch.dtype | None = None):
        super().__init__()
        config = model.config
        check(config.kind == "decoder", f"export needs a decoder, got a {config.kind} model")
        check(config.causal, "export needs a causal decoder")
        check(isinstance(max_context, int) and 2 <= max_context <= config.max_seq_len,
              f"--max-context must be in 2..{config.max_seq_len} (the model's max_seq_len), got {max_context}")
        param = model.tok_emb.weight
        check(param.dtype == torch.float32, f"export supports float32 models, got {param.dtype}")
        dtype = resolve_cache_dtype(cache_dtype) or param.dtype
        check(dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int8),
              f"export supports cache dtypes fp32, bf16, fp16 and int8, got {dtype}")
        self.model = model.eval()
        self.config, self.max_context, self.cache_dtype = config, max_context, dtype
        self.quantized = dtype in QUANT_MAX
        attn = model.backbone.blocks[0].attn
        self.n_kv_heads, self.head_dim, self.streams = attn.n_kv_heads, attn.head_dim, config.spec.cache_streams

    def cache_specs(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """(name, shape, dtype) of each cache tensor, in argument order."""
        shape = (self.config.n_layers, 1, self.n_kv_heads, self.max_context, self.head_dim)
        specs: list[tuple[str, tuple[int, ...], torch.dtype]] = []
        for name in (["kv"] if self.streams == 1 else ["k", "v"]):
            specs.append((name, shape, self.cache_dtype))
            if self.quantized:
                specs.append((name + "_scale", shape[:-1], SCALE_DTYPE))
        return specs

    @property
    def device(self) -> torch.device:
        """The model's device: where `empty_cache` puts the cache and the step runs."""
        return self.model.tok_emb.weight.device

    def empty_cache(self) -> list[torch.Tensor]:
        return [torch.zeros(shape, dtype=dtype, device=self.device) for _, shape, dtype in self.cache_specs()]

    def _write(self, cache: list[torch.Tensor], stream: int, layer: int, pos: torch.Tensor, new: torch.Tensor) -> None:
        """Store new (1, H_kv, T, D) at positions pos (T,) of `stream`, quantised when the cache is."""
        width = 2 if self.quantized else 1
        values = cache[stream * width]
        if self.quantized:
            q, scale = quantize(new, self.cache_dtype)  # (1, H_kv, T, D), (1, H_kv, T)
            values[layer].index_copy_(2, pos, q)
            cache[stream * width + 1][layer].index_copy_(2, pos, scale)
        else:
            values[layer].index_copy_(2, pos, new.to(values.dtype))

    def _read(self, cache: list[torch.Tensor], stream: int, layer: int, dtype: torch.dtype) -> torch.Tensor:
        """All C slots of `stream` at `layer`: (1, H_kv, C, D) in `dtype`."""
        width = 2 if self.quantized else 1
        values = cache[stream * width][layer]
        if self.quantized:
            return dequantize(values, cache[stream * width + 1][layer], dtype)
        return values.to(dtype)

    def forward(self, idx: torch.Tensor, start: torch.Tensor, *cache: torch.Tensor) -> torch.Tensor:
        """idx (1, T) at positions start..start+T-1 -> logits of the last token (1, V); updates `cache`."""
        buffers = list(cache)
        model, backbone = self.model, self.model.backbone
        T = idx.shape[1]
        q_pos = start + torch.arange(T, device=idx.device)  # (T,)
        k_pos = torch.arange(self.max_context, device=idx.device)  # (C,)
        mask = k_pos[None, :] <= q_pos[:, None]  # (T, C)
        h = model.tok_emb(idx)  # (1, T, C_model)
        if backbone.pos_emb is not None:
            h = h + backbone.pos_emb(q_pos[None])  # (1, T, C_model)
        rot_q = rot_k = None
        if backbone.rotary is not None:
            r = backbone.rotary
            dims = torch.arange(0, r.rotary_dim, 2, dtype=torch.float32, device=idx.device)  # (R/2,)
            inv_freq = r.theta ** (-dims / r.rotary_dim)  # (R/2,)
            ang_q, ang_k = q_pos.float()[:, None] * inv_freq, k_pos.float()[:, None] * inv_freq  # (T|C, R/2)
            rot_q, rot_k = (ang_q.cos(), ang_q.sin()), (ang_k.cos(), ang_k.sin())
        for layer, block in enumerate(backbone.blocks):
            h = h + self._attention(block.attn, block.norm1(h), layer, buffers, q_pos, k_pos, mask, rot_q, rot_k)
            h = h + block.mlp(block.norm2(h))  # (1, T, C_model)
        h = backbone.norm(h[:, -1])  # (1, C_model)
        return model.lm_head(h)  # (1, V)

    def _attention(self, attn, x, layer, cache, q_pos, k_pos, mask, rot_q, rot_k) -> torch.Tensor:
        """One layer's attention over the cache, as `Attention.forward` computes it: (1, T, C_model)."""
        q, k, v = attn.project(x)  # (1, H, T, D), (1, H_kv, T, D), (1, H_kv, T, D) or None
        turn_values = rot_q is not None and attn.rotary.values  # keys and values stored rotated, outputs turned back
        if rot_q is not None:
            q = _rotate(q, *rot_q)
            if v is not None or turn_values:  # separate V or rotary values: keys are stored rotated
                k = _rotate(k, *rot_q)
            if v is not None and turn_values:
                v = _rotate(v, *rot_q)
        self._write(cache, 0, layer, q_pos, k)
        if v is not None:
            self._write(cache, 1, layer, q_pos, v)
            k, v = self._read(cache, 0, layer, q.dtype), self._read(cache, 1, layer, q.dtype)  # (1, H_kv, C, D)
        else:  # K = V: one stored tensor, rotated when read as keys, used as stored as values
            v = self._read(cache, 0, layer, q.dtype)  # (1, H_kv, C, D)
            k = v if rot_k is None or turn_values else _rotate(v, *rot_k)
        bias = None
        if attn.pair_bias is not None:
            q = q * attn.pair_bias.score_scale()
            bias = attn.pair_bias(q_pos[None], k_pos).to(q.dtype)  # (1, 1, T, C)
        attn_mask = mask if bias is None else bias.masked_fill(~mask, float("-inf"))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           enable_gqa=attn.n_kv_heads != attn.n_heads)  # (1, H, T, D)
        if turn_values:
            y = _rotate(y, rot_q[0], rot_q[1], back=True)
        T = y.shape[2]
        return attn.proj(y.transpose(1, 2).reshape(1, T, attn.n_heads * attn.head_dim))  # (1, T, C_model)


def export_programs(decoder: StaticDecoder) -> dict[str, torch.export.ExportedProgram]:
    """torch.export of the prefill (dynamic T in 2..C) and decode (T = 1) programs."""
    cache = decoder.empty_cache()
    start = torch.zeros(1, dtype=torch.long)
    n = len(cache)
    T = torch.export.Dim("T", min=2, max=decoder.max_context)
    with torch.no_grad():
        prefill = torch.export.export(decoder, (torch.zeros(1, 2, dtype=torch.long), start, *cache),
                                      dynamic_shapes=({1: T}, None, (None,) * n), strict=False)
        decode = torch.export.export(decoder, (torch.zeros(1, 1, dtype=torch.long), start, *cache), strict=False)
    return {"prefill": prefill, "decode": decode}


def metadata(decoder: StaticDecoder) -> dict[str, str]:
    """What a runner needs besides the programs: the cache layout and the model's sizes (all strings)."""
    specs = [{"name": n, "shape": list(s), "dtype": str(d).removeprefix("torch.")} for n, s, d in decoder.cache_specs()]
    return {"format": FORMAT, "config": json.dumps(decoder.config.to_dict()), "max_context": str(decoder.max_context),
            "cache_dtype": str(decoder.cache_dtype).removeprefix("torch."), "cache": json.dumps(specs),
            "vocab_size": str(decoder.config.vocab_size)}


def export_pt2(run: str | os.PathLike, out: str | os.PathLike, max_context: int | None = None,
               cache_dtype: str | None = None, force: bool = False) -> dict:
    """Export the decoder saved at `run` to an AOTInductor package `out` (.pt2); returns a summary."""
    from torch._inductor import aot_compile
    from torch._inductor.package import package_aoti

    from qkvlab.models.gpt import GPT
    from qkvlab.models.io import load_model

    out = Path(out)
    check(out.suffix == ".pt2", f"--out {out} must end in .pt2")
    check_output(out, force, sources=[run])
    model = load_model(Path(run), "cpu")
    check(isinstance(model, GPT), f"{run} holds a {model.config.kind} model; export needs a decoder")
    max_context = model.config.max_seq_len if max_context is None else max_context
    decoder = StaticDecoder(model, max_context, cache_dtype)
    started = time.perf_counter()
    programs = export_programs(decoder)
    meta = metadata(decoder)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".export-") as tmp:
        files: dict[str, Any] = {}  # aot_compile's result type depends on its options (a package here)
        for name, ep in programs.items():
            options = {"aot_inductor.package": True, "aot_inductor.metadata": {**meta, "program": name},
                       "aot_inductor.output_path": os.path.join(tmp, name)}
            with torch.no_grad():
                files[name] = aot_compile(ep.module(), ep.example_inputs[0], options=options)
        staged = Path(tmp) / "model.pt2"
        package_aoti(str(staged), files)
        os.replace(staged, out)
    return {"out": str(out), "bytes": out.stat().st_size, "seconds": time.perf_counter() - started,
            "variant": model.config.variant, "max_context": max_context, "cache_dtype": meta["cache_dtype"],
            "cache_bytes": sum(math.prod(s) * torch.empty(0, dtype=d).element_size()
                               for _, s, d in decoder.cache_specs())}


class Pt2Runner:
    """Prefill and decode from an exported package, with torch only (no qkvlab model code)."""

    def __init__(self, path: str | os.PathLike):
        from torch._inductor.package import load_package

        path = Path(path)
        check(path.is_file(), f"{path} is not a file")
        try:
            self.prefill = load_package(str(path), "prefill")
            self.decode = load_package(str(path), "decode")
        except Exception as err:  # a foreign or damaged archive
            raise QkvlabError(f"{path} is not a qkvlab pt2 export ({type(err).__name__}: {str(err)[:120]})") from None
        meta = self.decode.get_metadata()
        check(meta.get("format") == FORMAT, f"{path} is not a qkvlab pt2 export (format {meta.get('format')!r})")
        self.metadata = meta
        self.config = json.loads(meta["config"])
        self.max_context = int(meta["max_context"])
        self.vocab_size = int(meta["vocab_size"])
        self.specs = [(s["name"], tuple(s["shape"]), getattr(torch, s["dtype"])) for s in json.loads(meta["cache"])]

    def empty_cache(self) -> list[torch.Tensor]:
        return [torch.zeros(shape, dtype=dtype) for _, shape, dtype in self.specs]

    @property
    def cache_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.empty_cache())


def generate_with(step_prefill, step_decode, cache: list[torch.Tensor], prompt: list[int], config,
                  max_context: int, vocab: int, before_step=None) -> list[int]:
    """Continue one prompt with the exported programs (ExportedProgram modules or AOTI runners) or a compiled
    step, on the cache's device (the CPU without a cache); `before_step()`, if given, runs before each call (CUDA
    graphs: `torch.compiler.cudagraph_mark_step_begin`)."""
    from qkvlab.generate import check_token_ids, sample_next

    prompt = check_token_ids([prompt], vocab)[0]
    check(len(prompt) + config.max_new_tokens <= max_context,
          f"prompt of {len(prompt)} tokens + {config.max_new_tokens} new tokens exceeds the export's "
          f"max context {max_context}")
    allowed = min(config.vocab_limit or vocab, vocab)
    device = cache[0].device if cache else torch.device("cpu")
    mark = before_step or (lambda: None)
    idx = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, P)
    start = torch.zeros(1, dtype=torch.long, device=device)
    with torch.no_grad():
        mark()
        logits = (step_prefill if len(prompt) > 1 else step_decode)(idx, start, *cache)  # (1, V)
        generator = torch.Generator(device).manual_seed(config.seed) if config.seed is not None else None
        out: list[int] = []
        for step in range(config.max_new_tokens):
            if allowed < vocab:  # a copy: a CUDA graph's output is overwritten by its next replay
                logits = logits.index_fill(1, torch.arange(allowed, vocab, device=device), float("-inf"))
            token = int(sample_next(logits, config, generator)[0])
            out.append(token)
            if token in config.stop_tokens or step + 1 == config.max_new_tokens:
                break
            mark()
            logits = step_decode(torch.tensor([[token]], device=device),
                                 torch.tensor([len(prompt) + step], device=device), *cache)  # (1, V)
    return out
