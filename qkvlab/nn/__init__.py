"""Building blocks: the attention module for every variant, the KV cache, position modules, blocks."""

from qkvlab.nn.attention import Attention, AttentionContext
from qkvlab.nn.kv_cache import KVCache
from qkvlab.nn.positions import PairBias, Rotary, SinusoidalPositions

__all__ = ["Attention", "AttentionContext", "KVCache", "PairBias", "Rotary", "SinusoidalPositions"]
