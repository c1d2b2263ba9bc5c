"""Model FLOPs of a training step and the utilisation they imply (MFU), for the training log.

FLOPs are counted, not modelled: one forward + backward of a micro-batch runs under
`qkvlab.cost.flop_counter()` once per session, on a throwaway pass, so every task model (decoder,
encoder, ViT, segmentation) is covered. MFU = those FLOPs per second / the device's peak, where the
peak is known: `train.peak_tflops`, or the dense bf16 tensor-core peak of a GPU recognised by name.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    """A GPU model and its dense (no sparsity) bf16 tensor-core peak."""

    name: str
    label: str
    peak_tflops: float


GPUS: dict[str, Gpu] = {
    "a100": Gpu("a100", "NVIDIA A100 (SXM or PCIe)", 312.0),
    "h100": Gpu("h100", "NVIDIA H100 SXM", 989.0),
    "h100-pcie": Gpu("h100-pcie", "NVIDIA H100 PCIe", 756.0),
}


def gpu_from_name(device_name: str) -> Gpu | None:
    """The GPU a CUDA device name (`torch.cuda.get_device_name()`) is, if it is one of `GPUS`."""
    name = device_name.upper()
    if "H100" in name:
        return GPUS["h100-pcie" if "PCIE" in name else "h100"]
    if "A100" in name:
        return GPUS["a100"]
    return None


def peak_flops(device, peak_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of `device` for MFU: `peak_tflops` if given, a recognised GPU's, else None (unknown)."""
    if peak_tflops is not None:
        return peak_tflops * 1e12
    if getattr(device, "type", device) == "cuda":
        import torch

        gpu = gpu_from_name(torch.cuda.get_device_name(device))
        return None if gpu is None else gpu.peak_tflops * 1e12
    return None


def count_flops(fn) -> int:
    """FLOPs of `fn()` (forward and, if it calls it, backward), counted with `qkvlab.cost.flop_counter()`."""
    from qkvlab.cost import flop_counter

    counter = flop_counter()
    with counter:
        fn()
    return counter.get_total_flops()


def rates(step_flops: int | None, seconds: float, peak: float | None) -> dict[str, float]:
    """The log fields of one step: achieved TFLOP/s and, where the peak is known, MFU."""
    if not step_flops:
        return {}
    achieved = step_flops / max(seconds, 1e-9)
    out = {"tflops_per_s": achieved / 1e12}
    if peak:
        out["mfu"] = achieved / peak
    return out
