"""Weights from other codebases into qkvlab models, one module per external format.

- `qkvlab.interop.paper`: the study's own language-model checkpoints (`torch.save` dicts, GPT-2 names).
- `qkvlab.interop.llama`: Hugging Face `LlamaForCausalLM` directories (rotary, RMSNorm, SwiGLU, GQA).

Hugging Face GPT-2 directories are read by `qkvlab.convert.load_gpt2`. Every importer returns a
`GPT` in the source's own variant, or converted to the variant asked for (`qkvlab.convert`).
"""

from qkvlab.interop.llama import llama_from_state_dict, load_llama
from qkvlab.interop.paper import load_paper, paper_from_state_dict, read_paper_checkpoint

__all__ = ["llama_from_state_dict", "load_llama", "load_paper", "paper_from_state_dict", "read_paper_checkpoint"]
