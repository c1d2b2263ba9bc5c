"""The training loop: one optimizer step per global batch, resumable to the exact same result.

Determinism: the batch of a step is a pure function of (seed, step) and the global RNG is
re-seeded from (seed, step, rank) before every step, so dropout never depends on history.
Together with the optimizer and scheduler state in the checkpoint this makes a resumed run
equal to an uninterrupted one (bit for bit on CPU).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import shutil
import sys
import time
from importlib import metadata
from typing import cast

import numpy as np
import torch
from tqdm import tqdm

from qkvlab.errors import QkvlabError, check
from qkvlab.train import checkpoint as ckpt
from qkvlab.train.config import ResolvedRun, RunConfig, differences, load_config, resolve_run, save_config
from qkvlab.train.distributed import (
    DistEnv,
    all_reduce_mean,
    barrier,
    broadcast_object,
    full_state_dicts,
    gradient_sync,
    init_distributed,
    load_full_state_dicts,
    micro_batches,
    optimizer_format,
    shard_batch,
    shutdown,
    unwrap,
    wrap_model,
)
from qkvlab.train.lock import DirLock
from qkvlab.train.metrics import MetricsLogger
from qkvlab.train.optim import build_optimizer, build_scheduler, load_scheduler_state
from qkvlab.train.runs import CONFIG, FINISHED, METRICS, SUMMARY, read_summary, storing, write_summary
from qkvlab.train.throughput import count_flops, peak_flops
from qkvlab.train.throughput import rates as flop_rates

try:
    VERSION = metadata.version("qkvlab")
except metadata.PackageNotFoundError:
    VERSION = "0+unknown"


class TrainingDiverged(QkvlabError):
    """The loss (or gradient norm) became NaN or infinite; the last good checkpoint is kept."""


def step_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of one step on one rank (dropout masks), independent of what ran before."""
    digest = hashlib.blake2b(f"{seed}:{step}:{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _filled(value: int | None, key: str) -> int:
    """A budget field of a resolved run (`resolve_run` fills every one the trainer reads)."""
    if value is None:
        raise QkvlabError(f"{key} is unset: the run was not resolved (qkvlab.train.config.resolve_run)")
    return value


def _rng_state() -> dict:
    # the legacy state is a tuple (the typing also allows the dict form, legacy=False)
    bit_gen, key, pos, has_gauss, cached = cast(tuple, np.random.get_state(legacy=True))
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [bit_gen, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, cached]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    bit_gen, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((bit_gen, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _tokens_per_row(batch: dict) -> int | None:
    """Sequence length of the batch's first 2-D integer tensor (token ids), if it has one."""
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.ndim == 2 and not value.is_floating_point():
            return int(value.shape[1])
    return None


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX tiles), where PyTorch's bfloat16
    matrix products run 2-3x the float32 ones (docs/PERFORMANCE.md); elsewhere bfloat16 is emulated."""
    probes = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(probe is not None and bool(probe()) for probe in probes)


def _autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """bfloat16 for autocast, or None for plain float32. "auto": bfloat16 on CUDA devices that support it and on
    CPUs that multiply it in hardware, float32 elsewhere."""
    if name == "bfloat16":
        return torch.bfloat16
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device.type == "cpu" and cpu_has_native_bf16():
            return torch.bfloat16
    return None


def precision_name(amp_dtype: torch.dtype | None) -> str:
    """What a run computed in: "bfloat16" (autocast: bfloat16 matrix products, float32 weights) or "float32"."""
    return "float32" if amp_dtype is None else str(amp_dtype).removeprefix("torch.")


class Trainer:
    """Trains one resolved run (`fit`), resuming from its latest checkpoint when one exists."""

    def __init__(self, run: ResolvedRun, env: DistEnv | None = None, restart: bool = False):
        self.env = env or DistEnv()
        self.cfg, self.model_cfg, self.task = run.config, run.model, run.task
        if self.cfg.train.threads:
            torch.set_num_threads(self.cfg.train.threads)
        for note in run.notes:
            self._say(note)
        t = self.cfg.train
        self.steps, self.batch_size = _filled(t.steps, "train.steps"), _filled(t.batch_size, "train.batch_size")
        self.eval_every = _filled(t.eval_every, "train.eval_every")
        self.checkpoint_every = _filled(t.checkpoint_every, "train.checkpoint_every")
        world = self.env.world_size
        check(self.batch_size % (world * t.grad_accum) == 0,
              f"train.batch_size={t.batch_size} must be divisible by processes x train.grad_accum "
              f"= {world} x {t.grad_accum}")
        self.run_dir = run.run_dir
        self.restart = restart
        self.amp_dtype = _autocast_dtype(t.dtype, self.env.device)

    # --- run directory -------------------------------------------------------------
    def _lock(self) -> DirLock | None:
        """Own the run directory (rank 0 locks; every rank raises the same error when it is taken)."""
        lock, error = None, None
        if self.env.is_main:
            try:
                lock = DirLock(self.run_dir).acquire()
            except QkvlabError as err:
                error = str(err)
        error = broadcast_object(error, self.env)
        if error is not None:
            raise QkvlabError(error)
        return lock

    def _extension(self, stored: RunConfig, diffs: list[str]) -> bool:
        """Whether the stored run may continue under this config: only `train.steps` differs, and not below
        its newest checkpoint. Anything else is refused with a one-line error."""
        if any(not d.startswith("train.steps:") for d in diffs):
            more = f" and {len(diffs) - 1} more" if len(diffs) > 1 else ""
            raise QkvlabError(f"{str(self.run_dir)!r} holds a run with another config ({diffs[0]}{more}); "
                              "resume it unchanged, set another train.out_dir, or restart it (--restart)")
        latest = ckpt.list_checkpoints(self.run_dir)
        reached = latest[-1][0] if latest else 0
        summary = read_summary(self.run_dir) or {}
        check(summary.get("status") != "diverged",
              f"{str(self.run_dir)!r} holds a run that diverged; it cannot be extended (restart it with --restart)")
        check(self.steps >= reached,
              f"train.steps={self.cfg.train.steps} is below step {reached} that {str(self.run_dir)!r} has reached; "
              "a run cannot be shortened (set another train.out_dir, or --restart)")
        self._say(f"continuing {self.run_dir} from step {reached} with train.steps {stored.train.steps} -> "
                  f"{self.cfg.train.steps} (the learning-rate schedule is recomputed for the new total)")
        return True

    def _prepare_run_dir(self) -> dict | None:
        """Check the directory against the config; the finished run's summary if there is nothing to do."""
        config_path = self.run_dir / CONFIG
        if self.restart:
            if self.env.is_main:
                for name in ("checkpoints", "tensorboard"):
                    shutil.rmtree(self.run_dir / name, ignore_errors=True)
                for name in (METRICS, SUMMARY, CONFIG):
                    (self.run_dir / name).unlink(missing_ok=True)
            barrier(self.env)
        elif config_path.is_file():
            stored = load_config(config_path)
            diffs = differences(stored, self.cfg)
            if not (diffs and self._extension(stored, diffs)):
                summary = read_summary(self.run_dir)
                if summary is not None and summary.get("status") in FINISHED:
                    return summary
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with storing(f"the run config {str(config_path)!r}", "the run directory is unchanged"):
                (self.run_dir / SUMMARY).unlink(missing_ok=True)
                save_config(self.cfg, config_path)
        barrier(self.env)
        return None

    # --- the run -------------------------------------------------------------------
    def fit(self) -> dict:
        """Train to `train.steps` (or return the summary of a run that already finished).

        The run directory is locked for the whole call: a second process on it gets an error.
        """
        lock = self._lock()
        try:
            finished = self._prepare_run_dir()
            if finished is not None:
                return finished
            self._session_start = time.perf_counter()
            self._session_cpu = time.process_time()
            if self.cfg.train.dtype == "auto" and self.amp_dtype is not None and self.env.device.type == "cpu":
                self._say("training in bfloat16 autocast: this CPU multiplies bfloat16 in hardware "
                          "(train.dtype=auto; train.dtype=float32 to train in float32)")
            self._build()
            self.logger = MetricsLogger(self.run_dir / METRICS, enabled=self.env.is_main,
                                        tensorboard=self.cfg.train.tensorboard)
            try:
                self._resume()
                self._loop()
                return self._finish()
            finally:
                self.logger.close()
        finally:
            if lock is not None:
                lock.release()

    def _build(self) -> None:
        torch.manual_seed(self.cfg.seed)
        from qkvlab.models import build_model

        builder = getattr(self.task, "build_model", None) or build_model
        model = builder(self.model_cfg)
        if self.cfg.init_from is not None:
            from qkvlab.models.io import load_model

            model.load_state_dict(load_model(self.cfg.init_from).state_dict())
        from qkvlab.data.tokenizer import tokenizer_metadata
        from qkvlab.models.tokenizer import run_tokenizer

        self.tokenizer_meta, self.tokenizer_files = tokenizer_metadata(run_tokenizer(self.task, self.cfg.init_from))
        model = model.to(self.env.device)
        self.n_params = sum(p.numel() for p in model.parameters())
        self.step_flops = self._count_step_flops(model)
        self.peak_flops = peak_flops(self.env.device, self.cfg.train.peak_tflops)
        if self.cfg.train.compile:
            model.compile()  # in place: the state dict keeps its keys
        self.model = wrap_model(model, self.env, self.cfg.distributed)
        self.optimizer = build_optimizer(self.model, self.cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, self.cfg.schedule, self.steps)
        self.step = 0
        self.prior_elapsed = 0.0
        self.prior_cpu = 0.0
        self.last_eval: dict = {}
        self.last_loss = float("nan")
        self.precision = precision_name(self.amp_dtype)  # "float32 then bfloat16" after a resume elsewhere

    def _resume(self) -> None:
        latest = ckpt.latest_checkpoint(self.run_dir)
        if latest is None:
            self.logger.truncate_after(0)
            return
        weights, state = ckpt.load_checkpoint(latest)
        saved, needed = state.get("optimizer_format", "plain"), optimizer_format(self.env)
        check(saved == needed, f"checkpoint {str(latest)!r} holds {saved} optimizer state, this run needs {needed}: "
              f"resume with distributed.strategy={'fsdp' if saved == 'fsdp' else 'ddp'} "
              f"(or single-process for ddp checkpoints)")
        load_full_state_dicts(self.model, self.optimizer, weights, state["optimizer"], self.env)
        load_scheduler_state(self.scheduler, state["scheduler"])
        _set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.prior_elapsed = float(state.get("elapsed_s", 0.0))
        self.prior_cpu = float(state.get("cpu_s", 0.0))
        self.last_eval = dict(state.get("last_eval", {}))
        self.last_loss = float(state.get("last_loss", float("nan")))
        before, now = state.get("precision", self.precision), self.precision
        if before.split(" then ")[-1] != now:  # train.dtype=auto resolved differently on another machine
            self._say(f"note: steps up to {self.step} ran in {before}, the rest runs in {now} "
                      "(set train.dtype to keep one precision)")
            self.precision = f"{before} then {now}"
        self.logger.truncate_after(self.step)
        if self.env.is_main:
            ckpt.prune_checkpoints(self.run_dir, self.cfg.train.keep_checkpoints)
        self._say(f"resumed {self.run_dir} at step {self.step}")

    def _count_step_flops(self, model: torch.nn.Module) -> int:
        """FLOPs one process spends on an optimizer step (forward + backward of its micro-batches), counted
        on a throwaway pass of the first step's batch before training (gradients cleared after; the
        step's own RNG is re-seeded when it runs, so training is unchanged)."""
        t, env = self.cfg.train, self.env
        batch = self.task.train_batch(0, self.batch_size, self.cfg.seed)  # every step has these shapes
        parts = micro_batches(shard_batch(batch, env.rank, env.world_size), t.grad_accum)

        def one_micro_step() -> None:
            with self._autocast():
                loss = self.task.loss(model, _to_device(parts[0], env.device))
            loss.backward()

        flops = count_flops(one_micro_step)
        model.zero_grad(set_to_none=True)
        return flops * len(parts)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.amp_dtype)

    def _say(self, message: str) -> None:
        if self.env.is_main:
            if getattr(self, "_bar", None) is not None and not self._bar.disable:
                self._bar.write(message)
            else:
                print(message, flush=True)

    def _train_step(self, step: int) -> tuple[float, float, dict]:
        """Forward/backward over the micro-batches of `step`; returns (mean loss, grad norm, batch)."""
        t, env = self.cfg.train, self.env
        torch.manual_seed(step_seed(self.cfg.seed, step, env.rank))
        batch = self.task.train_batch(step, self.batch_size, self.cfg.seed)
        parts = micro_batches(shard_batch(batch, env.rank, env.world_size), t.grad_accum)
        total = torch.zeros((), device=env.device)
        for i, part in enumerate(parts):
            with gradient_sync(self.model, i == len(parts) - 1):
                with self._autocast():
                    loss = self.task.loss(self.model, _to_device(part, env.device))
                check(loss.ndim == 0, f"task {self.task.name!r} returned a loss of shape {tuple(loss.shape)}, "
                      "not a scalar")
                (loss / len(parts)).backward()
            total += loss.detach().float()
        mean_loss = all_reduce_mean(total / len(parts), env).item()
        clip = self.cfg.optim.grad_clip or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        return mean_loss, float(norm), batch

    def _loop(self) -> None:
        t = self.cfg.train
        steps = self.steps
        self._bar = tqdm(total=steps, initial=self.step, unit="step", dynamic_ncols=True, file=sys.stderr,
                         desc=f"{self.task.name} {self.cfg.variant} s{self.cfg.seed}",
                         disable=not (self.env.is_main and t.progress))
        self.model.train()
        try:
            while self.step < steps:
                started = time.perf_counter()
                lr = self.scheduler.get_last_lr()[0]
                loss, grad_norm, batch = self._train_step(self.step)
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    self._diverged(loss, grad_norm, lr)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                self.last_loss = loss
                self._log_train(loss, grad_norm, lr, batch, time.perf_counter() - started)
                if self._due(self.eval_every):
                    self._evaluate()
                if self._due(self.checkpoint_every):
                    self._checkpoint()
                self._bar.update(1)
        finally:
            self._bar.close()

    def _due(self, every: int) -> bool:
        return self.step == self.cfg.train.steps or (every > 0 and self.step % every == 0)

    def _log_train(self, loss: float, grad_norm: float, lr: float, batch: dict, seconds: float) -> None:
        rows = self.batch_size
        rates = {"samples_per_s": rows / max(seconds, 1e-9)}
        seq = _tokens_per_row(batch)
        if seq is not None:
            rates["tokens_per_s"] = rows * seq / max(seconds, 1e-9)
        rates.update(flop_rates(self.step_flops, seconds, self.peak_flops))
        if self.step % self.cfg.train.log_every == 0 or self.step == self.cfg.train.steps:
            self.logger.log("train", self.step, loss=loss, lr=lr, grad_norm=grad_norm, **rates)
        postfix = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}"}
        postfix.update({k.replace("_per_s", "/s"): f"{v:,.0f}" for k, v in rates.items()
                        if k in ("samples_per_s", "tokens_per_s")})
        if "tflops_per_s" in rates:
            postfix["TFLOP/s"] = f"{rates['tflops_per_s']:.3g}"
        if "mfu" in rates:
            postfix["mfu"] = f"{rates['mfu']:.1%}"
        self._bar.set_postfix(postfix, refresh=False)

    def _evaluate(self) -> None:
        env = self.env
        model = self.model if env.sharded else unwrap(self.model)
        metrics = None
        if env.sharded or env.is_main:
            bs = self.cfg.train.eval_batch_size or self.batch_size
            model.eval()
            with torch.no_grad(), self._autocast():
                batches = self.cfg.train.eval_batches
                metrics = self.task.evaluate(model, bs, None if isinstance(batches, str) else batches)  # str: "all"
            model.train()
            metrics = {k: float(v) for k, v in metrics.items()}
        metrics = broadcast_object(metrics, env)
        self.last_eval = {"step": self.step, **metrics}
        self.logger.log("eval", self.step, **metrics)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        self._say(f"step {self.step}/{self.cfg.train.steps}: {shown}")

    def _elapsed(self) -> float:
        return self.prior_elapsed + time.perf_counter() - self._session_start

    def _cpu(self) -> float:
        """CPU seconds of this process (all its threads) since the run began, over sessions."""
        return self.prior_cpu + time.process_time() - self._session_cpu

    def _checkpoint(self) -> None:
        model_state, optim_state = full_state_dicts(self.model, self.optimizer, self.env)
        if self.env.is_main:
            state = {"step": self.step, "optimizer": optim_state, "scheduler": self.scheduler.state_dict(),
                     "rng": _rng_state(), "config": self.cfg.to_dict(), "model_config": self.model_cfg.to_dict(),
                     "version": VERSION, "elapsed_s": self._elapsed(), "cpu_s": self._cpu(),
                     "last_eval": self.last_eval, "last_loss": self.last_loss, "world_size": self.env.world_size,
                     "optimizer_format": optimizer_format(self.env), "precision": self.precision}
            meta = {"qkvlab.model_config": json.dumps(self.model_cfg.to_dict()), "qkvlab.step": str(self.step),
                    "qkvlab.version": VERSION, **self.tokenizer_meta}
            path, previous = ckpt.checkpoint_path(self.run_dir, self.step), ckpt.latest_checkpoint(self.run_dir)
            kept = (f"the previous checkpoint {str(previous)!r} is intact; free some space and rerun to resume from it"
                    if previous is not None else "no checkpoint was written yet; free some space and rerun")
            with storing(f"checkpoint {str(path)!r}", kept):
                ckpt.save_checkpoint(path, model_state, state, meta, self.tokenizer_files)
            ckpt.prune_checkpoints(self.run_dir, self.cfg.train.keep_checkpoints)
        barrier(self.env)

    def _summary(self, status: str) -> dict:
        spec = self.model_cfg.spec
        fraction = spec.cache_fraction(self.model_cfg.n_heads)
        latest = ckpt.latest_checkpoint(self.run_dir)
        return {
            "status": status, "task": self.task.name, "family": self.task.family, "variant": self.cfg.variant,
            "seed": self.cfg.seed, "preset": self.cfg.preset, "metric": self.task.metric,
            "higher_is_better": self.task.higher_is_better, "final": self.last_eval, "train_loss": self.last_loss,
            "step": self.step, "steps": self.cfg.train.steps, "params": self.n_params,
            "n_heads": self.model_cfg.n_heads, "n_kv_heads": self.model_cfg.n_kv_heads,
            "cache_fraction": fraction, "cache_reduction": 1.0 - fraction, "wall_time_s": round(self._elapsed(), 3),
            "cpu_time_s": round(self._cpu(), 3), "step_flops": self.step_flops,
            "world_size": self.env.world_size, "precision": self.precision,
            "checkpoint": str(latest.relative_to(self.run_dir)) if latest is not None else None,
            "version": VERSION,
        }

    def _diverged(self, loss: float, grad_norm: float, lr: float) -> None:
        step = self.step + 1
        latest = ckpt.latest_checkpoint(self.run_dir)
        kept = str(latest) if latest is not None else "none (no checkpoint was written yet)"
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
        message = (f"training diverged: {what} at step {step} of {self.task.name} {self.cfg.variant} seed "
                   f"{self.cfg.seed} (lr {lr:.3g}); the last good checkpoint is {kept}; lower optim.lr or raise "
                   "schedule.warmup_steps")
        self.logger.log("train", step, loss=loss, grad_norm=grad_norm, lr=lr)
        if self.env.is_main:
            with storing(f"the summary of {str(self.run_dir)!r}", f"the run diverged ({message})"):
                write_summary(self.run_dir, {**self._summary("diverged"), "error": message})
        raise TrainingDiverged(message)

    def _finish(self) -> dict:
        if self.last_eval.get("step") != self.step:
            self._evaluate()
        if ckpt.latest_checkpoint(self.run_dir) != ckpt.checkpoint_path(self.run_dir, self.step):
            self._checkpoint()
        summary = self._summary("done")
        if self.env.is_main:
            with storing(f"the summary of {str(self.run_dir)!r}",
                         "the final checkpoint is saved; free some space and rerun to write the summary"):
                write_summary(self.run_dir, summary)
        barrier(self.env)
        return summary


def train(run: RunConfig | ResolvedRun, task=None, restart: bool = False) -> dict:
    """Train (or resume, or skip when finished) a run; returns its summary.

    A `RunConfig` is resolved first, against `task` (default: the task it names). Under
    `torchrun` this joins the process group, trains data-parallel and leaves it again.
    """
    if not isinstance(run, ResolvedRun):
        run = resolve_run(run, task)
    env = init_distributed(run.config.distributed, run.config.train.device)
    try:
        trainer = Trainer(run, env, restart=restart)
        return {**trainer.fit(), "run_dir": str(trainer.run_dir)}
    finally:
        shutdown(env)
