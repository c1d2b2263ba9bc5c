"""Our decoders against Hugging Face GPT-2 / Llama (and litgpt's GPT when importable), side by side.

The same as `qkvlab bench` (measuring code: `qkvlab.bench.peers`): one process, interleaved repeats, medians;
training step, prefill, decode step at each (batch, context), peak memory, and utilisation against this machine's
measured read bandwidth and matmul throughput.

    python benchmarks/peers.py                                   # small defaults
    python benchmarks/peers.py --contexts 512 2048 8192 32768 --batches 1 4 16 --json peers.json
    python benchmarks/peers.py --shapes gpt2 --peers hf --layers 1 --d-model 32 --heads 2 --vocab 64 \
        --train-batch 2 --train-len 16 --prefill-len 16 --contexts 16 --batches 1 --repeats 2 --bandwidth-mib 8
"""

from __future__ import annotations

import argparse
import sys

from qkvlab.cli.bench import add_arguments, run
from qkvlab.errors import QkvlabError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except QkvlabError as err:
        print(f"peers.py: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
