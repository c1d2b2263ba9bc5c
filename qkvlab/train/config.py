"""A training run as one YAML file mapped onto typed, validated dataclasses.

    task: reverse            # a registered task, or "package.module:TaskClass"
    variant: Q-K=V
    seed: 0
    preset: quick            # the task's model size and budget preset
    model: {n_layers: 4}     # ModelConfig field overrides
    optim: {lr: 3.0e-4}
    schedule: {warmup_steps: 100}
    train: {steps: 2000, batch_size: 64}

Fields left `null` (steps, batch size, lr, warmup, eval cadence) come from the task's budget
for `preset` when the run starts (`resolve`). Any key can be overridden with a dotted name
(`optim.lr=3e-4`); unknown keys are errors that suggest the closest known key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qkvlab.errors import QkvlabError, check
from qkvlab.models.config import ModelConfig
from qkvlab.models.config import preset as model_preset_config
from qkvlab.atomic import atomic_write_text
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
    dtype: str = "auto"  # auto: bfloat16 autocast on CUDA, float32 on CPU
    threads: int | None = None  # torch CPU threads; null: torch's default
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
        _check_model_keys(self.model)
        if "variant" in self.model:
            check(parse_variant(self.model["variant"]).name == self.variant,
                  f"model.variant {self.model['variant']!r} disagrees with variant {self.variant!r}; set only variant")
            object.__setattr__(self, "model", {k: v for k, v in self.model.items() if k != "variant"})

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))


_SECTIONS: dict[str, type] = {"optim": OptimConfig, "schedule": ScheduleConfig, "train": TrainConfig,
                              "distributed": DistributedConfig}
_MODEL_FIELDS = {f.name: f for f in dataclasses.fields(ModelConfig)}
# Keys that change how a run executes but not what it computes: a run may resume with other values.
RUNTIME_KEYS = frozenset({
    "data_dir", "train.grad_accum", "train.checkpoint_every", "train.keep_checkpoints", "train.log_every",
    "train.out_dir", "train.device", "train.threads", "train.progress", "train.tensorboard",
    "distributed.strategy", "distributed.backend", "distributed.find_unused_parameters",
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
    keys = [f.name for f in dataclasses.fields(RunConfig) if f.name not in _SECTIONS and f.name != "model"]
    for section, cls in _SECTIONS.items():
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(cls)]
    keys += [f"model.{name}" for name in _MODEL_FIELDS]
    return keys


def _unknown(key: str) -> QkvlabError:
    close = difflib.get_close_matches(key, known_keys(), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else "; see docs/training.md for the keys"
    return QkvlabError(f"unknown config key {key!r}{hint}")


def _check_model_keys(model: Any) -> None:
    check(isinstance(model, dict), f"config key 'model' must be a mapping of ModelConfig fields, got {model!r}")
    for key in model:
        if key not in _MODEL_FIELDS:
            raise _unknown(f"model.{key}")


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint))


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """`value` as the type `hint` names (ints, floats from "3e-4", tuples, optionals), or a one-line error."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except QkvlabError as err:
                errors.append(err)
        raise errors[0]
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise QkvlabError(f"config key {key!r} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise QkvlabError(f"config key {key!r} must be a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise QkvlabError(f"config key {key!r} must be true or false, got {value!r}")
    if hint in (int, float):
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = None
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise QkvlabError(f"config key {key!r} must be a number, got {value!r}")
        if not math.isfinite(number):
            raise QkvlabError(f"config key {key!r} must be a finite number, got {value!r}")
        if hint is int:
            if float(number) != int(number):
                raise QkvlabError(f"config key {key!r} must be an integer, got {value!r}")
            return int(number)
        return float(number)
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise QkvlabError(f"config key {key!r} must be a string, got {value!r}")
    raise QkvlabError(f"config key {key!r} has unsupported type {_type_name(hint)}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    """Construct dataclass `cls` from a mapping, coercing every field; unknown keys are errors."""
    label = prefix.rstrip(".") or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise QkvlabError(f"config section {label!r} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            inner = f".{next(iter(value))}" if isinstance(value, dict) and value else ""
            raise _unknown(dotted + inner)
        if cls is RunConfig and key in _SECTIONS:
            kwargs[key] = _build(_SECTIONS[key], value, f"{key}.")
        elif cls is RunConfig and key == "model":
            kwargs[key] = _model_overrides(value)
        else:
            kwargs[key] = _coerce(value, hints[key], dotted)
    return cls(**kwargs)


def _model_overrides(data: Any) -> dict:
    data = {} if data is None else data
    _check_model_keys(data)
    hints = typing.get_type_hints(ModelConfig)
    return {key: _coerce(value, hints[key], f"model.{key}") for key, value in data.items()}


def config_from_dict(data: dict) -> RunConfig:
    """A validated `RunConfig` from a plain mapping (as YAML loads it).

    `model.variant` is another name for `variant`: given alone it sets the variant; given with a
    different `variant` it is an error.
    """
    model = data.get("model") if isinstance(data, dict) else None
    if isinstance(model, dict) and "variant" in model:
        data = {**data, "model": {k: v for k, v in model.items() if k != "variant"}}
        if "variant" in data and data["variant"] is not None:
            check(_variant_name(model["variant"], "model.variant") == _variant_name(data["variant"], "variant"),
                  f"model.variant {model['variant']!r} disagrees with variant {data['variant']!r}; set only variant")
        data["variant"] = model["variant"]
    return _build(RunConfig, data, "")


def _variant_name(value: Any, key: str) -> str:
    check(isinstance(value, str), f"config key {key!r} must be a variant name, got {value!r}")
    return parse_variant(value).name


# Keys that name the same field: an override of one conflicts with an override of the other.
_ALIASES = {"model.variant": "variant"}


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split "optim.lr=3e-4" into (["optim", "lr"], value), the value parsed as YAML.

    An empty value is an error (write `KEY=null` for the default).
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    check(sep == "=" and key != "" and all(key.split(".")),
          f"override {text!r} is not KEY=VALUE with a dotted key (e.g. optim.lr=3e-4)")
    check(raw.strip() != "", f"override {text!r} has no value for {key!r}; write {key}=null for the default")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    if isinstance(value, (dict, list)) and not raw.strip().startswith(("{", "[")):
        value = raw  # e.g. "variant=Q-K=V" style values that YAML would misread
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """A copy of the config mapping `data` with dotted KEY=VALUE overrides applied."""
    data = _deep_copy(data)
    seen: dict[str, str] = {}
    for text in overrides:
        path, value = parse_override(text)
        _check_not_set_twice(".".join(path), text, seen)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise QkvlabError(f"override {text!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def _check_not_set_twice(key: str, text: str, seen: dict[str, str]) -> None:
    """Refuse a second override of one field (directly, through an alias or through its section)."""
    key = _ALIASES.get(key, key)
    for other, earlier in seen.items():
        if key == other or key.startswith(other + ".") or other.startswith(key + "."):
            raise QkvlabError(f"override {text!r} sets {key!r} again (already set by {earlier!r}); give it once")
    seen[key] = text


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    return value


def read_yaml(path: str | Path) -> dict:
    """The mapping in a YAML file (or in a run directory's config.yaml)."""
    path = Path(path)
    if path.is_dir():
        check((path / "config.yaml").is_file(),
              f"{str(path)!r} is a directory but not a run directory (it has no config.yaml)")
        path = path / "config.yaml"
    check(path.is_file(), f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise QkvlabError(f"config file {str(path)!r} cannot be read: {getattr(err, 'strerror', None) or err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise QkvlabError(f"config file {str(path)!r} is not valid YAML{where}") from None
    data = {} if data is None else data
    check(isinstance(data, dict), f"config file {str(path)!r} must hold a mapping of keys, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Read a run config from YAML (or start empty) and apply dotted overrides.

    `path` may be a run directory: its stored config, writing to that directory (continue or
    extend the run) unless an override sets another `train.out_dir`.
    """
    data = read_yaml(path) if path is not None else {}
    if path is not None and Path(path).is_dir():
        train = data.get("train")
        data["train"] = {**(train if isinstance(train, dict) else {}), "out_dir": str(path)}
    return config_from_dict(apply_overrides(data, list(overrides)))


def save_config(cfg: RunConfig, path: str | Path) -> Path:
    return atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


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
    shown = lambda flat, key: repr(flat[key]) if key in flat else "unset"
    return [f"{key}: {shown(fa, key)} -> {shown(fb, key)}"
            for key in sorted(set(fa) | set(fb)) if key not in ignore and fa.get(key) != fb.get(key)]


# --- resolution against a task -------------------------------------------------------

def resolve(cfg: RunConfig, task, note=None) -> RunConfig:
    """Fill every `null` budget field from `task.budget(cfg.preset)` and the default output dir.

    A warmup longer than the run is clamped to the run's steps, told through `note(message)`.
    `train.eval_batches` may stay null (or "all"): the whole held-out split.
    """
    from qkvlab.train.runs import run_dir_for

    needed = (cfg.train.steps, cfg.train.batch_size, cfg.optim.lr, cfg.schedule.warmup_steps,
              cfg.train.eval_every, cfg.train.eval_batches)
    budget = task.budget(cfg.preset) if any(v is None for v in needed) else None

    def pick(value, attr):
        return getattr(budget, attr) if value is None else value

    train = cfg.train
    steps = pick(train.steps, "steps")
    eval_every = pick(train.eval_every, "eval_every")
    train = dataclasses.replace(
        train, steps=steps, batch_size=pick(train.batch_size, "batch_size"), eval_every=eval_every,
        eval_batches=pick(train.eval_batches, "eval_batches"),
        checkpoint_every=eval_every if train.checkpoint_every is None else train.checkpoint_every,
        out_dir=train.out_dir or str(run_dir_for("runs", task.name or cfg.task, cfg.variant, cfg.seed)))
    optim = dataclasses.replace(cfg.optim, lr=pick(cfg.optim.lr, "lr"))
    schedule = dataclasses.replace(cfg.schedule, warmup_steps=pick(cfg.schedule.warmup_steps, "warmup_steps"))
    if schedule.warmup_steps > steps:
        if note is not None:
            note(f"note: schedule.warmup_steps={schedule.warmup_steps} exceeds train.steps={steps}; "
                 f"warming up over all {steps} steps")
        schedule = dataclasses.replace(schedule, warmup_steps=steps)
    return cfg.replace(train=train, optim=optim, schedule=schedule)


def model_config(cfg: RunConfig, task) -> ModelConfig:
    """The run's model: the task's (or `model_preset`'s, or `init_from`'s) config for the variant, with overrides."""
    check(cfg.model_preset is None or cfg.init_from is None, "set model_preset or init_from, not both")
    if cfg.init_from is not None:
        base = saved_model_config(cfg.init_from)
        check(base.variant == cfg.variant, f"init_from {cfg.init_from!r} holds a {base.variant} model but the run's "
              f"variant is {cfg.variant}; set variant={base.variant}")
        wanted = task.model_config(cfg.variant, cfg.preset).kind if task is not None else base.kind
        check(base.kind == wanted, f"init_from {cfg.init_from!r} holds a {base.kind} model but task "
              f"{getattr(task, 'name', cfg.task)!r} trains {wanted} models")
    elif cfg.model_preset is not None:
        base = model_preset_config(cfg.model_preset, variant=cfg.variant)
    else:
        base = task.model_config(cfg.variant, cfg.preset)
        if base.variant != cfg.variant:
            base = base.replace(variant=cfg.variant)
    model = base.replace(**cfg.model) if cfg.model else base
    if model.kind == "decoder" and task is not None and hasattr(task, "context"):
        task.context = model.max_seq_len  # language-model tasks read windows as long as the model's context
    return model


def saved_model_config(path: str | Path) -> ModelConfig:
    """The ModelConfig stored with saved weights (an export, checkpoint or run directory, or the file)."""
    import json

    from safetensors import SafetensorError, safe_open

    from qkvlab.models.io import CONFIG_KEY, weights_file

    file = weights_file(path)
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise QkvlabError(f"cannot read {str(file)!r}: {err}") from None
    check(CONFIG_KEY in meta, f"{str(file)!r} has no qkvlab model config in its metadata")
    return ModelConfig(**json.loads(meta[CONFIG_KEY]))


def packaged_configs() -> dict[str, Path]:
    """The configs shipped in `qkvlab/configs/`, by name (file stem)."""
    root = Path(__file__).resolve().parent.parent / "configs"
    return {p.stem: p for p in sorted(root.glob("*.yaml"))}


def find_config(name: str) -> Path:
    """A config file path, a run directory, or the name of a packaged config ("lm-300m")."""
    path = Path(name)
    if path.is_file() or path.is_dir():
        return path
    shipped = packaged_configs()
    if name in shipped:
        return shipped[name]
    close = difflib.get_close_matches(path.stem, list(shipped), n=1)
    hint = f"; did you mean the packaged config {close[0]!r}?" if close else \
        f"; packaged configs: {', '.join(shipped) or 'none'}"
    if path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        raise QkvlabError(f"config file {name!r} does not exist")
    raise QkvlabError(f"config {name!r} is neither a file nor a packaged config{hint}")
