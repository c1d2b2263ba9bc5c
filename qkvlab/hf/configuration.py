"""The Hugging Face config of an exported qkvlab decoder: the `ModelConfig` as a `PretrainedConfig`.

The whole `ModelConfig` is kept under `qkvlab` (so the model is rebuilt exactly); the usual
Hugging Face fields (`vocab_size`, `hidden_size`, ...) are derived from it for tools that read them.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from qkvlab.arch import ModelConfig
from qkvlab.errors import QkvlabError

MODEL_TYPE = "qkvlab"


class QkvlabConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(self, qkvlab: dict | None = None, use_cache: bool = True, **kwargs):
        config = ModelConfig(**(qkvlab or {}))
        if config.kind != "decoder":
            raise QkvlabError(f"only decoders export to Hugging Face, got a {config.kind} model")
        self.qkvlab = config.to_dict()
        self.variant = config.variant
        self.vocab_size = config.vocab_size
        self.hidden_size = config.d_model
        self.num_hidden_layers = config.n_layers
        self.num_attention_heads = config.n_heads
        self.num_key_value_heads = config.n_kv_heads
        self.head_dim = config.resolved_head_dim
        self.max_position_embeddings = config.max_seq_len
        if config.rotary_fraction != 1.0:  # GPT-NeoX's rotary_pct under its Hugging Face name
            self.partial_rotary_factor = config.rotary_fraction
        self.use_cache = use_cache
        kwargs["tie_word_embeddings"] = config.tie_embeddings
        super().__init__(**kwargs)

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig(**self.qkvlab)

    @classmethod
    def from_qkvlab(cls, config: ModelConfig, **kwargs) -> QkvlabConfig:
        return cls(qkvlab=config.to_dict(), **kwargs)
