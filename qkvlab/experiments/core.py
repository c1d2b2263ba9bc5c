"""The core experiment: every projection variant on every task family, with seeds.

The five projection forms (QKV, Q=K-V, Q-K=V, Q=K=V, Q=X) run on every task; the "+" forms on the
directional synthetic task (sorting: a position must attend to the element of a given rank, not
to whoever attends to it; the paper defines "+" for non-causal tasks, and the causal mask already
gives a language model direction, so "+" there is an option, `--variants`, not a default); head sharing (GQA-4, MQA,
Q-GQA-4, Q-MQA) on character-level language modelling. Word-level (PTB) and subword (BPE)
language modelling compare QKV with Q-K=V, the variant that halves the cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from qkvlab.experiments.plan import PlannedRun, planned
from qkvlab.tasks.registry import BASE_VARIANTS, HEAD_SHARING_VARIANTS, PLUS_VARIANTS

NAME = "core"
TASKS = ("shakespeare-char", "segmentation-42", "mnist", "set-anomaly", "sort-32", "ptb-word", "stdlib-bpe")
DIRECTIONAL = ("sort-32",)  # and causal LM with --variants Q=K-V+,Q=K=V+ (the paper defines "+" for non-causal)
GROUPED_ON = ("shakespeare-char",)
CORPUS_VARIANTS = ("QKV", "Q-K=V")  # PTB words, BPE subwords: the K=V question at other vocabularies
CORPORA = ("ptb-word", "stdlib-bpe")


def task_variants(task: str) -> list[str]:
    """The variants the core experiment trains on `task`."""
    if task in CORPORA:
        return list(CORPUS_VARIANTS)
    variants = list(BASE_VARIANTS)
    if task in DIRECTIONAL:
        variants += PLUS_VARIANTS
    if task in GROUPED_ON:
        variants += HEAD_SHARING_VARIANTS
    return variants


def plan(root: Path, seeds: Sequence[int], preset: str = "quick", tasks: Sequence[str] | None = None,
         variants: Sequence[str] | None = None, overrides: Sequence[str] = ()) -> list[PlannedRun]:
    runs: list[PlannedRun] = []
    for task in tasks or TASKS:
        runs += planned(root, NAME, "", [task], list(variants or task_variants(task)), seeds, preset, overrides)
    return runs
