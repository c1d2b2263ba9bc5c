"""A preallocated KV cache that stores only distinct tensors.

One stream (the shared K = V tensor) or two (K and V), of *grouped* key/value heads only:
heads shared by several queries are stored once and expanded at read time. Per-sequence
lengths let a batch of prompts of different lengths generate together.

A quantised cache (dtype int8, or float8 where torch has it) stores each head's vector of each
token as 1-byte values and one bfloat16 scale (symmetric: scale = max |x| / 127 for int8, / the
largest finite float8 value for float8), so with K = V the shared tensor is quantised once.
Reads dequantise to the compute dtype.
"""

from __future__ import annotations

import torch

from qkvlab.errors import QkvlabError

SCALE_DTYPE = torch.bfloat16  # one scale per (layer, stream, row, head, token): 2 bytes

# Storage dtypes of a quantised cache and the largest magnitude each represents.
QUANT_MAX: dict[torch.dtype, float] = {torch.int8: 127.0}
for _name, _max in (("float8_e4m3fn", 448.0), ("float8_e5m2", 57344.0)):
    if hasattr(torch, _name):
        QUANT_MAX[getattr(torch, _name)] = _max

_NAMES: dict[str, str] = {
    "fp64": "float64", "double": "float64", "fp32": "float32", "float": "float32", "bf16": "bfloat16",
    "fp16": "float16", "half": "float16", "fp8": "float8_e4m3fn", "float8": "float8_e4m3fn",
    "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2",
}
CACHE_DTYPES = ("fp32", "bf16", "fp16", "int8", "fp8")  # what the CLI offers


def resolve_cache_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A cache dtype given by name ("int8", "fp8", "bf16", "float32", ...) or as a torch dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).strip().lower().removeprefix("torch.")
    key = _NAMES.get(key, key)
    resolved = getattr(torch, key, None)
    if not isinstance(resolved, torch.dtype) or not (resolved.is_floating_point or resolved in QUANT_MAX):
        if key.startswith("float8"):
            raise QkvlabError(f"cache dtype {dtype!r}: this PyTorch ({torch.__version__}) has no {key}")
        raise QkvlabError(f"unknown cache dtype {dtype!r}; accepted: {', '.join(CACHE_DTYPES)} "
                          "(or float32, bfloat16, float16, float8_e4m3fn, float8_e5m2)")
    return resolved


def quantize(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., D) -> values (..., D) in `dtype` (int8 or float8) and scales (...) in SCALE_DTYPE.

    Symmetric, one scale per vector: the scale is rounded to SCALE_DTYPE *before* dividing, so
    the only error is the rounding of x / scale (at most scale / 2 per element for int8).
    """
    qmax = QUANT_MAX[dtype]
    amax = x.detach().abs().amax(dim=-1, keepdim=True).float()  # (..., 1)
    scale = (amax / qmax).clamp_min(1e-30).to(SCALE_DTYPE)  # (..., 1)
    y = (x.float() / scale.float()).clamp(-qmax, qmax)  # (..., D)
    values = y.round().to(dtype) if dtype == torch.int8 else y.to(dtype)
    return values, scale.squeeze(-1)


def dequantize(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """values (..., D) and scales (...) -> (..., D) in `dtype`."""
    return values.to(dtype) * scales.to(dtype)[..., None]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """float8 tensors as uint8 (CPU scatter has no float8 kernel); others unchanged."""
    return t.view(torch.uint8) if t.element_size() == 1 and t.is_floating_point() else t


class KVCache:
    """Cache for `n_layers` layers: `streams` tensors of shape (n_layers, B, H_kv, max_len, D).

    A quantised dtype (int8, float8) adds one `scales` tensor (n_layers, B, H_kv, max_len) per stream.
    """

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int, max_len: int,
                 streams: int, dtype: str | torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 fused_rotary: bool = False):
        if streams not in (1, 2):
            raise QkvlabError(f"a KV cache stores 1 or 2 streams, got {streams}")
        cache_dtype = resolve_cache_dtype(dtype) or torch.float32  # None only for dtype=None
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.buffers = [torch.zeros(shape, dtype=cache_dtype, device=device) for _ in range(streams)]
        self.scales = ([torch.zeros(shape[:-1], dtype=SCALE_DTYPE, device=device) for _ in range(streams)]
                       if cache_dtype in QUANT_MAX else [])
        self.max_len = max_len
        # Tokens stored per row, twice: on the host (shapes and bounds are decided from it, so decoding
        # never reads the device) and on the device (the positions a forward pass writes at).
        self._host_lengths = [0] * batch_size
        self._device_lengths: torch.Tensor | None = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,)
        self._on_cpu = torch.device(device).type == "cpu"  # there the device's copy is rebuilt when read
        # Float32 values on the CPU (fixed at construction): what the native decode step reads, checked every step.
        self.float32_cpu = self._on_cpu and cache_dtype == torch.float32
        self._steps = torch.arange(max_len, device=device)  # (max_len,) offsets of new tokens
        self._workspace: torch.Tensor | None = None
        # One-token steps read the cache in one pass (qkvlab.nn.rotary_read): K = V rotary keys rotated while
        # read instead of into the workspace, quantised values dequantised while read, large caches' keys
        # (grouped heads: once per group) and values together.
        self.fused_rotary = fused_rotary

    @classmethod
    def for_model(cls, config, batch_size: int, max_len: int | None = None,
                  dtype: str | torch.dtype = torch.float32, device: torch.device | str = "cpu",
                  fused_rotary: bool = False) -> KVCache:
        """A cache sized for a `ModelConfig`'s attention (up to its max_seq_len by default)."""
        max_len = config.max_seq_len if max_len is None else max_len
        if not 0 < max_len <= config.max_seq_len:
            raise QkvlabError(f"cache length {max_len} must be in 1..{config.max_seq_len} (the model's max_seq_len)")
        return cls(config.n_layers, batch_size, config.n_kv_heads, config.resolved_head_dim, max_len,
                   config.spec.cache_streams, dtype, device, fused_rotary)

    @property
    def streams(self) -> int:
        return len(self.buffers)

    @property
    def batch_size(self) -> int:
        return self.buffers[0].shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.buffers[0].dtype

    @property
    def quantized(self) -> bool:
        return bool(self.scales)

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache's tensors (values and, when quantised, scales)."""
        return sum(b.numel() * b.element_size() for b in self.buffers + self.scales)

    @property
    def bytes_per_token(self) -> int:
        """Bytes stored per token of one sequence, over all layers."""
        return self.nbytes // (self.batch_size * self.max_len)

    @property
    def lengths(self) -> torch.Tensor:
        """Tokens stored per row, (B,) long on the CPU (a copy)."""
        return torch.tensor(self._host_lengths, dtype=torch.long)

    @property
    def longest(self) -> int:
        """Tokens stored in the longest row."""
        return max(self._host_lengths)

    @property
    def uniform(self) -> bool:
        """Whether every row holds the same number of tokens."""
        return min(self._host_lengths) == max(self._host_lengths)

    def positions(self, n_new: int, device: torch.device | str) -> torch.Tensor:
        """Absolute positions of `n_new` tokens appended to every row: (B, n_new), computed on the device."""
        if self.longest + n_new > self.max_len:
            raise QkvlabError(f"the KV cache holds {self.max_len} tokens; "
                              f"{self.longest} + {n_new} new would overflow it")
        return (self._device_lengths_now()[:, None] + self._steps[:n_new]).to(device)  # (B, n_new)

    def _device_lengths_now(self) -> torch.Tensor:
        if self._device_lengths is None:  # advanced on the CPU since last read
            self._device_lengths = torch.tensor(self._host_lengths, dtype=torch.long)
        return self._device_lengths

    def key_length(self, n_new: int) -> int:
        """How many cached positions a forward of `n_new` tokens reads."""
        return self.longest + n_new

    def write(self, layer: int, positions: torch.Tensor, *tensors: torch.Tensor) -> None:
        """Store new (B, H_kv, T, D) tensors of `layer` at per-row `positions` (B, T).

        `positions` are the ones `positions()` gave for this step; when every row holds as many tokens (the
        host knows), they are one contiguous slice, copied without an index (several times faster than the
        scatter a ragged batch needs)."""
        if not self.quantized and self.uniform:
            start, T = self._host_lengths[0], tensors[0].shape[2]
            for buffer, new in zip(self.buffers, tensors, strict=True):
                buffer[layer, :, :, start:start + T].copy_(new)
            return
        index = positions[:, None, :, None].expand_as(tensors[0])  # (B, H_kv, T, D)
        if not self.quantized:
            for buffer, new in zip(self.buffers, tensors, strict=True):
                buffer[layer].scatter_(2, index, new.to(buffer.dtype))
            return
        for buffer, scales, new in zip(self.buffers, self.scales, tensors, strict=True):
            values, scale = quantize(new, buffer.dtype)  # (B, H_kv, T, D), (B, H_kv, T)
            _bits(buffer[layer]).scatter_(2, index, _bits(values))
            scales[layer].scatter_(2, index[..., 0], scale)

    def read(self, layer: int, length: int, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        """The stored streams of `layer` for positions 0..length-1: each (B, H_kv, length, D).

        A quantised cache returns them dequantised to `dtype` (float32 by default); a float cache
        returns views in its own dtype.
        """
        if not self.quantized:
            return [buffer[layer, :, :, :length] for buffer in self.buffers]
        return [dequantize(buffer[layer, :, :, :length], scales[layer, :, :, :length], dtype or torch.float32)
                for buffer, scales in zip(self.buffers, self.scales, strict=True)]

    def stored(self, layer: int, length: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The streams of `layer` for positions 0..length-1 as stored, (B, H_kv, length, D) views each, and
        their scales (B, H_kv, length) when quantised (else an empty list): for readers that dequantise."""
        return ([buffer[layer, :, :, :length] for buffer in self.buffers],
                [scales[layer, :, :, :length] for scales in self.scales])

    def rotation_workspace(self, length: int, dtype: torch.dtype = torch.complex64,
                           pairs: int | None = None) -> torch.Tensor:
        """Scratch for one layer's rotated keys, (B, H_kv, length, pairs) complex, reused by every layer.

        Only a K = V cache with rotary positions needs it (keys are rotated when read); it is
        working memory, not stored tokens, so it is counted in `workspace_nbytes`, not `nbytes`.
        `pairs` is the rotated pairs per head: D/2 by default, fewer with partial rotary (the
        unrotated dims are read from the cache itself).
        """
        B, H, T, D = self.buffers[0].shape[1:]
        pairs = D // 2 if pairs is None else pairs
        ws = self._workspace
        if ws is None or ws.dtype != dtype or ws.shape[-1] != pairs:
            self._workspace = ws = torch.empty(B, H, T, pairs, dtype=dtype, device=self.buffers[0].device)
        return ws[:, :, :length]

    @property
    def workspace_nbytes(self) -> int:
        """Bytes of the rotation workspace (0 until a rotary K = V layer reads the cache)."""
        ws = self._workspace
        return 0 if ws is None else ws.numel() * ws.element_size()

    def advance(self, n_new: int) -> None:
        self._host_lengths = [n + n_new for n in self._host_lengths]
        if self._on_cpu:
            self._device_lengths = None  # rebuilt when next read: a native decode step reads none
        else:
            self._device_lengths = self._device_lengths_now().add_(n_new)  # on the device: no copy from the host

    def set_lengths(self, lengths: torch.Tensor | list[int]) -> None:
        """Set each row's length (after a right-padded batched prefill, or a reordering of the rows)."""
        values = torch.as_tensor(lengths, dtype=torch.long).cpu()  # (B,)
        rows = values.tolist()
        if values.dim() != 1 or len(rows) != self.batch_size or not all(0 <= n <= self.max_len for n in rows):
            raise QkvlabError(f"cache lengths must be {self.batch_size} integers in 0..{self.max_len} "
                              f"(one per row), got {rows}")
        self._host_lengths = rows
        self._device_lengths = values.to(self.buffers[0].device)

    def reset(self) -> None:
        self._host_lengths = [0] * len(self._host_lengths)
        self._device_lengths = torch.zeros_like(self._device_lengths_now())
