"""Our decoders against their peers, side by side in one process: Hugging Face `GPT2LMHeadModel` (SDPA) and
`LlamaForCausalLM`, and litgpt's `GPT` when it is importable.

Two shapes (`SHAPES`), each with two of our variants and the peers built from the same `ModelConfig` with random
weights (no downloads):

- "gpt2": learned positions, LayerNorm, exact (erf) GELU MLP (4 x d_model), biases, tied embeddings; ours QKV and
  Q-K=V. The Hugging Face peer is our QKV model's weights in a `GPT2LMHeadModel` (`activation_function="gelu"`, the
  same math). litgpt has no learned positions: its peer rotates all of each head (rotary) and has no position
  table, so it has max_seq_len x d_model fewer parameters.
- "llama": rotary, RMSNorm, SwiGLU (d_mlp 1024), no biases, untied head; ours GQA-2 and Q-GQA-2. The Hugging Face
  peer is our GQA-2 model's weights in a `LlamaForCausalLM` with 2 key/value heads. With `rotary_values`, also
  "Q-GQA-2 (rotary values)": the same weights with values turned by position, so the one tensor a K = V cache
  holds is read with no rotation (a model no peer has; its speed-ups are against the peers' GQA-2).

Measured, each as its library's own generation does it, interleaved over repeats (the order rotates every round)
and reported as medians:

- train: one step on `train_batch` x `train_len` tokens: forward, cross-entropy, backward, AdamW; the loss as each
  library's users compute it (`train_loss="native"`: ours `model(x, targets=y)`, which runs the output layer and
  the loss in chunks of rows without the full logits; Hugging Face `labels=`; litgpt's `chunked_cross_entropy`),
  or `F.cross_entropy` on every contender's full logits (`"common"`);
- prefill: a `prefill_len`-token prompt per row into a fresh cache, logits of the last position (Hugging Face
  with `logits_to_keep=1`; litgpt computes every position's logits, as its `generate` does);
- decode: one new token per row on `context` cached tokens, for every (batch, context); the cache is rewound after
  each step (ours `set_lengths`, Hugging Face's `DynamicCache.crop(-1)`; litgpt writes the same slot again).

Speed-ups are peer time / our time (above 1: ours faster). Utilisation (`qkvlab.bench.roofline`): decode's
"% of memory bound" is (weights + cache read) / measured read bandwidth over the step time (the bandwidth of
`x.sum()` timed in the same interleaved rounds as the cell's steps: this VM's moves by up to 2x), and its "% roofline"
the longer of that time and the step's FLOPs (`decode_flops`) at `torch.mm`'s rate on a 1024-square GEMM (the
compute roof), over the step time: a step that does more arithmetic per byte than the machine's FLOP/s per byte/s
(several query heads a key, rotations) cannot reach the memory bound. Training's "% of matmul peak" is 3 x the
forward FLOPs (`qkvlab.cost.measured_flops`) per second over `torch.mm`'s FLOP/s at the step's GEMMs.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import json
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qkvlab.arch import ModelConfig, is_positive_int
from qkvlab.bench.roofline import Gemm, PeakMemory, matmul_peak, read_bandwidth, training_gemms
from qkvlab.cost import cache_bytes, describe, macs, measured_flops, param_counts
from qkvlab.errors import check
from qkvlab.variants import parse_variant

# shape name -> (our variants, ModelConfig fields); sizes come from BenchSettings
SHAPES: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "gpt2": (("QKV", "Q-K=V"), dict(positions="learned", norm="layernorm", mlp="gelu", activation="gelu", bias=True,
                                    tie_embeddings=True)),
    "llama": (("GQA-2", "Q-GQA-2"), dict(positions="rotary", norm="rmsnorm", mlp="swiglu", bias=False,
                                         tie_embeddings=False)),
}
PEERS = ("hf", "litgpt")
PHASES = ("train", "prefill", "decode")
FILL_CHUNK = 512  # tokens per forward when filling a cache before decoding (untimed)


TRAIN_DTYPES = ("float32", "bfloat16")
# "native": each library's own training loss (ours `model(x, targets=y)`, Hugging Face `labels=`, litgpt's
# `chunked_cross_entropy`); "common": `F.cross_entropy` on every contender's full logits
TRAIN_LOSSES = ("native", "common")


@dataclass(frozen=True)
class BenchSettings:
    """What to measure. The defaults are small; the issue's full grid is contexts 512..32768, batches 1..16."""

    shapes: tuple[str, ...] = ("gpt2", "llama")
    peers: tuple[str, ...] = PEERS
    phases: tuple[str, ...] = PHASES
    layers: int = 6
    d_model: int = 384
    heads: int = 6
    vocab: int = 8192
    d_mlp: int = 1024  # the Llama shape's SwiGLU width (GPT-2's MLP is 4 x d_model)
    train_batch: int = 8
    train_len: int = 256
    prefill_len: int = 512
    contexts: tuple[int, ...] = (512, 2048)
    batches: tuple[int, ...] = (1, 4)
    repeats: int = 5
    bandwidth_mib: int = 512
    max_cache_gib: float = 8.0  # skip a decode cell whose caches (all models at once) would exceed this
    seed: int = 0
    device: str = "cpu"
    fused_rotary: bool = False  # also time our variants through the one-pass cache read, as "(fused)" rows
    rotary_values: bool = False  # also time rotary shapes' tied variants with rotary values (ours only: no peer has it)
    train_dtype: str = "float32"  # "bfloat16": every contender's training step under bf16 autocast
    train_loss: str = "native"  # TRAIN_LOSSES

    def __post_init__(self) -> None:
        for name in ("shapes", "peers", "phases"):
            known = {"shapes": tuple(SHAPES), "peers": PEERS, "phases": PHASES}[name]
            values = getattr(self, name)
            check(len(values) > 0 or name == "peers", f"--{name} needs at least one value")
            for v in values:
                check(v in known, f"unknown {name[:-1]} {v!r}; accepted: {', '.join(known)}")
        for name in ("layers", "d_model", "heads", "vocab", "d_mlp", "train_batch", "train_len", "prefill_len",
                     "repeats", "bandwidth_mib"):
            value = getattr(self, name)
            check(is_positive_int(value), f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        for name in ("contexts", "batches"):
            values = getattr(self, name)
            check(len(values) > 0, f"--{name} needs at least one value")
            for v in values:
                check(is_positive_int(v), f"--{name} values must be positive integers, got {v!r}")
        check(self.max_cache_gib > 0, f"--max-cache-gib must be > 0, got {self.max_cache_gib}")
        check(self.train_dtype in TRAIN_DTYPES,
              f"--train-dtype must be one of {', '.join(TRAIN_DTYPES)}, got {self.train_dtype!r}")
        check(self.train_loss in TRAIN_LOSSES,
              f"--train-loss must be one of {', '.join(TRAIN_LOSSES)}, got {self.train_loss!r}")
        check(self.d_model % self.heads == 0, f"--heads {self.heads} does not divide --d-model {self.d_model}")
        if "llama" in self.shapes:
            check(self.heads % 2 == 0, f"the llama shape groups heads in 2 (GQA-2): --heads must be even, "
                                       f"got {self.heads}")
            check((self.d_model // self.heads) % 2 == 0, "the llama shape is rotary: head_dim (--d-model / --heads) "
                                                         "must be even")
        check(not self.rotary_values or any(SHAPES[s][1]["positions"] == "rotary" for s in self.shapes),
              f"--rotary-values times rotary shapes (llama); --shapes {' '.join(self.shapes)} has none")
        check(self.device == "cpu" or self.device.startswith("cuda"),
              f"--device must be cpu or cuda[:N], got {self.device!r}")

    @property
    def max_seq_len(self) -> int:
        """The longest sequence the phases asked for need (the GPT-2 shape's position table grows with it)."""
        lengths = {"train": self.train_len, "prefill": self.prefill_len + 1, "decode": max(self.contexts) + 1}
        return max(lengths[p] for p in self.phases)

    def config(self, shape: str, variant: str) -> ModelConfig:
        """Our model config of `shape` under `variant`."""
        fields = dict(SHAPES[shape][1])
        if shape == "llama":
            fields["d_mlp"] = self.d_mlp
        return ModelConfig(kind="decoder", variant=variant, n_layers=self.layers, d_model=self.d_model,
                           n_heads=self.heads, vocab_size=self.vocab, max_seq_len=self.max_seq_len, **fields)


# --- the contenders ------------------------------------------------------------------------------------------

class Contender:
    """One model under test, with the operations each phase times."""

    kind = "ours"

    def __init__(self, name: str, model: Any, config: ModelConfig, note: str = "", fused_rotary: bool = False):
        self.name, self.model, self.config, self.note = name, model, config, note  # model: an nn.Module
        self.fused_rotary = fused_rotary  # caches read through qkvlab.nn.rotary_read (the one-pass read)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())  # tied tensors once

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        """Training forward: (B, T) -> (B, T, V)."""
        return self.model(idx)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The mean next-token cross-entropy of inputs x (B, T) against targets y (B, T), as this library's users
        train: ours through the output layer in chunks of rows (`qkvlab.nn.cross_entropy`)."""
        return self.model(x, targets=y)

    def prefill(self, idx: torch.Tensor) -> torch.Tensor:
        """A fresh cache filled with `idx` (B, T); the last position's logits (B, V)."""
        cache = self.model.make_cache(idx.shape[0], idx.shape[1] + 1, fused_rotary=self.fused_rotary)
        h = self.model.hidden(idx, cache)  # (B, T, C)
        return self.model.lm_head(h[:, -1])  # (B, V)

    def fill(self, batch: int, context: int, generator: torch.Generator) -> Any:
        """A cache holding `context` random tokens per row (room for one more)."""
        cache = self.model.make_cache(batch, context + 1, fused_rotary=self.fused_rotary)
        for idx in _chunks(batch, context, self.config.vocab_size, generator, self.device):
            self.model.hidden(idx, cache)
        return cache

    def step(self, cache: Any, token: torch.Tensor, context: int) -> torch.Tensor:
        """One decode step of `token` (B, 1) on `context` cached tokens; the cache is left as it was."""
        cache.set_lengths([context] * token.shape[0])
        return self.model(token, cache)  # (B, 1, V)

    def release(self, cache: Any) -> None:
        """Forget a cache (litgpt keeps its cache inside the model)."""


class HFPeer(Contender):
    kind = "hf"

    def __init__(self, name: str, model: Any, config: ModelConfig, note: str = ""):
        super().__init__(name, model, config, note)
        # transformers 5.24 renamed `past_key_values` to `cache` (the old name warns)
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=idx, use_cache=False).logits

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if _takes_shift_labels():  # `labels=` with the targets already shifted
            return self.model(input_ids=x, labels=y, shift_labels=y, use_cache=False).loss
        return common_loss(self, x, y)

    def prefill(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=idx, use_cache=True, logits_to_keep=1).logits[:, -1]

    def fill(self, batch: int, context: int, generator: torch.Generator) -> Any:
        from transformers import DynamicCache

        try:
            cache = DynamicCache(config=self.model.config)
        except TypeError:  # older transformers
            cache = DynamicCache()
        for idx in _chunks(batch, context, self.config.vocab_size, generator, self.device):
            self.model(input_ids=idx, use_cache=True, logits_to_keep=1, **{self.cache_arg: cache})
        return cache

    def step(self, cache: Any, token: torch.Tensor, context: int) -> torch.Tensor:
        logits = self.model(input_ids=token, use_cache=True, **{self.cache_arg: cache}).logits  # (B, 1, V)
        cache.crop(-1)  # drop the new token again
        return logits


class LitgptPeer(Contender):
    kind = "litgpt"

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from litgpt.utils import chunked_cross_entropy

        return chunked_cross_entropy(self.model(x), y)  # as litgpt's pretrain.py

    def prefill(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        self.model.set_kv_cache(batch_size=B, max_seq_length=T + 1, device=self.device)
        return self.model(idx, input_pos=torch.arange(T, device=self.device))[:, -1]

    def fill(self, batch: int, context: int, generator: torch.Generator) -> Any:
        self.model.set_kv_cache(batch_size=batch, max_seq_length=context + 1, device=self.device)
        start = 0
        for idx in _chunks(batch, context, self.config.vocab_size, generator, self.device):
            self.model(idx, input_pos=torch.arange(start, start + idx.shape[1], device=self.device))
            start += idx.shape[1]
        return None

    def step(self, cache: Any, token: torch.Tensor, context: int) -> torch.Tensor:
        return self.model(token, input_pos=torch.tensor([context], device=self.device))  # (B, 1, V)

    def release(self, cache: Any) -> None:
        self.model.clear_kv_cache()


def common_loss(c: Contender, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`F.cross_entropy` on the contender's full float32 logits: the same loss for every library."""
    return nn.functional.cross_entropy(c.logits(x).float().flatten(0, 1), y.flatten())


@functools.cache
def _takes_shift_labels() -> bool:
    """Whether transformers' causal-LM loss takes targets already shifted (`shift_labels`, transformers >= 4.52);
    older versions fall back to `F.cross_entropy` on the logits."""
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except ImportError:
        return False
    return "shift_labels" in inspect.signature(ForCausalLMLoss).parameters


def _chunks(batch: int, length: int, vocab: int, generator: torch.Generator, device: torch.device):
    for start in range(0, length, FILL_CHUNK):
        n = min(FILL_CHUNK, length - start)
        yield torch.randint(0, vocab, (batch, n), generator=generator).to(device)  # (B, n)


def peer_status(peer: str) -> tuple[bool, str]:
    """(available, version or the one-line reason it is not)."""
    module = {"hf": "transformers", "litgpt": "litgpt.model"}[peer]
    try:
        mod = importlib.import_module(module)
    except Exception as err:  # a missing package, or one whose own imports fail (litgpt without lightning)
        text = " ".join(f"{type(err).__name__}: {err}".split())
        return False, f"import {module} failed ({text[:160]})"
    root = importlib.import_module(module.split(".")[0])
    return True, str(getattr(root, "__version__", getattr(mod, "__version__", "unknown")))


def _hf_peer(shape: str, ours: Contender) -> HFPeer:
    from qkvlab.hf.export import to_gpt2, to_llama

    model = to_gpt2(ours.model) if shape == "gpt2" else to_llama(ours.model)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("sdpa")
    else:  # older transformers
        model.config._attn_implementation = "sdpa"
    name = "HF " + type(model).__name__
    return HFPeer(name, model, ours.config, f"attn_implementation={model.config._attn_implementation}")


def _litgpt_peer(shape: str, config: ModelConfig, seed: int) -> LitgptPeer:
    from litgpt.config import Config
    from litgpt.model import GPT as LitGPT

    torch.manual_seed(seed)
    lit = Config(name="qkvlab-bench", block_size=config.max_seq_len, n_layer=config.n_layers, n_embd=config.d_model,
                 n_head=config.n_heads, head_size=config.resolved_head_dim, n_query_groups=config.n_kv_heads,
                 vocab_size=config.vocab_size, padded_vocab_size=config.vocab_size, bias=config.bias,
                 norm_class_name="LayerNorm" if config.norm == "layernorm" else "RMSNorm", norm_eps=config.norm_eps,
                 mlp_class_name="GptNeoxMLP" if config.mlp == "gelu" else "LLaMAMLP",
                 intermediate_size=config.resolved_d_mlp,
                 gelu_approximate="none" if config.activation == "gelu" else "tanh",
                 rotary_percentage=1.0, parallel_residual=False, rope_base=int(config.rope_theta))
    model = LitGPT(lit)
    if config.tie_embeddings:
        model.lm_head.weight = model.transformer.wte.weight
    equivalent = config.replace(positions="rotary")  # litgpt has no learned positions
    note = "rotary instead of learned positions (no position table)" if config.positions != "rotary" else ""
    return LitgptPeer("litgpt GPT", model, equivalent, note)


def build_contenders(settings: BenchSettings, shape: str, available: dict[str, bool]) -> list[Contender]:
    """Our variants of `shape`, then each available peer (built from our first variant's config)."""
    from qkvlab.models import build_model

    device = torch.device(settings.device)
    configs = [(v, settings.config(shape, v)) for v in SHAPES[shape][0]]
    if settings.rotary_values and SHAPES[shape][1]["positions"] == "rotary":  # K = V read with no rotation
        configs += [(f"{v} (rotary values)", c.replace(rotary_values=True)) for v, c in configs
                    if parse_variant(v).kv_tied]
    ours = [Contender(name, build_model(c, seed=settings.seed).to(device), c) for name, c in configs]
    if settings.fused_rotary:  # the same models again, decoding through the one-pass cache read
        ours += [Contender(f"{c.name} (fused)", c.model, c.config, "one-pass cache read", fused_rotary=True)
                 for c in list(ours)]
    contenders: list[Contender] = list(ours)
    if available.get("hf"):
        contenders.append(_hf_peer(shape, ours[0]))
    if available.get("litgpt"):
        contenders.append(_litgpt_peer(shape, ours[0].config, settings.seed))
    for c in contenders:
        c.model.to(device)
    return contenders


# --- timing ----------------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: Mapping[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each function over `repeats` rounds; every round calls each once, the order rotating."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            _sync(device)
            start = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {n: statistics.median(t) for n, t in times.items()}


def _train_step(c: Contender, idx: torch.Tensor, dtype: str = "float32", loss: str = "native") -> Callable[[], None]:
    """Forward, loss, backward and AdamW; with dtype "bfloat16" the forward runs under bf16 autocast (weights and
    optimizer stay float32), as `train.dtype=bfloat16` trains and as litgpt's "bf16-mixed" does. `loss` "native":
    the contender's own loss (`Contender.loss`); "common": `F.cross_entropy` on its full float32 logits."""
    opt = torch.optim.AdamW(c.model.parameters(), lr=1e-4)
    device = c.device
    x, y = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()  # (B, T) each

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            value = c.loss(x, y) if loss == "native" else common_loss(c, x, y)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
    return step


ROOF_GEMM = (1024, 1024, 1024)  # (m, k, n) of the compute roof's GEMM


def weight_bytes(config: ModelConfig) -> int:
    """Parameter bytes a decode step reads (float32): all but the tables it looks up one row per token from (the
    learned positions; the token embedding when the LM head has its own weight, else the head reads it whole)."""
    counts = param_counts(config)
    looked_up = counts["positions"] + (0 if config.tie_embeddings else counts["embedding"])
    return 4 * (counts["total"] - looked_up)


def decode_flops(config: ModelConfig, batch: int, context: int) -> int:
    """FLOPs (2 per multiply-add) of one decode step: `batch` new tokens through every projection, MLP and the LM
    head, each query head over `context` + 1 keys (`qkvlab.cost.macs`; norms, softmax, activations and rotations
    are not counted)."""
    return 2 * macs(config, seq_len=1, batch=batch, past=context)["total"]


def decode_roofline(config: ModelConfig, moved: int, batch: int, context: int, seconds: float, read_bytes_per_s: float,
                    flops_per_s: float | None) -> dict[str, float]:
    """A decode step of `seconds` against this machine: the time to move `moved` bytes at `read_bytes_per_s` and
    its share of the step ("% of memory bound"); with `flops_per_s`, the step's FLOPs at that rate and the share of
    the longer of the two ("% roofline")."""
    bound = moved / read_bytes_per_s
    out = {"bound_seconds": bound, "pct_memory_bound": 100 * bound / seconds}
    if flops_per_s:
        flops = decode_flops(config, batch, context)
        out.update(flops=flops, compute_seconds=flops / flops_per_s,
                   pct_roofline=100 * max(bound, flops / flops_per_s) / seconds)
    return out


# --- the run --------------------------------------------------------------------------------------------------

@dataclass
class Report:
    """Everything measured, JSON-ready (`as_dict`), and the lines printed on the way."""

    settings: BenchSettings
    machine: dict[str, Any] = field(default_factory=dict)
    peers: dict[str, dict[str, Any]] = field(default_factory=dict)
    bandwidth: dict[str, Any] = field(default_factory=dict)
    compute: dict[str, Any] = field(default_factory=dict)  # decode's compute roof: torch.mm at a square GEMM
    shapes: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        settings = dataclasses.asdict(self.settings)
        return {"settings": settings, "machine": self.machine, "peers": self.peers, "bandwidth": self.bandwidth,
                "compute": self.compute, "shapes": self.shapes}


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def _table(rows: list[dict[str, Any]], columns: Sequence[str]) -> list[str]:
    from qkvlab.table import format_table

    return format_table(rows, columns).splitlines()


def _speedups(kind_rows: list[dict[str, Any]], contenders: list[Contender], key: tuple[str, ...]) -> None:
    """Add "vs <peer>" (peer seconds / ours) to each of our rows, matching rows on `key`."""
    peers = [c for c in contenders if c.kind != "ours"]
    by = {(r["model"],) + tuple(r[k] for k in key): r for r in kind_rows}
    for row in kind_rows:
        if row["kind"] != "ours":
            continue
        for p in peers:
            other = by.get((p.name,) + tuple(row[k] for k in key))
            if other:
                row[f"vs {p.name}"] = other["seconds"] / row["seconds"]


def run(settings: BenchSettings, echo: Callable[[str], None] = print) -> Report:
    """Measure everything `settings` asks for; print tables through `echo`; return the report."""
    device = torch.device(settings.device)
    report = Report(settings)
    report.machine = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device),
                      "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                      "python": platform.python_version()}
    available = {}
    for peer in settings.peers:
        ok, text = peer_status(peer)
        available[peer] = ok
        report.peers[peer] = {"available": ok, ("version" if ok else "reason"): text}
        if not ok:
            echo(f"peer {peer}: unavailable, {text}; benchmarking the rest")
    echo(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device}; medians of {settings.repeats} "
         "interleaved repeats; speed-up = peer time / our time (above 1: ours faster)")
    if "decode" in settings.phases:
        bw = read_bandwidth(settings.bandwidth_mib, max(3, settings.repeats), device)
        report.bandwidth = bw
        if bw:
            echo(f"read bandwidth {bw['read_bytes_per_s'] / 1e9:.1f} GB/s (copy {bw['copy_bytes_per_s'] / 1e9:.1f} "
                 f"GB/s): {bw['method']}")
        report.compute = matmul_peak([Gemm(*ROOF_GEMM, 1, "square")], max(3, settings.repeats), device)
        echo(f"compute roof {report.compute['flops_per_s'] / 1e9:.1f} GFLOP/s: torch.mm at "
             f"{' x '.join(map(str, ROOF_GEMM))} float32, median of {max(3, settings.repeats)}")
    for shape in settings.shapes:  # once at a tiny size: one-time costs (thread pools, lazy imports) fall here
        _run_shape(_tiny(settings), shape, available, {}, {}, lambda text: None)
    for shape in settings.shapes:
        report.shapes.append(_run_shape(settings, shape, available, report.bandwidth, report.compute, echo))
    return report


def _tiny(settings: BenchSettings) -> BenchSettings:
    """`settings` at a size that costs nothing: the process warm-up."""
    return dataclasses.replace(settings, layers=1, d_model=16, heads=2, vocab=32, d_mlp=16, train_batch=1,
                               train_len=8, prefill_len=8, contexts=(8,), batches=(1,), repeats=1)


def _run_shape(settings: BenchSettings, shape: str, available: dict[str, bool], bandwidth: dict[str, Any],
               compute: dict[str, Any], echo: Callable[[str], None]) -> dict[str, Any]:
    contenders = build_contenders(settings, shape, available)
    base = contenders[0].config
    gen = torch.Generator().manual_seed(settings.seed)
    out: dict[str, Any] = {"shape": shape, "config": base.to_dict(), "models": [], "train": [], "prefill": [],
                           "decode": [], "skipped": []}
    echo("")
    echo(f"== {shape} shape: {describe(base, shape)} ==")
    for c in contenders:
        out["models"].append({"model": c.name, "kind": c.kind, "variant": c.config.variant, "params": c.params(),
                              "note": c.note})
    echo("params: " + "; ".join(f"{m['model']} {m['params']:,}" + (f" ({m['note']})" if m["note"] else "")
                                for m in out["models"]))
    if "train" in settings.phases:  # a fused row is the same model as its plain row: trained once
        trained = [c for c in contenders if not c.fused_rotary]
        out["train"], out["matmul"] = _train_phase(settings, trained, gen, echo)
    for c in contenders:
        c.model.eval()
    with torch.inference_mode():
        if "prefill" in settings.phases:
            out["prefill"] = _prefill_phase(settings, contenders, gen, echo)
        if "decode" in settings.phases:
            out["decode"], out["skipped"] = _decode_phase(settings, contenders, gen, bandwidth, compute, echo)
    return out


def _train_phase(settings: BenchSettings, contenders: list[Contender], gen: torch.Generator,
                 echo: Callable[[str], None]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    device = torch.device(settings.device)
    B, T = settings.train_batch, settings.train_len
    idx = torch.randint(0, settings.vocab, (B, T + 1), generator=gen).to(device)  # (B, T + 1)
    steps: dict[str, Callable[[], None]] = {}
    rows: list[dict[str, Any]] = []
    for c in contenders:
        c.model.train()
        steps[c.name] = _train_step(c, idx, settings.train_dtype, settings.train_loss)
        with PeakMemory(device) as peak:
            steps[c.name]()  # warm-up; AdamW allocates its state here
        flops = 3 * measured_flops(c.logits, idx[:, :-1])
        rows.append({"model": c.name, "kind": c.kind, "flops_per_step": flops, "peak_bytes": peak.bytes,
                     "memory_method": peak.method})
    medians = interleaved(steps, settings.repeats, device)
    del steps  # the optimizers and their state
    for c in contenders:
        c.model.zero_grad(set_to_none=True)
    base = contenders[0].config
    matmul = matmul_peak(training_gemms(base, B * T), device=device,
                         dtype=torch.bfloat16 if settings.train_dtype == "bfloat16" else torch.float32)
    for row in rows:
        s = medians[row["model"]]
        row.update(seconds=s, tokens_per_s=B * T / s, flops_per_s=row["flops_per_step"] / s)
        if matmul["flops_per_s"] > 0:
            row["pct_matmul_peak"] = 100 * row["flops_per_s"] / matmul["flops_per_s"]
    _speedups(rows, contenders, ())
    echo(f"train step: batch {B} x {T} tokens, forward + {settings.train_loss} loss + backward + AdamW, "
         f"{settings.train_dtype}"
         + (" autocast" if settings.train_dtype != "float32" else "")
         + f"; torch.mm at these GEMMs ({settings.train_dtype}) {matmul['flops_per_s'] / 1e9:.1f} GFLOP/s")
    peers = [f"vs {c.name}" for c in contenders if c.kind != "ours"]
    table = [{"model": r["model"], "ms": _ms(r["seconds"]), "tokens/s": f"{r['tokens_per_s']:,.0f}",
              **{p: (f"{r[p]:.2f}x" if p in r else "") for p in peers},
              "GFLOP/s": f"{r['flops_per_s'] / 1e9:.1f}",
              "% matmul peak": f"{r['pct_matmul_peak']:.0f} %" if "pct_matmul_peak" in r else "",
              "peak MiB": f"{r['peak_bytes'] / 2 ** 20:.1f}"} for r in rows]
    for line in _table(table, list(table[0])):
        echo(line)
    return rows, matmul


def _prefill_phase(settings: BenchSettings, contenders: list[Contender], gen: torch.Generator,
                   echo: Callable[[str], None]) -> list[dict[str, Any]]:
    device = torch.device(settings.device)
    rows: list[dict[str, Any]] = []
    for B in settings.batches:
        idx = torch.randint(0, settings.vocab, (B, settings.prefill_len), generator=gen).to(device)  # (B, P)
        fns: dict[str, Callable[[], object]] = {}
        peaks: dict[str, int] = {}
        for c in contenders:
            fns[c.name] = functools.partial(c.prefill, idx)
            with PeakMemory(device) as peak:
                fns[c.name]()  # warm-up
            c.release(None)
            peaks[c.name] = peak.bytes
        medians = interleaved(fns, settings.repeats, device)
        for c in contenders:
            c.release(None)
            rows.append({"model": c.name, "kind": c.kind, "batch": B, "length": settings.prefill_len,
                         "seconds": medians[c.name], "tokens_per_s": B * settings.prefill_len / medians[c.name],
                         "peak_bytes": peaks[c.name]})
    _speedups(rows, contenders, ("batch",))
    echo(f"prefill: {settings.prefill_len} tokens per row into a fresh cache, last position's logits")
    _echo_cells(rows, contenders, ("batch",), echo)
    return rows


def _decode_phase(settings: BenchSettings, contenders: list[Contender], gen: torch.Generator,
                  bandwidth: dict[str, Any], compute: dict[str, Any],
                  echo: Callable[[str], None]) -> tuple[list[dict], list[dict]]:
    device = torch.device(settings.device)
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    flops_per_s = compute.get("flops_per_s")
    # The read bandwidth of each cell: x.sum() timed in the same interleaved rounds as its steps (this VM's
    # x.sum() read 23-54 GB/s across runs and moved within one: a bandwidth measured once at the start put later
    # cells above 100 % of their "bound").
    probe = torch.ones(settings.bandwidth_mib * 2 ** 20 // 4, device=device) if bandwidth else None  # (N,)
    for B in settings.batches:
        for L in settings.contexts:
            need = sum(cache_bytes(c.config, None, L + 1, B, "fp32") for c in contenders)
            if need > settings.max_cache_gib * 2 ** 30:
                skipped.append({"batch": B, "context": L, "cache_bytes": need})
                echo(f"decode batch {B}, context {L}: skipped, the caches need {need / 2 ** 30:.1f} GiB "
                     f"> --max-cache-gib {settings.max_cache_gib:g}")
                continue
            token = torch.randint(0, settings.vocab, (B, 1), generator=gen).to(device)  # (B, 1)
            caches: dict[str, Any] = {}
            fns: dict[str, Callable[[], object]] = {}
            peaks: dict[str, int] = {}
            for c in contenders:
                if c.kind == "litgpt":
                    continue  # its cache lives in the model: measured alone below
                with PeakMemory(device) as peak:
                    caches[c.name] = c.fill(B, L, gen)
                    c.step(caches[c.name], token, L)
                peaks[c.name] = peak.bytes
                fns[c.name] = functools.partial(c.step, caches[c.name], token, L)
            read_bw: dict[str, float] = {}  # contender -> the bytes/s x.sum() read in its rounds
            medians = _with_probe(fns, probe, settings.repeats, device, read_bw)
            for c in contenders:
                if c.kind == "litgpt":  # one cache per model: timed on its own after the others
                    with PeakMemory(device) as peak:
                        c.fill(B, L, gen)
                        c.step(None, token, L)
                    peaks[c.name] = peak.bytes
                    alone = {c.name: functools.partial(c.step, None, token, L)}
                    medians.update(_with_probe(alone, probe, settings.repeats, device, read_bw))
                    c.release(None)
            for c in contenders:
                moved = weight_bytes(c.config) + cache_bytes(c.config, None, L + 1, B, "fp32")
                row: dict[str, Any] = {"model": c.name, "kind": c.kind, "batch": B, "context": L,
                                       "seconds": medians[c.name], "bytes_moved": moved, "peak_bytes": peaks[c.name]}
                if c.name in read_bw:  # the roofline: the longer of reading the bytes and doing the arithmetic
                    row["read_bytes_per_s"] = read_bw[c.name]
                    row.update(decode_roofline(c.config, moved, B, L, medians[c.name], read_bw[c.name], flops_per_s))
                rows.append(row)
            for c in contenders:
                c.release(caches.pop(c.name, None))
    _speedups(rows, contenders, ("batch", "context"))
    echo("decode step: one new token per row on `context` cached tokens; % of memory bound = "
         "(weights + cache read) / read bandwidth / step time, the bandwidth that of x.sum() timed in the same "
         "interleaved rounds as the step (GB/s read); % roofline = the longer of that time and FLOPs / compute "
         "roof, over the step time")
    _echo_cells(rows, contenders, ("batch", "context"), echo)
    return rows, skipped


READ_PROBE = "x.sum()"


def _with_probe(fns: Mapping[str, Callable[[], object]], probe: torch.Tensor | None, repeats: int, device: torch.device,
                read_bw: dict[str, float]) -> dict[str, float]:
    """`interleaved(fns)` with `probe.sum()` as one more function in the same rounds; read_bw gets, for each of
    fns, the bytes/s the probe read in them."""
    if probe is None:
        return interleaved(fns, repeats, device)
    medians = interleaved({**fns, READ_PROBE: probe.sum}, repeats, device)
    seconds = medians.pop(READ_PROBE)
    read_bw.update(dict.fromkeys(fns, probe.numel() * probe.element_size() / seconds))
    return medians


def _echo_cells(rows: list[dict[str, Any]], contenders: list[Contender], key: tuple[str, ...],
                echo: Callable[[str], None]) -> None:
    peers = [f"vs {c.name}" for c in contenders if c.kind != "ours"]
    table = []
    for r in rows:
        line = {k: r[k] for k in key}
        line.update({"model": r["model"], "ms": _ms(r["seconds"])})
        if "tokens_per_s" in r:
            line["tokens/s"] = f"{r['tokens_per_s']:,.0f}"
        line.update({p: (f"{r[p]:.2f}x" if p in r else "") for p in peers})
        if "pct_memory_bound" in r:
            line["MB moved"] = f"{r['bytes_moved'] / 1e6:.1f}"
            line["GB/s read"] = f"{r['read_bytes_per_s'] / 1e9:.1f}"
            line["% memory bound"] = f"{r['pct_memory_bound']:.0f} %"
        if "pct_roofline" in r:
            line["% roofline"] = f"{r['pct_roofline']:.0f} %"
        line["peak MiB"] = f"{r['peak_bytes'] / 2 ** 20:.1f}"
        table.append(line)
    if table:
        for text in _table(table, list(dict.fromkeys(k for t in table for k in t))):
            echo(text)


def write_json(report: Report, path: str) -> None:
    """The report as JSON at `path` (written atomically)."""
    from qkvlab.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(report.as_dict(), indent=2) + "\n")
