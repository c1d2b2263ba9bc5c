"""The `paper` reproduce preset: the study's 300M and 1.2B language-model runs, on GPUs under torchrun.

Which runs: the variants PAPER.md reports results for ("Headline results"), each at the scale it
was reported at:

- 300M (`lm-300m`): QKV, Q=K-V, Q-K=V, Q=K=V (the validation-perplexity figures) and GQA-4,
  Q-GQA-4, Q-MQA (the head-sharing figures);
- 1.2B (`lm-1.2b`): QKV, Q-K=V (the +2.48 % perplexity figure), GQA-8, Q-GQA-8, Q-MQA (the 5-shot
  accuracy table).

Left out, because PAPER.md gives no result for them at these scales: Q=X, MQA, the "+" variants
(non-causal tasks only) and the context-length comparison (512 to 2048 tokens). One seed by
default. Each run is the packaged config with `variant`, `seed`, `data_dir`, `train.out_dir` and
`train.grad_accum` set: grad_accum keeps the config's global batch (300M: 256 sequences, 1.2B:
512) and its per-GPU micro-batch (8 and 4, written for 8 GPUs) on any GPU count that divides the
batch.

Cost, from `qkvlab.cost`: training FLOPs = 2 x 3 x forward MACs of one sequence
(`macs(model, seq_len=context)`: every matrix product, attention over the full T x T) x steps x
batch; GPU-hours = FLOPs / (the GPU's dense bf16 peak x MFU) / 3600. Evaluation is not counted
(about 0.2 % more at the packaged cadence). Peak memory per GPU is a rough estimate: 16 bytes per
parameter (fp32 weights and gradients, AdamW's two moments; divided by the GPUs under FSDP), plus
activations of one micro-batch, 34 x T x d_model bytes per sequence and layer (Korthikanti et
al. 2022, bf16, no T x T score matrix with fused attention), plus 8 bytes per logit.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from qkvlab.arch import divisors
from qkvlab.cost import macs, param_counts
from qkvlab.errors import QkvlabError, check
from qkvlab.train.config import ResolvedRun, find_config, load_config, resolve_run
from qkvlab.train.runs import run_dir_for
from qkvlab.train.throughput import GPUS, Gpu
from qkvlab.variants import parse_variant

DATA_PLACEHOLDER = "DIR"  # shown in a dry run's commands when no --data-dir is given
PAPER_GPUS = 8  # the GPU count the packaged configs' grad_accum is written for
DEFAULT_MFU = 0.40
STATE_BYTES_PER_PARAM = 16  # fp32 weights, fp32 gradients, AdamW m and v
ACTIVATION_BYTES = 34  # per sequence, layer, position and model dimension (bf16, fused attention)
LOGIT_BYTES = 8  # bf16 logits, their fp32 softmax and its gradient, roughly
# Keys each run's command sets itself.
PLAN_KEYS = ("variant", "seed", "data_dir", "train.out_dir", "train.grad_accum")


def get_gpu(name: str) -> Gpu:
    key = name.strip().lower()
    if key not in GPUS:
        raise QkvlabError(f"unknown --gpu {name!r}; accepted: {', '.join(GPUS)} (or give --peak-tflops)")
    return GPUS[key]


@dataclass(frozen=True)
class Throughput:
    """The sustained rate a GPU-hour estimate assumes: a GPU's peak times the model FLOPs utilisation."""

    gpu: Gpu
    mfu: float = DEFAULT_MFU
    peak_tflops: float | None = None  # None: the GPU's

    def __post_init__(self) -> None:
        check(0.0 < self.mfu <= 1.0, f"--mfu {self.mfu} is not in (0, 1]; e.g. 0.4")
        check(self.peak_tflops is None or self.peak_tflops > 0,
              f"--peak-tflops {self.peak_tflops} is not positive; e.g. 312 for an A100")

    @property
    def peak(self) -> float:
        """Peak TFLOP/s assumed."""
        return self.gpu.peak_tflops if self.peak_tflops is None else self.peak_tflops

    @property
    def flops_per_s(self) -> float:
        return self.peak * 1e12 * self.mfu

    def describe(self) -> str:
        custom = "" if self.peak_tflops is None else " (--peak-tflops)"
        return (f"{self.gpu.label}, dense bf16 peak {self.peak:g} TFLOP/s{custom} x MFU {self.mfu:g} "
                f"= {self.peak * self.mfu:g} TFLOP/s sustained per GPU")


@dataclass(frozen=True)
class Scale:
    """One model size of the study: its packaged config and the variants the paper reports at it."""

    name: str
    config: str
    variants: tuple[str, ...]


SCALES: dict[str, Scale] = {
    "300m": Scale("300m", "lm-300m", ("QKV", "Q=K-V", "Q-K=V", "Q=K=V", "GQA-4", "Q-GQA-4", "Q-MQA")),
    "1.2b": Scale("1.2b", "lm-1.2b", ("QKV", "Q-K=V", "GQA-8", "Q-GQA-8", "Q-MQA")),
}


def grad_accum_for(batch_size: int, micro_batch: int, gpus: int, config: str = "") -> int:
    """Micro-steps per optimizer step that keep `batch_size` sequences per step on `gpus` GPUs,
    each doing at most `micro_batch` sequences per micro-step. Refuses GPU counts not dividing the batch."""
    check(isinstance(gpus, int) and gpus >= 1, f"--gpus must be at least 1, got {gpus}")
    where = f" ({config})" if config else ""
    check(batch_size % gpus == 0, f"--gpus {gpus} does not divide the global batch of {batch_size} sequences"
                                  f"{where}; accepted: {divisors(batch_size)}")
    per_gpu = batch_size // gpus
    accum = -(-per_gpu // micro_batch)
    while per_gpu % accum:  # the micro-batches must be equal
        accum += 1
    return accum


@dataclass(frozen=True)
class PaperRun:
    """One planned run: its resolved config, how it is launched and what it costs."""

    config_name: str  # the packaged config ("lm-300m")
    resolved: ResolvedRun
    gpus: int
    overrides: tuple[str, ...]  # KEY=VALUE given to `qkvlab train` after the config name
    params: int
    forward_macs: int  # one sequence of `context` tokens

    @property
    def variant(self) -> str:
        return self.resolved.config.variant

    @property
    def seed(self) -> int:
        return self.resolved.config.seed

    @property
    def steps(self) -> int:
        steps = self.resolved.config.train.steps
        assert steps is not None  # resolved
        return steps

    @property
    def batch_size(self) -> int:
        batch = self.resolved.config.train.batch_size
        assert batch is not None  # resolved
        return batch

    @property
    def context(self) -> int:
        return self.resolved.model.max_seq_len

    @property
    def micro_batch(self) -> int:
        """Sequences per GPU per micro-step."""
        return self.batch_size // (self.gpus * self.resolved.config.train.grad_accum)

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_size * self.context

    @property
    def flops(self) -> int:
        """Training FLOPs: forward and backward (3 x forward), 2 FLOPs per MAC, every sequence of every step."""
        return 2 * 3 * self.forward_macs * self.steps * self.batch_size

    def gpu_hours(self, throughput: Throughput) -> float:
        return self.flops / throughput.flops_per_s / 3600

    def wall_hours(self, throughput: Throughput) -> float:
        return self.gpu_hours(throughput) / self.gpus

    @property
    def memory_bytes(self) -> int:
        """Rough peak memory per GPU (see the module docstring)."""
        model, cfg = self.resolved.model, self.resolved.config
        state = STATE_BYTES_PER_PARAM * self.params
        if cfg.distributed.strategy == "fsdp" and self.gpus > 1:
            state //= self.gpus
        rows = self.micro_batch * self.context
        activations = ACTIVATION_BYTES * rows * model.d_model * model.n_layers
        return state + activations + LOGIT_BYTES * rows * model.vocab_size

    def command(self) -> list[str]:
        """The launch command: `torchrun --nproc_per_node N -m qkvlab train CONFIG KEY=VALUE...`."""
        return ["torchrun", "--nproc_per_node", str(self.gpus), "-m", "qkvlab", "train", self.config_name,
                *self.overrides]

    def command_line(self) -> str:
        return shlex.join(self.command())


@dataclass(frozen=True)
class PaperPlan:
    """Every run of the preset, in launch order, with the throughput its cost assumes."""

    runs: tuple[PaperRun, ...]
    gpus: int
    throughput: Throughput
    out: Path
    data_dir: str | None

    @property
    def total_flops(self) -> int:
        return sum(run.flops for run in self.runs)

    @property
    def total_gpu_hours(self) -> float:
        return sum(run.gpu_hours(self.throughput) for run in self.runs)

    @property
    def total_wall_hours(self) -> float:
        return sum(run.wall_hours(self.throughput) for run in self.runs)

    @property
    def total_tokens(self) -> int:
        return sum(run.tokens for run in self.runs)


def micro_batch_of(cfg_batch: int, cfg_accum: int, config: str) -> int:
    """The per-GPU micro-batch a packaged config is written for (on PAPER_GPUS GPUs)."""
    check(cfg_batch % (PAPER_GPUS * cfg_accum) == 0,
          f"{config}: train.batch_size={cfg_batch} is not {PAPER_GPUS} GPUs x train.grad_accum={cfg_accum} x "
          f"a micro-batch")
    return cfg_batch // (PAPER_GPUS * cfg_accum)


def check_overrides(overrides: Sequence[str]) -> None:
    """Refuse overrides of the keys the plan sets itself."""
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key in PLAN_KEYS or key == "model.variant":
            raise QkvlabError(f"{item!r}: --preset paper sets {key} itself; "
                              "use --seeds, --data-dir, --out or --gpus instead")


def plan(gpus: int = PAPER_GPUS, throughput: Throughput | None = None, out: str | Path = "runs/reproduce-paper",
         data_dir: str | None = None, seeds: Sequence[int] = (0,), scales: Sequence[str] = tuple(SCALES),
         overrides: Sequence[str] = ()) -> PaperPlan:
    """The preset's runs (every scale x variant x seed), resolved, with commands and costs.

    Builds nothing and reads no data: `data_dir` None shows as the placeholder DIR.
    """
    throughput = throughput or Throughput(GPUS["a100"])
    check_overrides(overrides)
    check(len(seeds) > 0, "give at least one seed")
    for name in scales:
        check(name in SCALES, f"unknown scale {name!r}; accepted: {', '.join(SCALES)}")
    root = Path(out)
    runs: list[PaperRun] = []
    for scale in (SCALES[name] for name in scales):
        base = load_config(find_config(scale.config), list(overrides))
        batch = base.train.batch_size
        assert batch is not None  # the packaged configs set it
        accum = grad_accum_for(batch, micro_batch_of(batch, base.train.grad_accum, scale.config), gpus, scale.config)
        for variant in scale.variants:
            for seed in seeds:
                run_dir = run_dir_for(root, scale.config, variant, seed)
                keys = [f"variant={parse_variant(variant).name}", f"seed={seed}",
                        f"data_dir={data_dir or DATA_PLACEHOLDER}", f"train.out_dir={run_dir}",
                        f"train.grad_accum={accum}"]
                cfg = load_config(find_config(scale.config), [*keys, *overrides])
                resolved = resolve_run(cfg)
                model = resolved.model
                runs.append(PaperRun(
                    config_name=scale.config, resolved=resolved, gpus=gpus, overrides=(*keys, *overrides),
                    params=param_counts(model)["total"],
                    forward_macs=macs(model, seq_len=model.max_seq_len, batch=1)["total"]))
    return PaperPlan(tuple(runs), gpus, throughput, root, data_dir)


def check_data_dir(path: str, vocab_size: int, context: int) -> str:
    """Refuse a directory that is not a token directory fit for the paper's models; return a note on its size."""
    from qkvlab.data.tokens import open_tokens

    tokens = open_tokens(path)
    check(tokens.vocab_size <= vocab_size,
          f"--data-dir {path!r} has a vocabulary of {tokens.vocab_size:,}; the paper's models embed "
          f"{vocab_size:,} (GPT-2's 50,257 padded): tokenize with --tokenizer gpt2")
    for split in ("train", "val"):
        longest = max((len(shard) for shard in tokens.split(split).shards), default=0)
        check(longest > context, f"--data-dir {path!r}: no shard of its {split!r} split holds a window of "
                                 f"{context + 1} tokens (longest: {longest:,})")
    return f"{tokens.split('train').n_tokens:,} training tokens in {path}"


def cuda_devices() -> int:
    """CUDA devices this process sees (CUDA_VISIBLE_DEVICES applies); 0 without CUDA."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def detect_gpu() -> Gpu | None:
    """The GPUS entry of CUDA device 0, when its name says which (None otherwise)."""
    import torch

    name = torch.cuda.get_device_name(0).upper()
    if "H100" in name:
        return GPUS["h100-pcie" if "PCIE" in name else "h100"]
    return GPUS["a100"] if "A100" in name else None


def launch_command(run: PaperRun) -> list[str]:
    """`run.command()` with torchrun as this interpreter's `-m torch.distributed.run` (the same environment)."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", *run.command()[1:]]
