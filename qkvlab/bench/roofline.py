"""What this machine can do, measured in the benchmark's own process: read bandwidth, matmul throughput at a
model's GEMM shapes, and the peak memory of a piece of work.

- `read_bandwidth(mib)`: bytes/s of `x.sum()` over a float32 tensor of `mib` MiB (it reads every byte once and
  writes one number), median of repeats; `y.copy_(x)` (one read + one write) is reported beside it. Both use the
  current `torch.get_num_threads()`. A tensor that fits in the caches measures the caches, not memory.
- `matmul_peak(training_gemms(config, tokens))`: FLOP/s of `torch.mm` at the training step's GEMMs (forward,
  input-gradient and weight-gradient products of every projection and the LM head), each timed and weighted by
  its FLOPs.
  Attention's score and weighted-sum products are not included.
- `PeakMemory`: the peak memory a block adds over what was resident when it began. CUDA:
  `torch.cuda.max_memory_allocated` after a reset. CPU (Linux): the process's VmHWM after resetting it by
  writing 5 to /proc/self/clear_refs, minus VmRSS at the start; elsewhere the growth of `ru_maxrss` (a
  process high-water mark: only work that raises it is seen).
"""

from __future__ import annotations

import ctypes
import functools
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qkvlab.arch import ModelConfig

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _release_free_memory() -> None:
    """Hand the C allocator's free pages back to the system (glibc's `malloc_trim`; elsewhere nothing), so that
    what a measured block allocates shows as new resident memory instead of reusing pages freed before it
    (without it, a benchmark's later contenders read 0 MiB: they reuse what the earlier ones freed)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return
    trim(0)


def median_time(fn: Callable[[], object], repeats: int, device: torch.device | str = "cpu") -> float:
    """Median seconds of `repeats` calls of `fn` (after one warm-up call)."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def read_bandwidth(mib: int = 512, repeats: int = 5, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Measured memory read bandwidth (bytes/s) of this machine, and the copy bandwidth beside it."""
    x = torch.ones(mib * 2 ** 20 // 4, device=device)  # (N,) float32, touched once so its pages exist
    nbytes = x.numel() * x.element_size()
    y = torch.empty_like(x)
    read = median_time(lambda: x.sum(), repeats, device)
    copy = median_time(lambda: y.copy_(x), repeats, device)
    return {"bytes": nbytes, "read_bytes_per_s": nbytes / read, "copy_bytes_per_s": 2 * nbytes / copy,
            "threads": torch.get_num_threads(),
            "method": f"x.sum() over a {mib} MiB float32 tensor (read); y.copy_(x) (read + write), "
                      f"median of {repeats}"}


@dataclass(frozen=True)
class Gemm:
    """(m, k) @ (k, n), `count` times per training step."""

    m: int
    k: int
    n: int
    count: int
    what: str

    @property
    def flops(self) -> int:
        return 2 * self.m * self.k * self.n


def training_gemms(config: ModelConfig, tokens: int) -> list[Gemm]:
    """The GEMMs of one training step on `tokens` tokens: each projection's forward, input-gradient and
    weight-gradient products."""
    d, L, spec = config.d_model, config.n_layers, config.spec
    attn_out = config.n_heads * config.resolved_head_dim
    kv_width = config.n_kv_heads * config.resolved_head_dim
    qkv_width = (attn_out if spec.has_q_proj else 0) + kv_width + (kv_width if spec.has_v_proj else 0)  # fused
    fc_out = (2 if config.mlp == "swiglu" else 1) * config.resolved_d_mlp
    layers = [(d, qkv_width, L, "qkv"), (attn_out, d, L, "out_proj"), (d, fc_out, L, "mlp_in"),
              (config.resolved_d_mlp, d, L, "mlp_out"), (d, config.vocab_size, 1, "lm_head")]
    gemms = []
    for k_in, n_out, count, what in layers:
        gemms += [Gemm(tokens, k_in, n_out, count, what + " forward"),
                  Gemm(tokens, n_out, k_in, count, what + " grad input"),
                  Gemm(k_in, tokens, n_out, count, what + " grad weight")]
    return gemms


def matmul_peak(gemms: list[Gemm], repeats: int = 3, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """FLOP/s of `torch.mm` in `dtype` over `gemms`, weighted by their FLOPs (sum of FLOPs / sum of times)."""
    rows, total_flops, total_time = [], 0, 0.0
    timed: dict[tuple[int, int, int], float] = {}
    for g in gemms:
        if (g.m, g.k, g.n) not in timed:
            a = torch.randn(g.m, g.k, device=device, dtype=dtype)  # (m, k)
            b = torch.randn(g.k, g.n, device=device, dtype=dtype)  # (k, n)
            timed[g.m, g.k, g.n] = median_time(functools.partial(torch.mm, a, b), repeats, device)
        seconds = timed[g.m, g.k, g.n]
        rows.append({"what": g.what, "m": g.m, "k": g.k, "n": g.n, "count": g.count, "flops_per_s": g.flops / seconds})
        total_flops += g.flops * g.count
        total_time += seconds * g.count
    return {"flops_per_s": total_flops / total_time, "gemms": rows, "threads": torch.get_num_threads(),
            "method": f"torch.mm at each GEMM of the training step, median of {repeats}, weighted by FLOPs"}


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


class PeakMemory:
    """`with PeakMemory(device) as peak: ...`, then `peak.bytes`: what the block added at its peak."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.bytes = 0
        self.method = ""

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated"
            return self
        self._start = -1
        _release_free_memory()
        try:
            _CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS
            rss = _status_kib("VmRSS")
            if rss is not None:
                self._start = rss * 1024
                self.method = "VmHWM after /proc/self/clear_refs, minus VmRSS at the start"
        except OSError:
            pass
        if self._start < 0:
            self._start = _maxrss_bytes()
            self.method = "growth of ru_maxrss (process high-water mark)"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method.startswith("VmHWM"):
            peak = (_status_kib("VmHWM") or 0) * 1024
        else:
            peak = _maxrss_bytes()
        self.bytes = max(peak - self._start, 0)
