"""Building blocks: the attention module for every variant, the KV cache, positions, blocks."""

from qkvlab.nn.attention import Attention, AttentionContext
from qkvlab.nn.kv_cache import KVCache

__all__ = ["Attention", "AttentionContext", "KVCache"]
