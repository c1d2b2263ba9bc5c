"""Why K = V works: how similar a trained model's queries, keys and values are, and how asymmetric its scores.

For every attention layer, on the model's own inputs:

- ``cos_qk``, ``cos_qv``, ``cos_kv``: mean cosine similarity between the per-head query, key and
  value vectors of the same token (keys/values expanded to the query heads), before rotary;
- ``rank_q``, ``rank_k``, ``rank_v``: effective rank (exp of the entropy of the normalised singular
  values, Roy & Vetterli 2007) of each projection's outputs over all tokens (B*T, heads*D), and
  ``weight_rank_*`` of the projection weights;
- ``asym``: ‖S − Sᵀ‖_F / ‖S‖_F of the pre-softmax score matrix S = QKᵀ/√D (+ the "+" variants' pair
  bias), after rotary and *before* any mask, per (example, head) over all T×T query-key pairs, then
  averaged. For a causal model this is the matrix the mask is applied to: it measures whether the
  score of i attending j equals that of j attending i, not what the masked softmax does. Tied
  Q = K without a pair bias gives 0 exactly (rotary keeps it symmetric); at most 2 (an antisymmetric S).

Inputs: `task_eval_inputs` takes the first batch a task's own `evaluate` feeds the model (held-out
data); random inputs are for tests and `qkvlab analyze --random-inputs` only.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from qkvlab.nn.attention import Attention

if TYPE_CHECKING:
    from qkvlab.models import Model

STATS = ("cos_qk", "cos_qv", "cos_kv", "rank_q", "rank_k", "rank_v", "asym")


def effective_rank(matrix: torch.Tensor) -> float:
    """exp(H(p)) with p the singular values of `matrix` (2D) normalised to sum 1."""
    s = torch.linalg.svdvals(matrix.double())
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def score_asymmetry(scores: torch.Tensor) -> float:
    """Mean over leading dims of ‖S − Sᵀ‖_F / ‖S‖_F for square score matrices S (..., T, T); 0 = symmetric."""
    s = scores.double()
    num = torch.linalg.matrix_norm(s - s.transpose(-2, -1))  # (...)
    den = torch.linalg.matrix_norm(s).clamp_min(1e-300)  # (...)
    return float((num / den).mean())


def _mean_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.double(), b.double(), dim=-1).mean())


@torch.no_grad()
def layer_similarity(attn: Attention, x: torch.Tensor, ctx=None) -> dict[str, float]:
    """Statistics of one attention layer on its inputs x (B, T, C); `asym` needs the layer's context `ctx`."""
    q, k, v = attn.project(x)  # (B, H, T, D), (B, H_kv, T, D), (B, H_kv, T, D) or None
    v = k if v is None else v
    rep = attn.n_heads // attn.n_kv_heads
    k_full, v_full = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, H, T, D)
    flat = {name: t.transpose(1, 2).flatten(2).flatten(0, 1)  # (B*T, heads*D)
            for name, t in (("q", q), ("k", k), ("v", v))}
    stats = {"cos_qk": _mean_cos(q, k_full), "cos_qv": _mean_cos(q, v_full), "cos_kv": _mean_cos(k_full, v_full)}
    for name, t in flat.items():
        stats[f"rank_{name}"] = effective_rank(t)
    for name, (w, _) in attn.projection_weights().items():
        stats[f"weight_rank_{name}"] = effective_rank(w)
    stats["asym"] = math.nan
    if ctx is not None:
        if hasattr(attn, "attention_maps"):
            scores = attn.attention_maps(x, ctx)["scores"]  # (B, H, T, T), before masking
        else:  # the older signature forward(x, ctx, need_weights)
            scores = attn(x, ctx, True)[1]["scores"]
        stats["asym"] = score_asymmetry(scores)
    return stats


@torch.no_grad()
def projection_similarity(model: nn.Module, *inputs, **kwargs) -> list[dict[str, float]]:
    """Per-layer statistics of `model` run on `inputs` (the attention inputs are captured by hooks)."""
    captured: list[tuple[Attention, torch.Tensor, object]] = []

    def grab(mod, args, kw):
        ctx = args[1] if len(args) > 1 else kw.get("ctx")
        captured.append((mod, args[0], ctx))

    hooks = [m.register_forward_pre_hook(grab, with_kwargs=True) for m in model.modules() if isinstance(m, Attention)]
    was_training = model.training
    try:
        model.eval()
        model(*inputs, **kwargs)
        for h in hooks:  # before the layers run again for their scores
            h.remove()
        return [{"layer": attn.layer_idx, **layer_similarity(attn, x, ctx)} for attn, x, ctx in captured]
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)


class _Captured(Exception):
    def __init__(self, args: tuple, kwargs: dict):
        super().__init__("captured")
        self.args_, self.kwargs_ = args, kwargs


@torch.no_grad()
def task_eval_inputs(task, model: nn.Module, batch_size: int) -> tuple[tuple, dict]:
    """(args, kwargs) of the first call `task.evaluate(model, batch_size)` makes to `model`: held-out inputs.

    The evaluation stops at that call, so this costs one batch whatever the size of the split.
    """
    def stop(mod, args, kwargs):
        raise _Captured(args, kwargs)

    hook = model.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        task.evaluate(model, batch_size, max_batches=1)
    except _Captured as got:
        return got.args_, got.kwargs_
    finally:
        hook.remove()
    raise ValueError(f"task {getattr(task, 'name', task)!r} evaluated without calling the model")


def check_task_matches(task, cfg, model_name: str = "the model") -> None:
    """A task whose model differs from the checkpoint's `cfg` in kind, vocabulary, input or image size is an error."""
    from qkvlab.errors import QkvlabError, check

    try:
        expected = task.model_config(cfg.variant)
    except QkvlabError:
        raise
    except Exception:  # a task that cannot describe its model: nothing to compare
        return
    keys = ["kind"] + {"vit": ["image_size", "in_channels", "patch_size"]}.get(cfg.kind, ["vocab_size", "input_dim"])
    diff = [f"{k} {getattr(expected, k)} vs {getattr(cfg, k)}" for k in keys if getattr(expected, k) != getattr(cfg, k)]
    check(not diff, f"task {task.name!r} does not match {model_name} ({', '.join(diff)}; task vs checkpoint)")


def held_out_inputs(model: Model, task, batch_size: int, model_name: str = "the model") -> tuple[tuple, dict]:
    """A held-out batch of `task` as `model` (a qkvlab model with `.config`) is called with it."""
    check_task_matches(task, model.config, model_name)
    if hasattr(task, "setup"):  # windows of the model's context; held-out data is the same at any preset
        task.setup(model.config, "quick")
    return task_eval_inputs(task, model, batch_size)


def summarize_layers(rows: list[dict[str, float]]) -> dict[str, float]:
    """Mean over layers of each statistic in `STATS` (NaN where no layer has it)."""
    out = {}
    for key in STATS:
        vals = [r[key] for r in rows if key in r and not math.isnan(r[key])]
        out[key] = sum(vals) / len(vals) if vals else math.nan
    return out
