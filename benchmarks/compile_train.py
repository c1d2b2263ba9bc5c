"""Eager against `torch.compile` training steps on a task's own model, batches and optimizer.

Both models start from the same weights and take the same batches; steps are timed in
interleaved rounds (eager, compiled, eager, ...) in one process, so machine noise hits both
alike. Compilation (the first compiled steps) is timed apart: it is paid once per run, and on
a short run it can cost more than it saves. Prints medians and compiled / eager (below 1 = faster).

    python benchmarks/compile_train.py                                   # shakespeare-char, quick recipe
    python benchmarks/compile_train.py --task mnist --variant Q-K=V --threads 1
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from qkvlab.models import build_model
from qkvlab.train.config import load_config, resolve_run
from qkvlab.train.optim import build_optimizer


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="shakespeare-char")
    p.add_argument("--preset", default="quick")
    p.add_argument("--variant", default="QKV")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    p.add_argument("--steps", type=int, default=10, help="training steps per side per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed compiled steps (compilation) before timing")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the study runs one per process)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    run = resolve_run(load_config(None, [f"task={args.task}", f"preset={args.preset}", f"variant={args.variant}"]))
    task, bs = run.task, run.config.train.batch_size
    torch.manual_seed(0)
    eager = (getattr(task, "build_model", None) or build_model)(run.model)
    compiled = copy.deepcopy(eager)
    compiled.compile()
    sides = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        opt = build_optimizer(model, run.config.optim)
        sides[name] = (model, opt)
    batches = [task.train_batch(i, bs, 0) for i in range(args.steps)]

    def run_steps(name: str, n: int) -> float:
        model, opt = sides[name]
        model.train()
        start = time.perf_counter()
        for i in range(n):
            loss = task.loss(model, batches[i % len(batches)])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return (time.perf_counter() - start) / n

    t0 = time.perf_counter()
    run_steps("compiled", args.warmup)
    compile_s = time.perf_counter() - t0
    run_steps("eager", 1)
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for r in range(args.rounds):
        order = ("eager", "compiled") if r % 2 == 0 else ("compiled", "eager")
        for name in order:
            times[name].append(run_steps(name, args.steps))
    params = sum(p.numel() for p in eager.parameters())
    print(f"torch {torch.__version__}, {args.threads} thread(s); {args.task} {args.preset} {args.variant}: "
          f"{params:,} parameters, batch {bs}; median over {args.rounds} interleaved rounds of {args.steps} steps")
    print(f"compilation (first {args.warmup} compiled steps): {compile_s:.1f} s")
    base = statistics.median(times["eager"])
    for name in ("eager", "compiled"):
        med = statistics.median(times[name])
        print(f"{name:9s} {med * 1e3:8.2f} ms/step   ratio {med / base:.3f}")
    saved = base - statistics.median(times["compiled"])
    if saved > 0:
        print(f"break-even after {compile_s / saved:,.0f} steps (compilation / time saved per step)")


if __name__ == "__main__":
    main()
