"""AdamW with weight decay on matrices only, and a warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from qkvlab.train.config import OptimConfig, ScheduleConfig

# Modules whose parameters never decay. Norm classes from other files are caught by name.
_NO_DECAY_MODULES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag, nn.LayerNorm, nn.GroupNorm,
                                                   nn.RMSNorm, nn.modules.batchnorm._BatchNorm)
# Free-standing parameters (e.g. a ViT's cls_token, pos_emb tables) are matched by their own name.
_NO_DECAY_NAME_PARTS = ("emb", "token", "norm")


def _never_decays(module: nn.Module) -> bool:
    return isinstance(module, _NO_DECAY_MODULES) or "norm" in type(module).__name__.lower()


def split_decay(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(decay, no_decay) trainable parameters, each once even when tied.

    No decay: biases and any parameter with fewer than 2 dims, parameters of norm and embedding
    modules (so a tied output head does not decay either), and free parameters named like
    embeddings or tokens. Everything else (projection and MLP matrices) decays.
    """
    exempt: set[int] = set()
    for module in model.modules():
        own = list(module.named_parameters(recurse=False))
        if _never_decays(module):
            exempt.update(id(p) for _, p in own)
            continue
        for name, p in own:
            is_free = not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd))
            if p.ndim < 2 or (is_free and any(part in name.lower() for part in _NO_DECAY_NAME_PARTS)):
                exempt.add(id(p))
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if id(p) in exempt else decay).append(p)
    return decay, no_decay


def _can_fuse(params: list[nn.Parameter]) -> bool:
    """Whether the fused AdamW kernel takes these parameters (plain float tensors on CPU or CUDA)."""
    return all(type(p.data) is torch.Tensor and p.device.type in ("cpu", "cuda") and p.is_floating_point()
               for p in params)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over two parameter groups: matrices with `cfg.weight_decay`, the rest without.

    The fused kernel (one pass over all parameters) where it applies, on CPU as on CUDA: on a
    small model it is several times faster than the per-tensor loop; sharded (FSDP) parameters
    fall back to the multi-tensor path.
    """
    if cfg.lr is None:
        raise ValueError("optim.lr is unset: resolve the run (qkvlab.train.config.resolve_run) first")
    decay, no_decay = split_decay(model)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fast = {"fused": True} if _can_fuse(decay + no_decay) else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **fast)


@dataclass
class WarmupCosine:
    """Learning-rate multiplier of optimizer step `step` (0-based).

    Linear warmup from 1/warmup to 1 over `warmup` steps, then a cosine from 1 down to
    `min_ratio` at step `total` ("constant" stays at 1 after warmup).
    """

    total: int
    warmup: int = 0
    min_ratio: float = 0.1
    kind: str = "cosine"

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int):
    """A LambdaLR stepping once per optimizer step; its state dict round-trips through checkpoints."""
    factor = WarmupCosine(total=total_steps, warmup=cfg.warmup_steps or 0, min_ratio=cfg.min_lr_ratio, kind=cfg.kind)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def load_scheduler_state(scheduler, state: dict) -> None:
    """Restore the step count of a checkpointed scheduler, keeping this run's schedule.

    LambdaLR's state also holds the schedule's own fields (its total steps); those are reset to
    the current ones, so a run extended to more steps follows the schedule recomputed for the new
    total from the resumed step on. On a plain resume the learning rates are unchanged, bit for bit.
    """
    current = [dict(vars(fn)) for fn in scheduler.lr_lambdas]
    scheduler.load_state_dict(state)
    for fn, fields in zip(scheduler.lr_lambdas, current, strict=True):
        vars(fn).update(fields)
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs
