"""Hugging Face interoperability: export a qkvlab decoder for `transformers` (and lm-eval).

Importing this package registers the `qkvlab` model type with `AutoConfig` and
`AutoModelForCausalLM`, so `AutoModelForCausalLM.from_pretrained(DIR)` loads an export
(`qkvlab export RUN --format hf --out DIR`); without importing it, pass `trust_remote_code=True`
(the export carries small modeling files that import qkvlab). `--format gpt2` and `--format llama`
write the stock `GPT2LMHeadModel` / `LlamaForCausalLM` formats, which need no qkvlab at all.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from qkvlab.hf.cache import QkvlabCache
from qkvlab.hf.configuration import MODEL_TYPE, QkvlabConfig
from qkvlab.hf.modeling import QkvlabForCausalLM


def _register() -> None:
    try:
        AutoConfig.register(MODEL_TYPE, QkvlabConfig)
    except ValueError:  # already registered (a reload, or the remote-code module)
        pass
    try:
        AutoModelForCausalLM.register(QkvlabConfig, QkvlabForCausalLM)
    except ValueError:
        pass


_register()

__all__ = ["QkvlabCache", "QkvlabConfig", "QkvlabForCausalLM"]
