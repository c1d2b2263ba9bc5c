"""`Linear`: `nn.Linear` whose few-row CPU inference goes through a kernel that streams the weight once.

Decoding multiplies one token per sequence by every weight matrix: a matrix-vector product bound by reading
the weight. On the CPUs measured here PyTorch's BLAS path reads it at 5-8 GB/s, a fraction of the memory's
bandwidth; `csrc/small_linear.cpp` (built with the cache-read kernels, `qkvlab.nn.kv_decode`) reads it at
18-27 GB/s with one to four rows (1.9-4.5x, docs/PERFORMANCE.md). `Linear` takes that path for float32 inputs of at
most `max_rows()` rows on the CPU without gradients, outside torch.compile / export, when the weight has at least
`MIN_WEIGHT` entries; everything else (training, prefill, GPUs, other dtypes, a machine without a C++
compiler) is `nn.Linear` unchanged. It is an `nn.Linear`: same parameters, state-dict keys and init.

How many rows the kernel should take depends on the CPU's BLAS (MKL in PyTorch's x86 builds): on an Intel Xeon
an earlier session measured BLAS as fast from 8 rows; on this project's AMD EPYC the kernel (eight rows of x a
block) is 2.1x BLAS at 32 rows, 1.6x at 64, 1.4x at 128, 1.1x at 256 and even at 512 (`benchmarks/linear_rows.py`,
weights from memory as a decode step reads them); whole decode steps of 128 rows 1.10-1.29x with the kernel, of
256 rows 0.94-1.09x. So AMD CPUs take up to `AMD_ROWS` rows, others `MIN_ROWS` (`max_rows`). A measurement at run time
was tried and dropped: on this VM two timings of each side picked 8, 32, 64 or 128 from run to run.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from qkvlab.errors import QkvlabError
from qkvlab.nn import kv_decode

MIN_ROWS = 8  # the kernel's rows on most CPUs (measured on an Intel Xeon: BLAS as fast from 8 rows)
AMD_ROWS = 128  # on AMD CPUs (measured on an AMD EPYC, Zen 4: the kernel 1.6-2.6x BLAS at 16-64 rows, 1.4x at 128)
MIN_WEIGHT = 16384  # smaller weights: the call costs more than it saves (measured: equal at 65 x 128)
enabled = True  # False: always nn.Linear (benchmarks compare the two in one process)


_failed: set = set()  # builders that raised (no compiler): not tried again at every layer of every step


def _kernel():
    """The built library, or None where it cannot be built (then nn.Linear serves)."""
    build = kv_decode.library
    if build in _failed:
        return None
    try:
        return build()
    except QkvlabError:
        _failed.add(build)
        return None


def _cpu_vendor(path: str = "/proc/cpuinfo") -> str:
    """The CPU's vendor string (Linux's /proc/cpuinfo), or "" where it cannot be read."""
    line = kv_decode.cpuinfo_line(("vendor_id",), path)
    return line.split(":", 1)[1].strip() if ":" in line else ""


@functools.cache
def max_rows() -> int:
    """The most rows the kernel takes: AMD_ROWS on AMD CPUs, MIN_ROWS elsewhere (see the module's docstring)."""
    return AMD_ROWS if _cpu_vendor() == "AuthenticAMD" else MIN_ROWS


def few_rows(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `x @ weight.T` takes the kernel."""
    return (enabled and type(x) is torch.Tensor  # not a fake, functional or proxy tensor (export, tracing)
            and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and weight.numel() >= MIN_WEIGHT and x.numel() > 0
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing() and weight.is_contiguous()
            and not kv_decode.watched()  # a FLOP counter or tracer sees F.linear
            and x.numel() <= max_rows() * x.shape[-1])


def small_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """x (..., K) @ weight (N, K).T + bias (any number of rows; `Linear` sends at most `max_rows()`), or None when
    the kernel is unavailable."""
    lib = _kernel()
    if lib is None:
        return None
    N, K = weight.shape
    rows = x.reshape(-1, K).contiguous()  # (M, K)
    y = torch.empty(rows.shape[0], N)  # (M, N)
    lib.qkvlab_small_linear(rows.data_ptr(), weight.data_ptr(), None if bias is None else bias.contiguous().data_ptr(),
                            y.data_ptr(), rows.shape[0], N, K, torch.get_num_threads())
    return y.view(*x.shape[:-1], N)


class Linear(nn.Linear):
    """nn.Linear; few-row float32 CPU inference reads the weight once through `small_linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if few_rows(x, self.weight):
            y = small_linear(x, self.weight, self.bias)
            if y is not None:
                return y
        return F.linear(x, self.weight, self.bias)
