"""Data parallelism under `torchrun`: process group, DDP/FSDP wrapping, batch sharding, state dicts.

Run without `torchrun` everything here degrades to a single process, so one code path serves both.
Every rank builds the global batch of a step and keeps rows ``rank::world_size``; gradients are
averaged over ranks, so N processes follow a single process on the same global batch.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from qkvlab.errors import QkvlabError, check
from qkvlab.train.config import DistributedConfig

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job: rank, world size and device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    strategy: str = "ddp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def sharded(self) -> bool:
        return self.enabled and self.strategy == "fsdp"


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """"auto" picks CUDA (this process's local GPU) when available, else the CPU."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    check(torch.cuda.is_available(), "train.device is 'cuda' but no CUDA device is available; use auto or cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed(cfg: DistributedConfig, device: str = "auto") -> DistEnv:
    """Join the `torchrun` process group when WORLD_SIZE > 1; otherwise a single-process env."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv(device=resolve_device(device), strategy=cfg.strategy)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if dev.type == "cuda" else "gloo")
    if backend == "nccl" and dev.type != "cuda":
        raise QkvlabError("distributed.backend 'nccl' needs CUDA devices; use gloo on CPU")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev, strategy=cfg.strategy)


def shutdown(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()


def _shard_blocks(model: nn.Module) -> None:
    """FSDP2: shard each block of every ModuleList (the transformer layers), then the root."""
    from torch.distributed.fsdp import fully_shard

    for module in list(model.modules()):
        if isinstance(module, nn.ModuleList):
            for block in module:
                fully_shard(block)
    fully_shard(model)


def wrap_model(model: nn.Module, env: DistEnv, cfg: DistributedConfig) -> nn.Module:
    """DDP or FSDP around `model` (already on `env.device`) in a distributed job; `model` itself otherwise."""
    if not env.enabled:
        return model
    if cfg.strategy == "fsdp":
        _shard_blocks(model)
        return model
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=cfg.find_unused_parameters)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce inside this block when `enabled` is False (non-final micro-steps)."""
    set_sync = getattr(model, "set_requires_gradient_sync", None)  # FSDP2
    if isinstance(model, DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
    elif set_sync is not None:
        set_sync(enabled)
        try:
            yield
        finally:
            set_sync(True)
    else:
        yield


def all_reduce_mean(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The mean of `value` over ranks (a copy; `value` itself when single-process)."""
    if not env.enabled:
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / env.world_size


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def broadcast_object(obj, env: DistEnv):
    """Rank 0's `obj` on every rank."""
    if not env.enabled:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _rows(batch: Batch) -> int:
    sizes = {v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.ndim > 0}
    if len(sizes) != 1:
        raise QkvlabError(f"a task batch must hold tensors with one leading batch size, got sizes {sorted(sizes)}")
    return sizes.pop()


def shard_batch(batch: Batch, rank: int, world_size: int) -> Batch:
    """Rows ``rank::world_size`` of every batch tensor (scalars and non-tensors are shared)."""
    if world_size == 1:
        return batch
    _rows(batch)
    return {k: v[rank::world_size] if isinstance(v, torch.Tensor) and v.ndim > 0 else v for k, v in batch.items()}


def micro_batches(batch: Batch, n: int) -> list[Batch]:
    """`batch` split into `n` contiguous, equal micro-batches."""
    if n == 1:
        return [batch]
    rows = _rows(batch)
    check(rows % n == 0, f"a batch of {rows} rows does not split into train.grad_accum={n} equal micro-batches")
    size = rows // n
    return [{k: v[i * size:(i + 1) * size] if isinstance(v, torch.Tensor) and v.ndim > 0 else v
             for k, v in batch.items()} for i in range(n)]


def optimizer_format(env: DistEnv) -> str:
    """How optimizer state is keyed in checkpoints: "plain" (parameter indices) or "fsdp" (full, by name)."""
    return "fsdp" if env.sharded else "plain"


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv) -> tuple[dict, dict]:
    """Unsharded (model, optimizer) state dicts; call on every rank (FSDP gathers the shards)."""
    if not env.sharded:
        return unwrap(model).state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


def load_full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                          optim_state: dict, env: DistEnv) -> None:
    """Load what `full_state_dicts` returned into a (wrapped) model and its optimizer; call on every rank."""
    if not env.sharded:
        unwrap(model).load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=opts)
    set_optimizer_state_dict(model, optimizer, optim_state, options=opts)
