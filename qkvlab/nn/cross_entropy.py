"""Cross-entropy of a linear output layer, computed in chunks of rows without the full logits.

A language model's last layer and loss, `F.cross_entropy(h @ weight.T, targets)`, materialise (N, V) float32
logits and, in the backward, three more tensors of that size (the log-softmax, the zero-filled gradient of the
loss, the gradient of the logits): 67 MB each for 2,048 tokens of a vocabulary of 8,192, most of a training
step's fresh memory. `linear_cross_entropy` takes `chunk_rows` rows at a time: their logits, log-sum-exp and loss,
and, when gradients are needed, the gradient of the logits written over the logits themselves
((softmax - one-hot) / count), multiplied into the gradients of `h` and of `weight` right away. The backward only
scales what the forward computed. Only one chunk's logits exist at a time, the same idea as Liger-Kernel's fused
linear cross-entropy; here in plain PyTorch, so it runs on CPU and CUDA unchanged.

The arithmetic is the standard one (same GEMMs, a float32 softmax); the sums over chunks round differently,
so the loss and gradients agree with `F.cross_entropy` to float32 rounding, not bit for bit.
"""

from __future__ import annotations

import contextlib

import torch
from torch.autograd.function import once_differentiable

from qkvlab.errors import check

# Rows per chunk: at least MIN_CHUNK_ROWS, since every chunk adds its (V, C) share to the weight's gradient, a
# pass over V x C floats whatever the rows; more where the vocabulary is small, up to CHUNK_BYTES of logits.
# Measured (2,048 rows of width 384, the loss's forward and backward, 2 threads, against F.cross_entropy on the full
# logits): vocabulary 8,192: 64 rows 0.94x, 256 rows 1.23x, 512-1,024 rows 1.27-1.28x, 2,048 1.21x; vocabulary
# 50,304: 41 rows 0.71x, 128 rows 0.99x, 256 rows 1.12x, 512-2,048 rows 1.20-1.22x (docs/PERFORMANCE.md).
MIN_CHUNK_ROWS = 512
CHUNK_BYTES = 16 << 20


def default_chunk_rows(vocab: int) -> int:
    """Rows per chunk for a vocabulary of `vocab`: `MIN_CHUNK_ROWS`, or more while their float32 logits take at
    most `CHUNK_BYTES`."""
    return max(MIN_CHUNK_ROWS, CHUNK_BYTES // (4 * vocab))


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100,
                         reduction: str = "mean", chunk_rows: int | None = None) -> torch.Tensor:
    """`F.cross_entropy(h @ weight.T, targets, ignore_index=..., reduction=...)` for h (..., C), weight (V, C),
    targets (...) of class indices, without the (N, V) logits; `reduction` "mean" (over targets that are not
    `ignore_index`; every target ignored gives 0, not NaN) or "sum". Under autocast the GEMMs run in the autocast
    dtype, the softmax in float32 (float64 for float64 inputs)."""
    check(reduction in ("mean", "sum"), f"reduction must be 'mean' or 'sum', got {reduction!r}")
    check(h.shape[:-1] == targets.shape,
          f"targets of shape {tuple(targets.shape)} do not match the inputs' rows {tuple(h.shape[:-1])}")
    check(weight.dim() == 2 and weight.shape[1] == h.shape[-1],
          f"weight of shape {tuple(weight.shape)} does not take inputs of width {h.shape[-1]}")
    rows = chunk_rows if chunk_rows is not None else default_chunk_rows(weight.shape[0])
    check(rows > 0, f"chunk_rows must be positive, got {rows}")
    return _LinearCrossEntropy.apply(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1), ignore_index,
                                     reduction == "mean", rows)


def _compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype the GEMMs run in: the autocast dtype where autocast is on, else the inputs' (also on devices
    without autocast, such as "meta")."""
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


def _no_autocast(device: torch.device):
    """Autocast off for `device` (nothing to turn off where the device has none)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index, mean, rows):  # h (N, C), weight (V, C), targets (N,)
        grads = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        dtype = _compute_dtype(h.device, h.dtype)
        with _no_autocast(h.device):
            w = weight.to(dtype)  # (V, C); a no-op without autocast
            valid = targets != ignore_index  # (N,)
            real = torch.promote_types(dtype, torch.float32)  # the softmax's dtype: float32, or float64
            count = valid.sum().to(real)
            scale = 1 / count.clamp(min=1) if mean else torch.ones((), device=h.device, dtype=real)  # 0/0 -> 0
            total = torch.zeros((), device=h.device, dtype=real)
            grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None  # (N, C)
            grad_w = torch.zeros_like(weight, dtype=real) if ctx.needs_input_grad[1] else None  # (V, C)
            picks = torch.where(valid, targets, 0)  # (N,) a class for every row; ignored rows are not counted
            shares = valid.to(real) * scale  # (N,) each row's weight in the loss
            buffer = h.new_empty(min(rows, h.shape[0]), w.shape[0], dtype=real)  # one chunk's logits, reused
            for start in range(0, h.shape[0], rows):
                hc = h[start:start + rows].to(dtype)  # (n, C)
                n = hc.shape[0]
                logits = buffer[:n]  # (n, V)
                if dtype == real:
                    torch.mm(hc, w.t(), out=logits)
                else:
                    logits.copy_(torch.mm(hc, w.t()))
                pc = picks[start:start + n, None]  # (n, 1)
                vc, sc = valid[start:start + n], shares[start:start + n]  # (n,)
                picked = logits.gather(1, pc)[:, 0]  # (n,)
                top = logits.amax(dim=-1, keepdim=True)  # (n, 1)
                e = logits.sub_(top).exp_()  # exp(logits - top), over the logits  (n, V)
                z = e.sum(dim=-1)  # (n,)
                total += torch.where(vc, z.log() + top[:, 0] - picked, 0.0).sum()
                if not grads:
                    continue
                g = e.mul_((sc / z)[:, None])  # the softmax times each row's share (ignored rows 0; "mean": / count)
                g.scatter_add_(1, pc, -sc[:, None])  # minus each counted target's one-hot, times its share
                g = g.to(dtype)
                if grad_h is not None:
                    if grad_h.dtype == dtype:
                        torch.mm(g, w, out=grad_h[start:start + n])  # (n, C)
                    else:
                        grad_h[start:start + n] = torch.mm(g, w)
                if grad_w is not None:
                    if dtype == real:
                        grad_w.addmm_(g.t(), hc)  # (V, C)
                    else:
                        grad_w += torch.mm(g.t(), hc).to(real)
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w.to(weight.dtype))
        return total * scale if mean else total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_out.to(grad_h.dtype),
                None if grad_w is None else grad_w * grad_out.to(grad_w.dtype), None, None, None, None)
