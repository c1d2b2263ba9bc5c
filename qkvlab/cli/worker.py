"""A sweep's worker process: trains runs one after another, as `qkvlab train` would, in one interpreter.

It lives in `cli` because it runs the command line itself (`qkvlab.cli.main`); a sweep (layer `train`)
only starts it by name, never imports it.

Starting a process costs a training run about 5 s on a CPU (importing PyTorch and TorchDynamo, which the
optimizers import, and loading the task's data); a quick sweep of 29 short runs paid it 29 times. A
sweep (`qkvlab.train.sweep`) keeps one worker per job slot instead and hands it runs over stdin, one
JSON line each: {"args": [qkvlab train arguments], "log": path}. The worker runs `qkvlab train ARGS`
with its file descriptors 1 and 2 sent to the run's log, exactly as a separate process would write it,
and answers on its original stdout with {"rc": exit code}. A run's result does not depend on what the
worker ran before (every run re-seeds its generators and sets its threads; tested). A worker that dies
(a crash, the out-of-memory killer) fails only the run it held; the sweep starts a new one.

    python -m qkvlab.cli.worker   # not for users: `qkvlab sweep` and `qkvlab reproduce` start it
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def _output_to(log: Path) -> Iterator[None]:
    """File descriptors 1 and 2 (Python's and C's output alike) appended to `log` for the block."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "a", encoding="utf-8") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def train_one(args: list[str], log: Path) -> int:
    """`qkvlab train ARGS` in this process, its output appended to `log`; its exit code."""
    from qkvlab.cli.main import main as cli_main

    with _output_to(log):
        try:
            return cli_main(["train", *args])
        except SystemExit as e:  # argparse's usage errors
            return e.code if isinstance(e.code, int) else 1
        except Exception as e:  # an unexpected error fails this run, not the worker  # noqa: BLE001
            import traceback

            traceback.print_exc()
            print(f"qkvlab: error: {type(e).__name__}: {e}", file=sys.stderr)
            return 1


def main() -> int:
    from qkvlab.train.lock import watch_parent

    replies = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")  # fd 1 itself goes to each run's log
    watch_parent()  # a worker ends with its sweep
    import torch  # noqa: F401  # paid once here, not once per run

    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        code = train_one(list(request["args"]), Path(request["log"]))
        replies.write(json.dumps({"rc": code}) + "\n")
        if code == 130:  # interrupted: the sweep is stopping
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
