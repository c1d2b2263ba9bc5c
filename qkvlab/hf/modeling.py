"""`QkvlabForCausalLM`: a qkvlab decoder as a Hugging Face `PreTrainedModel` that `generate` can drive.

The weights are the qkvlab model's own (`model.` + its state-dict names), so nothing is
re-implemented: the forward pass is `qkvlab.models.GPT`'s, and the cache `generate` uses is a
`QkvlabCache` around qkvlab's `KVCache` (one stored stream when K = V).

Padding: a row's attention mask must be contiguous ones (left or right padding, as `generate` and
lm-eval use). The real tokens of each row are moved to the front before the forward pass, so every
row starts at position 0 and continues from its own cached length, as `qkvlab.generate` does; the
outputs are put back in the caller's layout.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from qkvlab.errors import QkvlabError
from qkvlab.hf.cache import QkvlabCache
from qkvlab.hf.configuration import QkvlabConfig
from qkvlab.models.gpt import GPT
from qkvlab.nn.positions import PairBias, SinusoidalPositions

_FIELDS = getattr(CausalLMOutputWithPast, "__dataclass_fields__", {})
CACHE_FIELD = "cache" if "cache" in _FIELDS else "past_key_values"  # renamed in transformers 5.x


class QkvlabPreTrainedModel(PreTrainedModel):
    config_class = QkvlabConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["Block"]

    @torch.no_grad()
    def _init_weights(self, module):
        """Fixed tables (not stored in the weights file) are recomputed; the rest as transformers does."""
        if isinstance(module, PairBias):
            fresh = PairBias(module.max_len, module.dim)
            module.rel.copy_(fresh.rel)
            module.abs.copy_(fresh.abs)
            if not getattr(module.weight, "_is_hf_initialized", False):
                module.weight.copy_(fresh.weight)
                module.bias.zero_()
        elif isinstance(module, SinusoidalPositions):
            n, dim = module.table.shape
            module.table.copy_(SinusoidalPositions(n, dim).table)
        else:
            super()._init_weights(module)


class QkvlabForCausalLM(QkvlabPreTrainedModel, GenerationMixin):
    """A qkvlab GPT under `self.model`; `forward(input_ids, attention_mask, cache, labels)` -> logits."""

    def __init__(self, config: QkvlabConfig):
        super().__init__(config)
        self.model = GPT(config.model_config, seed=0)
        if config.tie_word_embeddings:
            self._tied_weights_keys = {"model.lm_head.weight": "model.tok_emb.weight"}
        self.post_init()

    @property
    def qkvlab_config(self):
        return self.model.config

    def get_input_embeddings(self):
        return self.model.tok_emb

    def set_input_embeddings(self, value):
        self.model.tok_emb = value

    def get_output_embeddings(self):
        return self.model.lm_head

    def set_output_embeddings(self, value):
        self.model.lm_head = value

    def make_cache(self, max_len: int | None = None) -> QkvlabCache:
        """An empty Hugging Face cache for this model (sized on first use; `max_len` a hint)."""
        return QkvlabCache(self.model.config, max_len)

    # --- generation hooks ----------------------------------------------------------------
    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """Give `generate` a QkvlabCache wherever it would have made a DynamicCache."""
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        for key in ("cache", "past_key_values"):
            if type(model_kwargs.get(key)) is DynamicCache:
                model_kwargs[key] = self.make_cache(generation_config.max_length)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      inputs_embeds=None, **kwargs):
        cache = kwargs.pop("cache", None) or past_key_values
        if inputs_embeds is not None and (cache is None or cache.get_seq_length() == 0):
            raise QkvlabError("qkvlab models generate from input_ids, not inputs_embeds")
        if cache is not None:
            input_ids = input_ids[:, cache.get_seq_length():]  # the columns not yet in the cache
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": kwargs.get("use_cache")}
        inputs[CACHE_FIELD] = cache
        return inputs

    # --- forward ---------------------------------------------------------------------------
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                past_key_values: QkvlabCache | None = None, use_cache: bool | None = None,
                labels: torch.LongTensor | None = None, inputs_embeds: torch.Tensor | None = None,
                logits_to_keep: int = 0, return_dict: bool | None = None, **kwargs) -> CausalLMOutputWithPast:
        """Logits (B, T, V) for `input_ids` (B, T) continuing `cache` (when given or `use_cache`).

        `attention_mask` (B, cached columns + T) marks real tokens (1) and padding (0).
        """
        cache = kwargs.pop("cache", None) or past_key_values
        if inputs_embeds is not None:
            raise QkvlabError("qkvlab models take input_ids, not inputs_embeds")
        if input_ids is None:
            raise QkvlabError("input_ids is required")
        if cache is not None and not isinstance(cache, QkvlabCache):
            raise QkvlabError(f"a qkvlab model needs its own cache (model.make_cache()), got {type(cache).__name__}")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and not self.training:
            cache = self.make_cache()
        ids: torch.Tensor = input_ids  # reordered below when rows are left-padded
        B, T = ids.shape
        gpt = self.model
        order = n_real = None
        if attention_mask is not None:
            real = attention_mask[:, -T:].to(torch.bool)  # (B, T)
            if not bool(real.all()):
                # real tokens first in each row (stable), so each row starts where its cache ends
                order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)  # (B, T)
                n_real = real.sum(dim=1).cpu()
                ids = ids.gather(1, order)
        kv = None
        if cache is not None:
            param = gpt.tok_emb.weight
            kv = cache.reserve(B, T, param.dtype, param.device)
            before = kv.lengths.clone()
        h = gpt.hidden(ids, kv)  # (B, T, C)
        if cache is not None and kv is not None:  # kv is reserved from the cache
            if n_real is not None:
                kv.set_lengths(before + n_real)  # padding written past a row's length is never read
            cache.columns += T
        if order is not None:
            h = torch.empty_like(h).scatter_(1, order[..., None].expand_as(h), h)  # back to the caller's layout
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = gpt.lm_head(h)  # (B, T, V)
        loss = None
        if labels is not None:
            shifted = logits[:, :-1].float()
            loss = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        returned: dict[str, Any] = {CACHE_FIELD: cache if use_cache else None}
        return CausalLMOutputWithPast(loss=loss, logits=logits, **returned)
