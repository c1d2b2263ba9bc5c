"""The CPU decoding kernels: the fused read's one pass over a KV cache (csrc/kv_decode.cpp), the few-row
linear layer `qkvlab.nn.linear` uses (csrc/small_linear.cpp) and the whole decode step over every block that
`qkvlab.nn.decode_step` calls (csrc/decode_step.cpp), built into one library.

The compiled expression of `qkvlab.nn.rotary_read` reads the cache twice (scores, then values); this
kernel reads it once, in blocks that stay in L1 between scoring and summing, with an online softmax
(flash-decoding: key ranges on separate threads, merged by log-sum-exp). Float32 queries over a float32
cache, or over an int8 or float8 cache dequantised as it is read (one bfloat16 scale per row, head and
token; float8 codes through a 256-entry table PyTorch fills); the head size is unrolled at compile time for
32, 64 and 128.

It is plain C++ with OpenMP and no PyTorch headers, so building it takes a second or two: on first use
the system C++ compiler (`$CXX`, else `c++`) builds a shared library into `$QKVLAB_KERNEL_DIR` (default
`~/.cache/qkvlab/kernels`), named by a hash of the source, flags, compiler and CPU features, and ctypes calls it.
It is built for the CPU it runs on (-march=native); `$QKVLAB_KERNEL_MARCH` names another target (e.g.
x86-64-v3: AVX2 without AVX-512, how the tests check the AVX2 code on an AVX-512 machine).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from qkvlab.errors import QkvlabError
from qkvlab.nn.kv_cache import QUANT_MAX

# The CPU decoding kernels, built into one library: the one-pass cache read, the few-row linear layer, and the
# whole-step decode that calls both (qkvlab.nn.decode_step).
SOURCES = [Path(__file__).parent / "csrc" / name for name in ("kv_decode.cpp", "small_linear.cpp", "decode_step.cpp")]
HEADERS = [Path(__file__).parent / "csrc" / "vec16.h"]  # included by the sources: part of the build's key
# -ffast-math lets the compiler vectorise exp and the reductions; infinities stay meaningful (masked keys).
FLAGS = ["-O3", "-ffast-math", "-fno-finite-math-only", "-fopenmp", "-fPIC", "-std=c++17"]
# Linked apart from the compile, without -ffast-math: with it the linker adds crtfastmath.o, whose constructor
# turns on flush-to-zero and denormals-are-zero for the whole process when the library loads (every later float
# computation of the user's, NumPy and PyTorch included, then rounds subnormals to zero).
LINK_FLAGS = ["-shared", "-fopenmp", "-fPIC"]
MIN_KEYS_PER_SPLIT = 512
STORED_DTYPES = (torch.float32, torch.bfloat16)  # float caches the kernel reads as stored (bfloat16: widened)

_i64, _f32p = ctypes.c_int64, ctypes.POINTER(ctypes.c_float)
_TAIL: list = [_f32p, ctypes.c_void_p, _i64, _i64, _i64, _i64, _i64, _i64, ctypes.c_int32, _f32p]
_ARGTYPES: list = [_f32p, _f32p, _f32p, _i64, _i64, _i64, *_TAIL]
_ARGTYPES_PAIR: list = [_f32p, _f32p, _i64, _i64, _i64, _f32p, _i64, _i64, _i64, *_TAIL[1:]]  # no table
_STREAM_INT8: list = [ctypes.c_void_p, _i64, _i64, _i64, ctypes.c_void_p, _i64, _i64]  # values, strides, scales
_ARGTYPES_INT8: list = [_f32p, _f32p, *_STREAM_INT8, *_STREAM_INT8, *_TAIL]
_ARGTYPES_FP8: list = [_f32p, _f32p, *_STREAM_INT8, *_STREAM_INT8, _f32p, *_TAIL]  # + the codes' table
_STREAM_BF16: list = [ctypes.c_void_p, _i64, _i64, _i64]  # values and strides, no scales
_ARGTYPES_BF16: list = [_f32p, _f32p, *_STREAM_BF16, *_STREAM_BF16, *_TAIL]


def march() -> str:
    """The target the kernels are built for: `$QKVLAB_KERNEL_MARCH`, else native (the CPU it runs on)."""
    value = os.environ.get("QKVLAB_KERNEL_MARCH", "").strip() or "native"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", value):
        raise QkvlabError(f"QKVLAB_KERNEL_MARCH={value!r} is not a target name; give one the compiler's -march= "
                          "accepts, e.g. native, x86-64-v3 or x86-64-v4")
    return value


def flags() -> list[str]:
    """The compile flags: FLAGS and the target."""
    return [f"-march={march()}", *FLAGS]


def kernel_dir() -> Path:
    return Path(os.environ.get("QKVLAB_KERNEL_DIR") or Path.home() / ".cache" / "qkvlab" / "kernels")


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        raise QkvlabError("the fused rotary read's CPU kernel needs a C++ compiler (set CXX, or install g++)")
    return cxx


def cpuinfo_line(prefixes: tuple[str, ...], path: str = "/proc/cpuinfo") -> str:
    """The first line of Linux's cpuinfo starting with one of `prefixes`, or "" where there is none."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith(prefixes):
                    return line
    except OSError:
        pass
    return ""


def _cpu_id() -> str:
    """What -march=native compiles for: the CPU's feature flags (Linux), else the platform's names. Part of
    the library's name, so a home directory shared by different machines never loads a foreign build."""
    return cpuinfo_line(("flags", "Features")) or f"{platform.machine()} {platform.processor()}"


@functools.cache
def library() -> ctypes.CDLL:
    """The built kernel (built once per source, flags and compiler, then loaded from the cache)."""
    cxx = _compiler()
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise QkvlabError(f"the C++ compiler {cxx!r} does not run: {e}") from None
    texts = [source.read_text() for source in (*SOURCES, *HEADERS)]
    key = hashlib.sha256("\0".join([*texts, *flags(), *LINK_FLAGS, version, _cpu_id()]).encode()).hexdigest()[:16]
    path = kernel_dir() / f"kv_decode-{key}.so"
    if not path.is_file():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # built aside, then renamed: never half a file
                built = Path(tmp) / path.name
                failed = compile_library(cxx, SOURCES, built)
                if failed:
                    raise QkvlabError(f"building the fused rotary read's CPU kernel with {cxx} failed: {failed[:200]}")
                os.replace(built, path)
        except OSError as e:
            raise QkvlabError(f"cannot write the fused rotary read's CPU kernel into {path.parent} ({e.strerror}); "
                              "set QKVLAB_KERNEL_DIR to a writable directory") from None
    return load(path)


def compile_library(cxx: str, sources: list[Path], out: Path) -> str:
    """Compile `sources` with `flags()` and link them into the shared library `out` with LINK_FLAGS (object files
    beside `out`); the compiler's first error line, or "" when built."""
    objects = [str(out.parent / f"{source.stem}.o") for source in sources]
    steps = [[cxx, *flags(), "-c", str(source), "-o", obj] for source, obj in zip(sources, objects, strict=True)]
    for command in [*steps, [cxx, *LINK_FLAGS, *objects, "-o", str(out)]]:
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            return (done.stderr.strip().splitlines() or ["no output"])[0]
    return ""


_void = ctypes.c_void_p  # raw data_ptr() integers: no pointer objects built per call (this is per layer)
# Each exported function's argument types, and the result types of those that return one.
_SIGNATURES = {
    "qkvlab_kv_rotary_decode": _ARGTYPES,
    "qkvlab_kv_decode_pair": _ARGTYPES_PAIR,
    "qkvlab_kv_rotary_decode_int8": _ARGTYPES_INT8,
    "qkvlab_kv_rotary_decode_fp8": _ARGTYPES_FP8,
    "qkvlab_kv_rotary_decode_bf16": _ARGTYPES_BF16,
    "qkvlab_small_linear": [_void, _void, _void, _void, _i64, _i64, _i64, ctypes.c_int32],
    "qkvlab_decode_layers": [_void, _void, _void, _void, ctypes.c_float, ctypes.c_int32],
    "qkvlab_decode_tokens": [_void, _void, _void, _void, _void, _void, ctypes.c_float, ctypes.c_int32],
    "qkvlab_step_abi": [],
    "qkvlab_mlp_activation": [_void, _void, _i64, _i64, _i64],
}


_RESTYPES = {"qkvlab_decode_tokens": ctypes.c_int32, "qkvlab_step_abi": ctypes.c_int32}


def load(path: Path, require_all: bool = True) -> ctypes.CDLL:
    """A built library with its functions' signatures declared; `require_all=False` skips functions it lacks
    (an older build loaded by benchmarks/kernel_ab.py)."""
    lib = ctypes.CDLL(str(path))
    for name, argtypes in _SIGNATURES.items():
        if not require_all and not hasattr(lib, name):
            continue
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, _RESTYPES.get(name)
    return lib


@functools.cache
def code_table(dtype: torch.dtype) -> torch.Tensor:
    """(256,) float32: the value of each one-byte code of a float8 `dtype`, as PyTorch converts it."""
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).float().contiguous()


def watched() -> bool:
    """Whether a dispatch or function mode is active (FLOP counters, tracers): the kernels, called through
    ctypes, would be invisible to it, so PyTorch's own ops run instead."""
    return torch._C._len_torch_dispatch_stack() > 0 or torch._C._is_torch_function_mode_enabled()


def serves(q: torch.Tensor, kv: torch.Tensor) -> bool:
    """Whether the kernel applies: float32 queries on the CPU over a float32, bfloat16, int8 or float8 cache,
    each key's dims contiguous."""
    return (q.device.type == "cpu" and kv.device.type == "cpu" and q.dtype == torch.float32
            and (kv.dtype in STORED_DTYPES or kv.dtype in QUANT_MAX) and kv.stride(-1) == 1 and not watched())


def splits_for(length: int) -> int:
    """Key ranges (work items, each over every row and head): two per thread, of >= 512 keys."""
    return max(1, min(2 * torch.get_num_threads(), length // MIN_KEYS_PER_SPLIT))


def _ptr(t: torch.Tensor):
    return ctypes.cast(t.data_ptr(), _f32p)


def decode(q: torch.Tensor, q_swap: torch.Tensor | None, kv: torch.Tensor, rot: torch.Tensor | None,
           mask: torch.Tensor | None, scales: torch.Tensor | None = None,
           values: torch.Tensor | None = None, value_scales: torch.Tensor | None = None) -> torch.Tensor:
    """q, q_swap (B, H_kv, G, D) scaled; kv (B, H_kv, Tk, D) the keys, float32 or bfloat16 (and the values:
    K = V), or int8 / float8 with `scales` (B, H_kv, Tk) bfloat16 (a key is its values times its scale); a cache with
    separate values gives them as `values` (and, quantised, `value_scales`). rot (Tk, D), each pair's (cos, sin)
    (`Rotary.read_table`), or it and q_swap None for keys read as stored; mask (B, Tk) bool or None. Returns
    (B, H_kv, G, D)."""
    quantized = kv.dtype in QUANT_MAX
    if quantized != (scales is not None) or (value_scales is not None and values is None) or (
            values is not None and quantized != (value_scales is not None)):
        raise QkvlabError("the fused read takes scales with a quantised cache and only then")
    if values is not None and (values.dtype != kv.dtype or values.stride(-1) != 1 or rot is not None):
        raise QkvlabError("the fused read takes separate values in the keys' dtype, each vector contiguous, and "
                          "then no rotation table (keys are stored rotated)")
    B, H, G, D = q.shape
    Tk = kv.shape[2]
    q = q.contiguous()
    if rot is None or q_swap is None:  # keys read as stored: the kernel reads no table
        swapped, table = q, None
    else:
        swapped, rot = q_swap.contiguous(), rot.contiguous()
        table = _ptr(rot)
    flags = None if mask is None else mask.to(torch.bool).contiguous()
    out = torch.empty(B, H, G, D)
    tail = (table, None if flags is None else flags.data_ptr(), B, H, G, D, Tk, splits_for(Tk),
            torch.get_num_threads(), _ptr(out))
    if kv.dtype == torch.bfloat16:  # widened as read; K = V: keys and values from one stream
        vs = kv if values is None else values
        library().qkvlab_kv_rotary_decode_bf16(_ptr(q), _ptr(swapped), kv.data_ptr(), kv.stride(0), kv.stride(1),
                                               kv.stride(2), vs.data_ptr(), vs.stride(0), vs.stride(1),
                                               vs.stride(2), *tail)
        return out
    if scales is None and values is not None:  # float keys and values, two streams
        library().qkvlab_kv_decode_pair(_ptr(q), _ptr(kv), kv.stride(0), kv.stride(1), kv.stride(2), _ptr(values),
                                        values.stride(0), values.stride(1), values.stride(2), *tail[1:])
        return out
    if scales is None:
        library().qkvlab_kv_rotary_decode(_ptr(q), _ptr(swapped), _ptr(kv), kv.stride(0), kv.stride(1),
                                          kv.stride(2), *tail)
        return out
    key = _quantized_stream(kv, scales)
    val = key if values is None else _quantized_stream(values, value_scales)
    if kv.dtype == torch.int8:
        library().qkvlab_kv_rotary_decode_int8(_ptr(q), _ptr(swapped), *key, *val, *tail)
    else:
        library().qkvlab_kv_rotary_decode_fp8(_ptr(q), _ptr(swapped), *key, *val, _ptr(code_table(kv.dtype)), *tail)
    return out


def _quantized_stream(values: torch.Tensor, scales: torch.Tensor | None) -> tuple:
    """The kernel's arguments for one one-byte stream (B, H_kv, Tk, D) and its scales (B, H_kv, Tk)."""
    if values.stride(-1) != 1 or scales is None or scales.dtype != torch.bfloat16 or scales.stride(-1) != 1:
        raise QkvlabError("the fused read's quantised streams need contiguous vectors and bfloat16 scales, one per "
                          "token")
    return (values.data_ptr(), values.stride(0), values.stride(1), values.stride(2), scales.data_ptr(),
            scales.stride(0), scales.stride(1))
