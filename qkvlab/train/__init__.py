"""Training: run configs, the resumable trainer, checkpoints, sweeps, the report and `reproduce`.

    from qkvlab.train import load_config, train
    summary = train(load_config("qkvlab/configs/example-reverse.yaml", ["variant=Q=K=V+"]))

Modules: `config` (RunConfig from YAML and overrides, resolved once by `resolve_run` into a
`ResolvedRun`), `optim` (AdamW groups, warmup + cosine), `checkpoint` (atomic, verified),
`distributed` (DDP/FSDP under torchrun), `metrics` (JSONL, TensorBoard), `trainer`, `runs`
(run-directory layout), `sweep`, `report`, `reproduce`.
"""

from qkvlab.train.config import ResolvedRun, RunConfig, load_config, resolve_run
from qkvlab.train.trainer import TrainingDiverged, train

__all__ = ["ResolvedRun", "RunConfig", "TrainingDiverged", "load_config", "resolve_run", "train"]
