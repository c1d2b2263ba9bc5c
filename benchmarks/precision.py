"""float32 against bfloat16 autocast training steps, on each task's own model, batches and optimizer.

Both sides start from the same weights and take the same batches; steps are timed in interleaved
rounds (float32, bfloat16, bfloat16, float32, ...) in one process, so machine noise hits both alike.
Also times the pieces behind the result: a matrix product at the quick models' shapes, and the
attention kernel's forward + backward in each precision (the trainer runs attention in float32 under
CPU autocast, `qkvlab.nn.attention`). Prints medians and bfloat16 / float32 (below 1 = faster).

    python benchmarks/precision.py                          # every quick task, QKV, one thread
    python benchmarks/precision.py --tasks shakespeare-char --rounds 9
"""

from __future__ import annotations

import argparse
import contextlib
import copy

import torch
import torch.nn.functional as F

from qkvlab.bench.peers import interleaved as bench_interleaved
from qkvlab.models import build_model
from qkvlab.train.config import load_config, resolve_run
from qkvlab.train.optim import build_optimizer
from qkvlab.train.trainer import cpu_has_native_bf16

TASKS = ["sort-32", "mnist", "set-anomaly", "segmentation-42", "shakespeare-char"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=TASKS)
    p.add_argument("--preset", default="quick")
    p.add_argument("--variant", default="QKV")
    p.add_argument("--rounds", type=int, default=6, help="interleaved timing rounds")
    p.add_argument("--steps", type=int, default=8, help="training steps per side per round")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the sweeps run one per process)")
    return p.parse_args()


def interleaved(sides: dict, rounds: int, n: int) -> dict[str, float]:
    """Median seconds per call of each side: `qkvlab bench`'s interleaving (order rotating every round), each
    measurement `n` calls, after one untimed call of each side."""
    for fn in sides.values():
        fn()
    batches = {name: (lambda fn=fn: [fn() for _ in range(n)]) for name, fn in sides.items()}
    return {name: t / n for name, t in bench_interleaved(batches, rounds, torch.device("cpu")).items()}


def autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def task_steps(task_name: str, args) -> dict[str, float]:
    run = resolve_run(load_config(None, [f"task={task_name}", f"preset={args.preset}", f"variant={args.variant}"]))
    task, bs = run.task, run.config.train.batch_size
    torch.manual_seed(0)
    model = (getattr(task, "build_model", None) or build_model)(run.model)
    models = {"float32": model, "bfloat16": copy.deepcopy(model)}
    opts = {name: build_optimizer(m, run.config.optim) for name, m in models.items()}
    batches = [task.train_batch(i, bs, 0) for i in range(args.steps)]
    cursor = {name: 0 for name in models}

    def step(name: str):
        def one() -> None:
            m, opt = models[name], opts[name]
            with autocast(name == "bfloat16"):
                loss = task.loss(m, batches[cursor[name] % len(batches)])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            cursor[name] += 1
        return one

    return interleaved({name: step(name) for name in models}, args.rounds, args.steps)


def kernels(rounds: int) -> None:
    a, b = torch.randn(2048, 128), torch.randn(128, 384)  # the character LM's fused QKV projection
    mm = {"float32": lambda: a @ b}
    ab, bb = a.bfloat16(), b.bfloat16()
    mm["bfloat16"] = lambda: ab @ bb
    t = interleaved(mm, rounds, 20)
    flops = 2 * a.shape[0] * a.shape[1] * b.shape[1]
    print(f"matmul 2048x128 @ 128x384: float32 {flops / t['float32'] / 1e9:6.1f} GFLOP/s, "
          f"bfloat16 {flops / t['bfloat16'] / 1e9:6.1f} GFLOP/s  "
          f"(bfloat16 / float32 time {t['bfloat16'] / t['float32']:.2f})")
    q = torch.randn(32, 8, 64, 16)  # (B, H, T, D): the character LM's attention
    sides = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        qkv = [q.to(dtype).clone().requires_grad_() for _ in range(3)]
        sides[name] = (lambda qkv=qkv: F.scaled_dot_product_attention(*qkv, is_causal=True).float().sum().backward())
    t = interleaved(sides, rounds, 10)
    print(f"SDPA forward + backward (32 x 8 heads x 64 x 16, causal): float32 {t['float32'] * 1e3:.2f} ms, "
          f"bfloat16 {t['bfloat16'] * 1e3:.2f} ms  (bfloat16 / float32 {t['bfloat16'] / t['float32']:.2f})")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s); bfloat16 in hardware: {cpu_has_native_bf16()}; "
          f"medians over {args.rounds} interleaved rounds of {args.steps} steps")
    kernels(args.rounds)
    for name in args.tasks:
        t = task_steps(name, args)
        print(f"{name:18s} float32 {t['float32'] * 1e3:8.2f} ms/step   bfloat16 autocast {t['bfloat16'] * 1e3:8.2f} "
              f"ms/step   ratio {t['bfloat16'] / t['float32']:.3f}  ({t['float32'] / t['bfloat16']:.2f}x faster)")


if __name__ == "__main__":
    main()
