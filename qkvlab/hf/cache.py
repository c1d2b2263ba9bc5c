"""A `transformers.Cache` over qkvlab's `KVCache`: one stored stream when K = V, grouped heads only.

Hugging Face's own caches store a key and a value tensor per layer, so a K = V model would keep
two copies of the same tensor. `QkvlabCache` hands `generate` the cache the qkvlab model writes
itself: `KVCache` (`n_layers, B, H_kv, max_len, D` per stream, 1 or 2 streams). It is allocated
at the first forward pass for the length `generate` will reach (when known) and grows by doubling
otherwise; `nbytes` is what it holds.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from qkvlab.arch import ModelConfig
from qkvlab.errors import QkvlabError
from qkvlab.nn.kv_cache import KVCache


class QkvlabCache(Cache):
    """transformers' cache interface for a qkvlab decoder; the tensors live in `self.kv` (a `KVCache`)."""

    is_compileable = False

    def __init__(self, config: ModelConfig, max_len: int | None = None):
        try:
            super().__init__(layers=[])
        except TypeError:  # transformers before the layered Cache
            super().__init__()
        self.config = config
        self.hint = None if max_len is None else max(1, min(int(max_len), config.max_seq_len))
        self.kv: KVCache | None = None
        self.columns = 0  # input columns consumed, padding included (what Hugging Face calls the sequence length)

    # --- what the qkvlab model uses ------------------------------------------------------
    def reserve(self, batch: int, n_new: int, dtype: torch.dtype, device: torch.device) -> KVCache:
        """The KVCache, allocated or grown so that every row can take `n_new` more tokens."""
        limit = self.config.max_seq_len
        stored = 0 if self.kv is None else self.kv.longest
        need = stored + n_new
        if need > limit:
            raise QkvlabError(f"sequence length {need} exceeds the model's max_seq_len {limit}")
        if self.kv is not None and self.kv.batch_size != batch:
            raise QkvlabError(f"the cache holds batch {self.kv.batch_size}, got batch {batch}")
        if self.kv is None or need > self.kv.max_len:
            size = max(need, self.hint or 0, 2 * self.kv.max_len if self.kv is not None else 0)
            c = self.config
            new = KVCache(c.n_layers, batch, c.n_kv_heads, c.resolved_head_dim, min(size, limit),
                          c.spec.cache_streams, dtype, device)
            if self.kv is not None:
                for old, buf in zip(self.kv.buffers, new.buffers, strict=True):
                    buf[:, :, :, : old.shape[3]] = old
                new.set_lengths(self.kv.lengths)
            self.kv = new
        return self.kv

    @property
    def nbytes(self) -> int:
        """Bytes of the stored key/value tensors (0 before the first forward pass)."""
        return 0 if self.kv is None else self.kv.nbytes

    @property
    def streams(self) -> int:
        return self.config.spec.cache_streams

    # --- transformers' Cache interface ---------------------------------------------------
    def __len__(self) -> int:
        return self.config.n_layers

    def __repr__(self) -> str:
        return (f"QkvlabCache({self.config.variant}, streams={self.streams}, tokens={self.columns}, "
                f"nbytes={self.nbytes})")

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        raise NotImplementedError("QkvlabCache is written by the qkvlab model itself (qkvlab.nn.Attention)")

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.columns

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.config.max_seq_len

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.columns + query_length, 0

    @property
    def batch_size(self) -> int:
        return -1 if self.kv is None else self.kv.batch_size

    @property
    def is_initialized(self) -> bool:
        return self.kv is not None

    @property
    def is_croppable(self) -> bool:
        return False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("QkvlabCache cannot be cropped (assisted decoding is not supported)")

    def reset(self) -> None:
        if self.kv is not None:
            self.kv.reset()
        self.columns = 0

    def _select(self, index: torch.Tensor) -> None:
        if self.kv is None:
            return
        for i, buf in enumerate(self.kv.buffers):
            self.kv.buffers[i] = buf.index_select(1, index.to(buf.device))
        self.kv.set_lengths(self.kv.lengths.index_select(0, index.cpu()))
        self.kv._workspace = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.kv is not None:
            self._select(torch.arange(self.kv.batch_size).repeat_interleave(repeats))
