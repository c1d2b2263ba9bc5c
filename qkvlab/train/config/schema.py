"""A run's configuration as typed, validated, frozen dataclasses, and how two configs compare.

`RunConfig` holds a task, a variant, a seed, a preset, ModelConfig overrides and the sections
`optim` (AdamW), `schedule` (warmup + cosine), `train` (budget, cadence, placement, output) and
`distributed`. Each dataclass validates itself when built. Fields left `null` (steps, batch size,
lr, warmup, eval cadence) are filled from the task's budget by `resolve.resolve_run`.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

from qkvlab.arch import ModelConfig
from qkvlab.errors import QkvlabError, check
from qkvlab.variants import parse_variant

SCHEDULES = ("cosine", "constant")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16")
STRATEGIES = ("ddp", "fsdp")
BACKENDS = ("auto", "gloo", "nccl")
ALL = "all"  # train.eval_batches: evaluate on the whole held-out split


def _positive(name: str, value: int | float | None, allow_none: bool = True, allow_zero: bool = False) -> None:
    if value is None:
        check(allow_none, f"{name} must be set")
        return
    ok = value >= 0 if allow_zero else value > 0
    check(ok, f"{name} must be {'non-negative' if allow_zero else 'positive'}, got {value!r}")


def _one_of(name: str, value: str, accepted: tuple[str, ...]) -> None:
    check(value in accepted, f"{name} {value!r} is not one of {', '.join(accepted)}")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW. Weight decay applies to matrices only (not biases, norms, embeddings)."""

    lr: float | None = None  # peak learning rate; null: the task's budget
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0  # max global gradient norm; null or 0 disables clipping

    def __post_init__(self) -> None:
        _positive("optim.lr", self.lr)
        check(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
              f"optim.betas must be two numbers in [0, 1), got {list(self.betas)}")
        object.__setattr__(self, "betas", tuple(self.betas))
        _positive("optim.eps", self.eps)
        _positive("optim.weight_decay", self.weight_decay, allow_zero=True)
        _positive("optim.grad_clip", self.grad_clip, allow_zero=True)


@dataclass(frozen=True)
class ScheduleConfig:
    """Linear warmup to the peak lr, then cosine decay to `min_lr_ratio` x peak (or constant)."""

    kind: str = "cosine"
    warmup_steps: int | None = None  # null: the task's budget
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        _one_of("schedule.kind", self.kind, SCHEDULES)
        _positive("schedule.warmup_steps", self.warmup_steps, allow_zero=True)
        check(0.0 <= self.min_lr_ratio <= 1.0, f"schedule.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass(frozen=True)
class TrainConfig:
    """Budget, cadence, placement and output of a run. `batch_size` is the global batch per step."""

    steps: int | None = None
    batch_size: int | None = None  # rows per optimizer step, summed over processes and micro-steps
    grad_accum: int = 1  # micro-steps per optimizer step (per process)
    eval_every: int | None = None  # 0: evaluate only at the end
    eval_batches: int | str | None = None  # "all": the whole held-out split; null: the budget's
    eval_batch_size: int | None = None  # null: batch_size
    checkpoint_every: int | None = None  # null: eval_every; 0: only at the end
    keep_checkpoints: int = 2
    log_every: int = 1
    out_dir: str | None = None  # null: runs/<task>/<variant>/seed<k>
    device: str = "auto"
    dtype: str = "auto"  # auto: bfloat16 autocast on CUDA and on CPUs with bfloat16 hardware, else float32
    threads: int | None = None  # torch CPU threads; null: torch's default
    compile: bool = False  # torch.compile the model (in place: checkpoints keep their keys)
    peak_tflops: float | None = None  # per-device peak for the logged MFU; null: a known GPU's, else none
    progress: bool = True
    tensorboard: bool = True  # also log to TensorBoard when it is installed

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_batch_size", "threads"):
            _positive(f"train.{name}", getattr(self, name))
        if isinstance(self.eval_batches, str):
            check(self.eval_batches == ALL, f"train.eval_batches must be a positive integer, {ALL!r} or null, "
                  f"got {self.eval_batches!r}")
        else:
            _positive("train.eval_batches", self.eval_batches)
        for name in ("grad_accum", "keep_checkpoints", "log_every"):
            _positive(f"train.{name}", getattr(self, name), allow_none=False)
        _positive("train.eval_every", self.eval_every, allow_zero=True)
        _positive("train.checkpoint_every", self.checkpoint_every, allow_zero=True)
        _one_of("train.device", self.device, DEVICES)
        _one_of("train.dtype", self.dtype, DTYPES)
        check(isinstance(self.compile, bool), f"train.compile must be true or false, got {self.compile!r}")
        check(self.peak_tflops is None or (isinstance(self.peak_tflops, int | float)
                                           and not isinstance(self.peak_tflops, bool) and self.peak_tflops > 0),
              f"train.peak_tflops must be a positive number (e.g. 312 for an A100) or null, got {self.peak_tflops!r}")


@dataclass(frozen=True)
class DistributedConfig:
    """Used under `torchrun`: DDP replicates the model, FSDP shards it (for models too big for one device)."""

    strategy: str = "ddp"
    backend: str = "auto"  # auto: nccl on CUDA, gloo on CPU
    find_unused_parameters: bool = False

    def __post_init__(self) -> None:
        _one_of("distributed.strategy", self.strategy, STRATEGIES)
        _one_of("distributed.backend", self.backend, BACKENDS)


@dataclass(frozen=True)
class RunConfig:
    """One training run: which task and variant, how the model is built, how it is trained."""

    task: str = ""
    variant: str = "QKV"
    seed: int = 0
    preset: str = "quick"  # the task's model size and budget ("tiny", "quick", "full")
    model_preset: str | None = None  # a qkvlab.models preset replacing the task's model, e.g. "paper-300m"
    init_from: str | None = None  # start from saved weights (export, checkpoint or run dir) and their config
    data_dir: str | None = None
    model: dict = field(default_factory=dict)  # ModelConfig field overrides
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def __post_init__(self) -> None:
        check(isinstance(self.task, str) and self.task.strip() != "", "config needs a task (e.g. task: reverse)")
        object.__setattr__(self, "variant", parse_variant(self.variant).name)
        check(self.seed >= 0, f"seed must be a non-negative integer, got {self.seed}")
        check_model_keys(self.model)
        if "variant" in self.model:
            check(parse_variant(self.model["variant"]).name == self.variant,
                  f"model.variant {self.model['variant']!r} disagrees with variant {self.variant!r}; set only variant")
            object.__setattr__(self, "model", {k: v for k, v in self.model.items() if k != "variant"})

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))


SECTIONS: dict[str, type] = {"optim": OptimConfig, "schedule": ScheduleConfig, "train": TrainConfig,
                             "distributed": DistributedConfig}
MODEL_FIELDS = {f.name: f for f in dataclasses.fields(ModelConfig)}
# Keys that change how a run executes but not what it computes: a run may resume with other values.
RUNTIME_KEYS = frozenset({
    "data_dir", "train.grad_accum", "train.checkpoint_every", "train.keep_checkpoints", "train.log_every",
    "train.out_dir", "train.device", "train.threads", "train.progress", "train.tensorboard", "train.compile",
    "train.peak_tflops", "distributed.strategy", "distributed.backend", "distributed.find_unused_parameters",
})


def _plain(value: Any) -> Any:
    """Tuples to lists, recursively (YAML- and JSON-friendly)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def known_keys() -> list[str]:
    """Every dotted key a run config accepts."""
    keys = [f.name for f in dataclasses.fields(RunConfig) if f.name not in SECTIONS and f.name != "model"]
    for section, cls in SECTIONS.items():
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(cls)]
    keys += [f"model.{name}" for name in MODEL_FIELDS]
    return keys


def unknown_key(key: str) -> QkvlabError:
    """The error for a misspelled dotted key, naming the closest known one."""
    close = difflib.get_close_matches(key, known_keys(), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else "; see docs/training.md for the keys"
    return QkvlabError(f"unknown config key {key!r}{hint}")


def check_model_keys(model: Any) -> None:
    """`model` must map ModelConfig field names (to override them)."""
    check(isinstance(model, dict), f"config key 'model' must be a mapping of ModelConfig fields, got {model!r}")
    for key in model:
        if key not in MODEL_FIELDS:
            raise unknown_key(f"model.{key}")


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1}, "model": {}} -> {"optim.lr": 1} (empty sections vanish)."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def differences(a: RunConfig, b: RunConfig, ignore: frozenset[str] = RUNTIME_KEYS) -> list[str]:
    """Dotted keys whose values differ between two configs, as "key: a -> b"."""
    fa, fb = flatten(a.to_dict()), flatten(b.to_dict())

    def shown(flat: dict, key: str) -> str:
        return repr(flat[key]) if key in flat else "unset"

    return [f"{key}: {shown(fa, key)} -> {shown(fb, key)}"
            for key in sorted(set(fa) | set(fb)) if key not in ignore and fa.get(key) != fb.get(key)]
