"""`qkvlab analyze MODEL`: how similar a model's queries, keys and values are, and how asymmetric its scores, per layer.

Inputs are a held-out batch of a task: `--task`, else the task recorded in the run's config.yaml.
Random inputs only with `--random-inputs` (then labelled as such: they say little about a trained model).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from qkvlab.errors import QkvlabError, check

COLUMNS = ("layer", "cos_qk", "cos_qv", "cos_kv", "rank_q", "rank_k", "rank_v", "asym")
MEMORY_LIMIT = 2 * 1024 ** 3  # bytes the analysis of one batch may need
MAX_BATCH = 4096


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="cosine similarity and effective rank of Q, K, V, score asymmetry per layer",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="export, checkpoint or run directory")
    p.add_argument("--task", default=None,
                   help="take held-out inputs from this task (default: the task in the run's config.yaml)")
    p.add_argument("--random-inputs", action="store_true",
                   help="feed random inputs instead of task data (labelled as such in the output)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--batch", type=int, default=8, help="examples analysed (default 8; bounded by memory)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def _run_config(path: Path) -> dict | None:
    """The config.yaml of the run `path` belongs to (a run, checkpoint or weights path), if any."""
    import yaml

    for candidate in (path, *path.parents)[:4]:
        cfg = candidate / "config.yaml"
        if cfg.is_file():
            try:
                data = yaml.safe_load(cfg.read_text())
            except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
                raise QkvlabError(f"cannot read {str(cfg)!r}: {str(err).splitlines()[0]}") from None
            return data if isinstance(data, dict) else None
    return None


def analysis_bytes(cfg, batch: int) -> int:
    """Rough peak memory of analysing `batch` examples: captured layer inputs, Q/K/V (float64 copies) and scores."""
    t = cfg.n_patches + 1 if cfg.kind == "vit" else cfg.max_seq_len
    width = max(cfg.d_model, cfg.n_heads * cfg.resolved_head_dim)
    per_example = 4 * t * (cfg.n_layers * cfg.d_model + 12 * width) + 8 * 3 * cfg.n_heads * t * t
    return batch * per_example


def check_batch(cfg, batch: int) -> None:
    """--batch must be positive and fit `MEMORY_LIMIT`."""
    check(batch >= 1, f"--batch must be a positive integer, got {batch}")
    per = analysis_bytes(cfg, 1)
    cap = max(1, min(MAX_BATCH, MEMORY_LIMIT // per))
    check(batch <= cap, f"--batch {batch} is too large for this model: at most {cap} "
                        f"(about {per * batch / 1024 ** 3:.1f} GiB needed, limit {MEMORY_LIMIT / 1024 ** 3:.0f} GiB)")


def random_inputs(cfg, batch: int, seed: int):
    import torch

    gen = torch.Generator().manual_seed(seed)
    if cfg.kind == "vit":
        return torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen)  # (B, C, H, W)
    if cfg.input_dim is not None:
        return torch.randn(batch, cfg.max_seq_len, cfg.input_dim, generator=gen)  # (B, T, input_dim)
    return torch.randint(0, cfg.vocab_size, (batch, cfg.max_seq_len), generator=gen)  # (B, T)


def run(args: argparse.Namespace) -> int:
    from qkvlab.analysis import held_out_inputs, projection_similarity, summarize_layers
    from qkvlab.models.io import load_model
    from qkvlab.table import emit
    from qkvlab.train.runs import load_task

    if args.batch < 1:
        raise QkvlabError(f"--batch must be a positive integer, got {args.batch}")
    if args.random_inputs and args.task is not None:
        raise QkvlabError("give --task or --random-inputs, not both")
    path = Path(args.model)
    check(path.exists(), f"model {args.model!r} does not exist")
    model = load_model(path)
    cfg = model.config
    check_batch(cfg, args.batch)
    kwargs: dict[str, Any]
    if args.random_inputs:
        source = "RANDOM INPUTS (not task data; --random-inputs)"
        inputs, kwargs = (random_inputs(cfg, args.batch, args.seed),), {}
    else:
        name, data_dir = args.task, args.data_dir
        if name is None:
            run_cfg = _run_config(path if path.is_dir() else path.parent)
            name = run_cfg.get("task") if run_cfg else None
            check(isinstance(name, str) and name != "",
                  f"{args.model!r} records no task (no run config.yaml); pass --task NAME, "
                  "or --random-inputs to analyse random inputs")
            data_dir = data_dir or (run_cfg or {}).get("data_dir")
        task = load_task(name, data_dir)
        inputs, kwargs = held_out_inputs(model, task, args.batch, f"model {args.model!r}")
        source = f"held-out batch of task {name!r}"
    layers = [{c: r[c] for c in COLUMNS} for r in projection_similarity(model, *inputs, **kwargs)]
    check(len(layers) > 0, f"{args.model!r} has no attention layers to analyse")
    mean = summarize_layers(layers)
    rows: list[dict[str, Any]] = [*layers, {"layer": "mean", **{c: mean[c] for c in COLUMNS[1:]}}]
    if args.json:
        import json
        import math

        clean = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
                 for r in rows]
        print(json.dumps({"inputs": source, "random_inputs": bool(args.random_inputs), "batch": args.batch,
                          "layers": clean}, indent=1, allow_nan=False))
    else:
        print(f"inputs: {source}, {args.batch} examples")
        emit(rows, as_json=False)
    return 0
