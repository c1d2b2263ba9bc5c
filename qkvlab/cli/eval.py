"""`qkvlab eval MODEL --tasks T1,T2`: lm-evaluation-harness on local task data, offline."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from qkvlab.errors import QkvlabError, check


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="evaluate a decoder with lm-evaluation-harness on local tasks (offline)",
        description="Run lm-evaluation-harness tasks through its Hugging Face model class (HFLM) on a saved "
                    "decoder (export, checkpoint or run directory) or a Hugging Face directory written by "
                    "`qkvlab export`. Nothing is downloaded: tasks read data on disk (a task YAML with "
                    "`dataset_path: json` and `dataset_kwargs: {data_files: ...}` under --include-path). "
                    "Needs `pip install qkvlab[eval]`.")
    p.add_argument("model", help="run, checkpoint or export directory, or a Hugging Face export directory")
    p.add_argument("--tasks", required=True, help="comma-separated task names")
    p.add_argument("--include-path", default=None, help="directory of task YAML files")
    p.add_argument("--builtin-tasks", action="store_true",
                   help="also index lm-eval's own tasks when --include-path is given (slow; their data must "
                        "already be in the local Hugging Face datasets cache)")
    p.add_argument("--limit", type=int, default=None, help="at most N examples per task")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tokenizer", default=None,
                   help="for qkvlab checkpoints (a Hugging Face export carries its own): gpt2, stdlib-bpe, "
                        "shakespeare, ptb, bytes, a tokenizer.json or a token directory")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or mps")
    p.add_argument("--output", default=None, help="also write the results as JSON to this file")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=run)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_model_and_tokenizer(path: str, tokenizer_name: str | None, device):
    """(Hugging Face model, tokenizer) for a Hugging Face export or any qkvlab decoder checkpoint."""
    from qkvlab.hf.export import hf_tokenizer, is_hf_dir, load_hf, to_hf

    if is_hf_dir(path):
        model, tokenizer = load_hf(path)
        if tokenizer_name is not None:
            from qkvlab.data.tokenizer import load_tokenizer
            tokenizer = hf_tokenizer(load_tokenizer(tokenizer_name))
    else:
        from qkvlab.models.gpt import GPT
        from qkvlab.models.io import load_model
        from qkvlab.models.tokenizer import model_tokenizer

        tok = model_tokenizer(path, tokenizer_name)  # the recorded one; --tokenizer must agree with it
        qmodel = load_model(path)
        if not isinstance(qmodel, GPT):
            raise QkvlabError(f"{path!r} holds a {qmodel.config.kind} model; eval needs a decoder")
        model, tokenizer = to_hf(qmodel), (hf_tokenizer(tok) if tok is not None else None)
    if tokenizer is None:
        raise QkvlabError(f"{path!r} has no tokenizer; pass --tokenizer (or export with --tokenizer)")
    if len(tokenizer) > model.config.vocab_size:
        raise QkvlabError(f"the tokenizer has {len(tokenizer)} tokens but the model only {model.config.vocab_size}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.convert_ids_to_tokens(0)
    return model.to(device).eval(), tokenizer


def run(args: argparse.Namespace) -> int:
    os.environ["HF_DATASETS_OFFLINE"] = "1"  # before lm_eval imports datasets: never download
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    check(tasks, f"--tasks {args.tasks!r} names no task")
    check(args.limit is None or args.limit >= 1, f"--limit must be >= 1, got {args.limit}")
    check(args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}")
    check(args.num_fewshot is None or args.num_fewshot >= 0, f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    if args.include_path is not None and not Path(args.include_path).is_dir():
        raise QkvlabError(f"--include-path {args.include_path} is not a directory")
    from qkvlab.cli.generate import resolve_device

    device = resolve_device(args.device)
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise QkvlabError(f"qkvlab eval needs lm-evaluation-harness: pip install 'qkvlab[eval]' ({err})") from None
    model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer, device)
    builtin = args.include_path is None or args.builtin_tasks  # indexing lm-eval's own tasks takes a while
    manager = TaskManager(include_path=args.include_path, include_defaults=builtin)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        hint = " (pass --include-path DIR for your own task YAML files)" if args.include_path is None else \
            f"; tasks found: {', '.join(sorted(manager.all_tasks)[:20]) or 'none'}"
        raise QkvlabError(f"unknown task(s) {', '.join(unknown)}{hint}")
    prefix = next((t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
                   if t is not None), 0)  # what an empty context is conditioned on
    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=args.batch_size, device=str(device),
              max_length=model.config.max_position_embeddings, prefix_token_id=prefix)
    try:
        results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=args.limit,
                                          num_fewshot=args.num_fewshot, log_samples=False, bootstrap_iters=0)
    except QkvlabError:
        raise
    except (FileNotFoundError, ConnectionError) as err:
        raise QkvlabError(f"a task's data could not be read offline: {str(err).splitlines()[0]}") from None
    except Exception as err:  # lm-eval reports a malformed task YAML or data file in many ways
        reason = str(err).splitlines()[0] if str(err) else ""
        raise QkvlabError(f"lm-eval failed on {', '.join(tasks)}: {type(err).__name__}: {reason}") from None
    table = {task: {k.split(",")[0]: v for k, v in metrics.items() if k not in ("alias", "sample_len") and _finite(v)}
             for task, metrics in results["results"].items()}
    if args.output:
        from qkvlab.atomic import atomic_write_json
        atomic_write_json(args.output, {"model": args.model, "tasks": tasks, "limit": args.limit, "results": table,
                                        "n_samples": results.get("n-samples", {})})
    if args.json:
        print(json.dumps(table, indent=2, sort_keys=True))
    else:
        width = max(len(t) for t in table) if table else 4
        for task, metrics in table.items():
            print(f"{task:<{width}}  " + "  ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
    if not table:
        print("no metrics were produced", file=sys.stderr)
        return 1
    return 0
