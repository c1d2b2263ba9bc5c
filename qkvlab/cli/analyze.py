"""`qkvlab analyze MODEL [--task NAME]`: how similar a model's queries, keys and values are, per layer."""

from __future__ import annotations

import argparse

import torch

from qkvlab.analysis import projection_similarity
from qkvlab.cli.table import emit
from qkvlab.errors import QkvlabError
from qkvlab.models.io import load_model

COLUMNS = ("layer", "cos_qk", "cos_qv", "cos_kv", "rank_q", "rank_k", "rank_v")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="cosine similarity and effective rank of Q, K, V per layer",
                       description="Run a saved model on a batch and report, per layer, the mean cosine "
                                   "similarity of queries, keys and values of the same token, and the effective "
                                   "rank of each (the paper's evidence for K = V).")
    p.add_argument("model", help="export, checkpoint or run directory")
    p.add_argument("--task", default=None, help="take the inputs from this task's data (else random inputs)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def _inputs(model, args) -> torch.Tensor:
    cfg = model.config
    if args.task is not None:
        from qkvlab.tasks.registry import get_task

        task = get_task(args.task, args.data_dir)
        if hasattr(task, "context"):  # language models read windows of the model's context
            task.context = model.config.max_seq_len
        return task.model_inputs(task.train_batch(0, args.batch, args.seed))
    gen = torch.Generator().manual_seed(args.seed)
    if cfg.kind == "vit":
        return torch.randn(args.batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen)
    if cfg.input_dim is not None:
        return torch.randn(args.batch, cfg.max_seq_len, cfg.input_dim, generator=gen)
    return torch.randint(0, cfg.vocab_size, (args.batch, cfg.max_seq_len), generator=gen)


def run(args: argparse.Namespace) -> int:
    if args.batch < 1:
        raise QkvlabError(f"--batch must be a positive integer, got {args.batch}")
    model = load_model(args.model)
    rows = [{c: r[c] for c in COLUMNS} for r in projection_similarity(model, _inputs(model, args))]
    mean = {c: sum(r[c] for r in rows) / len(rows) for c in COLUMNS[1:]}
    emit(rows + [{"layer": "mean", **mean}], as_json=args.json)
    return 0
