"""A preallocated KV cache that stores only distinct tensors.

One stream (the shared K = V tensor) or two (K and V), of *grouped* key/value heads only:
heads shared by several queries are stored once and expanded at read time. Per-sequence
lengths let a batch of prompts of different lengths generate together.
"""

from __future__ import annotations

import torch

from qkvlab.errors import QkvlabError


class KVCache:
    """Cache for `n_layers` layers: `streams` tensors of shape (n_layers, B, H_kv, max_len, D)."""

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int, max_len: int,
                 streams: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if streams not in (1, 2):
            raise QkvlabError(f"a KV cache stores 1 or 2 streams, got {streams}")
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.buffers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(streams)]
        self.max_len = max_len
        self.lengths = torch.zeros(batch_size, dtype=torch.long)  # host-side tokens stored per row
        self._workspace: torch.Tensor | None = None

    @classmethod
    def for_model(cls, config, batch_size: int, max_len: int | None = None,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> "KVCache":
        """A cache sized for a `ModelConfig`'s attention (up to its max_seq_len by default)."""
        max_len = config.max_seq_len if max_len is None else max_len
        if not 0 < max_len <= config.max_seq_len:
            raise QkvlabError(f"cache length {max_len} must be in 1..{config.max_seq_len} (the model's max_seq_len)")
        return cls(config.n_layers, batch_size, config.n_kv_heads, config.resolved_head_dim, max_len,
                   config.spec.cache_streams, dtype, device)

    @property
    def streams(self) -> int:
        return len(self.buffers)

    @property
    def batch_size(self) -> int:
        return self.buffers[0].shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache's tensors."""
        return sum(b.numel() * b.element_size() for b in self.buffers)

    @property
    def bytes_per_token(self) -> int:
        """Bytes stored per token of one sequence, over all layers."""
        return self.nbytes // (self.batch_size * self.max_len)

    def positions(self, n_new: int, device: torch.device | str) -> torch.Tensor:
        """Absolute positions of `n_new` tokens appended to every row: (B, n_new)."""
        if int(self.lengths.max()) + n_new > self.max_len:
            raise QkvlabError(f"the KV cache holds {self.max_len} tokens; "
                              f"{int(self.lengths.max())} + {n_new} new would overflow it")
        return (self.lengths[:, None] + torch.arange(n_new)).to(device)

    def key_length(self, n_new: int) -> int:
        """How many cached positions a forward of `n_new` tokens reads."""
        return int(self.lengths.max()) + n_new

    def write(self, layer: int, positions: torch.Tensor, *tensors: torch.Tensor) -> None:
        """Store new (B, H_kv, T, D) tensors of `layer` at per-row `positions` (B, T)."""
        index = positions[:, None, :, None].expand_as(tensors[0])  # (B, H_kv, T, D)
        for buffer, new in zip(self.buffers, tensors):
            buffer[layer].scatter_(2, index, new.to(buffer.dtype))

    def read(self, layer: int, length: int) -> list[torch.Tensor]:
        """The stored streams of `layer` for positions 0..length-1: each (B, H_kv, length, D)."""
        return [buffer[layer, :, :, :length] for buffer in self.buffers]

    def rotation_workspace(self, length: int, dtype: torch.dtype = torch.complex64) -> torch.Tensor:
        """Scratch for one layer's rotated keys, (B, H_kv, length, D/2) complex, reused by every layer.

        Only a K = V cache with rotary positions needs it (keys are rotated when read); it is
        working memory, not stored tokens, so it is counted in `workspace_nbytes`, not `nbytes`.
        """
        if self._workspace is None or self._workspace.dtype != dtype:
            B, H, T, D = self.buffers[0].shape[1:]
            self._workspace = torch.empty(B, H, T, D // 2, dtype=dtype, device=self.buffers[0].device)
        return self._workspace[:, :, :length]

    @property
    def workspace_nbytes(self) -> int:
        """Bytes of the rotation workspace (0 until a rotary K = V layer reads the cache)."""
        ws = self._workspace
        return 0 if ws is None else ws.numel() * ws.element_size()

    def advance(self, n_new: int) -> None:
        self.lengths += n_new

    def set_lengths(self, lengths: torch.Tensor | list[int]) -> None:
        """Rewind rows to their true lengths (after a right-padded batched prefill)."""
        self.lengths = torch.as_tensor(lengths, dtype=torch.long).cpu().clone()

    def reset(self) -> None:
        self.lengths.zero_()
