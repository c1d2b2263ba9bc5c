"""A training run as one YAML file, resolved once against its task.

    task: reverse            # a registered task, or "package.module:TaskClass"
    variant: Q-K=V
    seed: 0
    preset: quick            # the task's model size and budget preset
    model: {n_layers: 4}     # ModelConfig field overrides
    optim: {lr: 3.0e-4}
    schedule: {warmup_steps: 100}
    train: {steps: 2000, batch_size: 64}

Modules: `schema` (the frozen dataclasses, their validation, comparing two configs),
`overrides` (mappings and dotted `KEY=VALUE` overrides to a `RunConfig`), `files` (YAML files,
packaged configs, run directories), `resolve` (a `RunConfig` and its task to a `ResolvedRun`:
budget filled in, model chosen, task set up).
"""

from qkvlab.train.config.files import find_config, load_config, packaged_configs, read_yaml, save_config
from qkvlab.train.config.overrides import apply_overrides, config_from_dict, parse_override
from qkvlab.train.config.resolve import ResolvedRun, resolve_run
from qkvlab.train.config.schema import (
                                        ALL,
                                        RUNTIME_KEYS,
                                        DistributedConfig,
                                        OptimConfig,
                                        RunConfig,
                                        ScheduleConfig,
                                        TrainConfig,
                                        differences,
                                        flatten,
                                        known_keys,
)

__all__ = ["ALL", "RUNTIME_KEYS", "DistributedConfig", "OptimConfig", "ResolvedRun", "RunConfig", "ScheduleConfig",
           "TrainConfig", "apply_overrides", "config_from_dict", "differences", "find_config", "flatten",
           "known_keys", "load_config", "packaged_configs", "parse_override", "read_yaml", "resolve_run",
           "save_config"]
