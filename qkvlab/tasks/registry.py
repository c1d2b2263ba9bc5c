"""The study's tasks by name, the suites `qkvlab reproduce` runs, and the variants of each task.

Synthetic task names take an optional length suffix: "reverse" is length 64, "reverse-256"
length 256. `data_dir` is where user-supplied datasets live (CIFAR, TinyImageNet, WikiText-103; for
"tokens" the token directory itself) and, for fetched datasets, a cache to look in before the default one.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

from qkvlab.data.cache import is_ready
from qkvlab.data.cifar import load_cifar
from qkvlab.data.images import ImageSet
from qkvlab.data.mnist import load_mnist
from qkvlab.data.tinyimagenet import load_tinyimagenet
from qkvlab.data.wikitext import STANDARD_VOCAB, find_wikitext, wikitext_tokens
from qkvlab.errors import QkvlabError
from qkvlab.tasks.anomaly import OneClassTask, SetAnomalyTask
from qkvlab.tasks.base import Budget, Task
from qkvlab.tasks.language import LanguageModelTask
from qkvlab.tasks.segmentation import SegmentationTask
from qkvlab.tasks.synthetic import TASKS as SYNTHETIC
from qkvlab.tasks.synthetic import SyntheticTask
from qkvlab.tasks.vision import Augment, ClassificationTask

DEFAULT_LENGTH = 64
BASE_VARIANTS = ["QKV", "Q=K-V", "Q-K=V", "Q=K=V", "Q=X"]
PLUS_VARIANTS = ["Q=K-V+", "Q=K=V+"]
HEAD_SHARING_VARIANTS = ["GQA-4", "MQA", "Q-GQA-4", "Q-MQA"]


def _cache(name: str, data_dir: str | os.PathLike | None) -> str | os.PathLike | None:
    """`data_dir` when it holds fetched dataset `name`, else None (the default cache)."""
    return data_dir if data_dir is not None and is_ready(name, data_dir) else None


def _mnist(name: str, data_dir) -> Callable[[], ImageSet]:
    return lambda: load_mnist(name, _cache(name, data_dir))


def _token_dir(name: str, data_dir) -> Callable[[], str]:
    def path() -> str:
        from qkvlab.data.cache import require
        return str(require(name, _cache(name, data_dir)))
    return path


def _user_tokens(data_dir) -> Callable[[], str]:
    def path() -> str:
        if data_dir is None:
            raise QkvlabError("task 'tokens' reads a token directory: pass --data-dir DIR, made with "
                              "`qkvlab data tokenize --tokenizer gpt2 --out DIR FILES...`")
        return str(data_dir)
    return path


def _wikitext(data_dir, bpe: bool = False) -> Callable[[], str]:
    """WikiText-103 from `data_dir` as words, or as GPT-2 BPE (the tokenizer from the cache)."""
    def path() -> str:
        if not bpe:
            return str(wikitext_tokens(data_dir))
        from qkvlab.data.tokenizer import gpt2_tokenizer
        try:
            tok = gpt2_tokenizer(_cache("gpt2", data_dir))
        except QkvlabError as err:
            raise QkvlabError(f"task 'wikitext-103-bpe' tokenizes with GPT-2's BPE: {err}") from None
        return str(wikitext_tokens(data_dir, tok))
    return path


def _wikitext_vocab(data_dir) -> int | None:
    """None (the converted files tell) when the files are there, else the standard files' vocabulary."""
    try:
        find_wikitext(data_dir)
    except QkvlabError:
        return STANDARD_VOCAB
    return None


def _synthetic(kind: str) -> Callable[[str | None], Task]:
    return lambda d: SyntheticTask(kind, DEFAULT_LENGTH, name=kind)


# Word and subword corpora (vocabularies of 10,000 and 8,192): the output layer costs four times the
# char model's body per token, so the quick recipe reads half the tokens per step (docs/tasks.md).
CORPUS_BUDGETS = {"quick": Budget(steps=500, batch_size=16, lr=5e-3, eval_every=0, warmup_steps=60)}


def _builders() -> dict[str, Callable[[str | None], Task]]:
    pad2, pad4 = Augment(pad=2), Augment(pad=4, flip=True)
    b: dict[str, Callable[[str | None], Task]] = {}
    for kind in SYNTHETIC:
        b[kind] = _synthetic(kind)
    b["mnist"] = lambda d: ClassificationTask("mnist", _mnist("mnist", d), 28, 1, 7, 10, pad2)
    b["fashion-mnist"] = lambda d: ClassificationTask("fashion-mnist", _mnist("fashion-mnist", d), 28, 1, 7, 10,
                                                      Augment(pad=2, flip=True))
    b["cifar10"] = lambda d: ClassificationTask("cifar10", lambda: load_cifar("cifar10", d), 32, 3, 4, 10, pad4)
    b["cifar100"] = lambda d: ClassificationTask("cifar100", lambda: load_cifar("cifar100", d), 32, 3, 4, 100, pad4)
    b["tinyimagenet"] = lambda d: ClassificationTask("tinyimagenet", lambda: load_tinyimagenet(d), 64, 3, 8, 200,
                                                     Augment(pad=8, flip=True))
    b["set-anomaly"] = lambda d: SetAnomalyTask("set-anomaly", _mnist("mnist", d))
    b["set-anomaly-fashion"] = lambda d: SetAnomalyTask("set-anomaly-fashion", _mnist("fashion-mnist", d))
    b["oneclass-mnist"] = lambda d: OneClassTask("oneclass-mnist", _mnist("mnist", d))
    b["oneclass-fashion"] = lambda d: OneClassTask("oneclass-fashion", _mnist("fashion-mnist", d))
    b["segmentation"] = lambda d: SegmentationTask("segmentation", _mnist("mnist", d), canvas=56, n_digits=3)
    b["segmentation-42"] = lambda d: SegmentationTask("segmentation-42", _mnist("mnist", d), canvas=42, n_digits=2)
    b["shakespeare-char"] = lambda d: LanguageModelTask("shakespeare-char", _token_dir("shakespeare", d), 84)
    b["ptb-word"] = lambda d: LanguageModelTask("ptb-word", _token_dir("ptb", d), 10_000, budgets=CORPUS_BUDGETS)
    b["stdlib-bpe"] = lambda d: LanguageModelTask("stdlib-bpe", _token_dir("python-stdlib", d), 8192,
                                                  budgets=CORPUS_BUDGETS)
    b["shakespeare-gpt2"] = lambda d: LanguageModelTask("shakespeare-gpt2", _token_dir("shakespeare-gpt2", d), 50257)
    b["tokens"] = lambda d: LanguageModelTask("tokens", _user_tokens(d))
    b["wikitext-103"] = lambda d: LanguageModelTask("wikitext-103", _wikitext(d), _wikitext_vocab(d))
    b["wikitext-103-bpe"] = lambda d: LanguageModelTask("wikitext-103-bpe", _wikitext(d, bpe=True), 50257)
    return b


_BUILDERS = _builders()
_SUFFIX = re.compile(r"^(?P<kind>[a-z]+)-(?P<length>\d+)$")

SUITES: dict[str, list[str]] = {
    "tiny": ["reverse-16", "shakespeare-char"],
    # longest runs first, so two processes finish together
    "quick": ["shakespeare-char", "segmentation-42", "mnist", "set-anomaly", "sort-32"],
    "full": [*SYNTHETIC, *(f"{k}-256" for k in SYNTHETIC if k != "recall"),
             "mnist", "fashion-mnist", "set-anomaly", "set-anomaly-fashion", "oneclass-mnist", "oneclass-fashion",
             "segmentation", "shakespeare-char", "ptb-word", "stdlib-bpe", "shakespeare-gpt2"],
}


def task_names() -> list[str]:
    """Every registered name, and the suffixed synthetic names the suites use."""
    names = list(_BUILDERS)
    for suite in SUITES.values():
        names += [n for n in suite if n not in names]
    return names


def get_task(name: str, data_dir: str | None = None) -> Task:
    """A new task by name (data is read on first use, never fetched)."""
    if name in _BUILDERS:
        return _BUILDERS[name](data_dir)
    match = _SUFFIX.match(name)
    if match and match["kind"] in SYNTHETIC:
        return SyntheticTask(match["kind"], int(match["length"]), name=name)
    raise QkvlabError(f"unknown task {name!r}; accepted: {', '.join(task_names())} "
                      f"(synthetic tasks take a length suffix, e.g. reverse-128)")


def variants_for(task: Task, plus: bool = True) -> list[str]:
    """The variants the study runs on `task`: the five projection forms, the "+" forms where
    attention is not causal (unless `plus` is false), and head sharing (GQA-4, MQA, Q-GQA-4,
    Q-MQA) for language models."""
    variants = list(BASE_VARIANTS)
    if plus and not task.causal:
        variants += PLUS_VARIANTS
    if task.family == "lm":
        variants += HEAD_SHARING_VARIANTS
    return variants


def data_for(names: list[str]) -> list[str]:
    """The fetchable datasets the tasks `names` read (for `qkvlab data fetch`)."""
    needs = {**dict.fromkeys(["mnist", "set-anomaly", "oneclass-mnist", "segmentation", "segmentation-42"], "mnist"),
             **dict.fromkeys(["fashion-mnist", "set-anomaly-fashion", "oneclass-fashion"], "fashion-mnist"),
             "shakespeare-char": "shakespeare", "ptb-word": "ptb", "stdlib-bpe": "python-stdlib",
             "shakespeare-gpt2": "shakespeare-gpt2", "wikitext-103-bpe": "gpt2"}
    out: list[str] = []
    for n in names:
        if n in needs and needs[n] not in out:
            out.append(needs[n])
    return out


def missing_data(names: list[str], data_dir: str | None = None) -> list[str]:
    """The fetchable datasets the tasks `names` read that are in neither `data_dir` nor the cache."""
    return [d for d in data_for(names) if not is_ready(d, _cache(d, data_dir))]
