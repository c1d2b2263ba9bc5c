"""Export a decoder with its compact KV cache as program state for ExecuTorch (`.pte`).

The `.pte` holds one program with four methods over the same `StaticDecoder` as the `.pt2` export
(`qkvlab.deploy.pt2`), but here the cache is *state of the program* rather than arguments: its
tensors are mutable buffers shared by the methods (`share_mutable_buffers`), so a device runner
passes only tokens and positions:

    reset()                   -> zeros (1,)    zero every cache tensor (call once after loading)
    prefill(tokens (1, T), start (1,)) -> logits (1, V)    T in 2..max_context
    decode(token (1, 1), start (1,))   -> logits (1, V)
    metadata()                -> uint8 tensor, the UTF-8 JSON of `qkvlab.deploy.pt2.metadata` + the format

The cache tensors are those of the `.pt2` export (per stream the values (L, 1, H_kv, C, D) and, for
int8, bfloat16 scales (L, 1, H_kv, C)), memory-planned once for the program: exactly
`qkvlab.cost.cache_bytes(config, variant, C, 1, dtype)` bytes. Kernels are ExecuTorch's portable
CPU kernels (no delegate). Needs the `executorch` package: `pip install 'qkvlab[deploy]'`
(executorch 1.5.1 with torchao 0.18 alongside torch 2.13.0 is the tested pairing).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from qkvlab.atomic import atomic_write_bytes, check_output
from qkvlab.deploy.pt2 import StaticDecoder, metadata
from qkvlab.errors import QkvlabError, check

FORMAT = "qkvlab-pte/1"
EXTRA = "pip install 'qkvlab[deploy]' (executorch==1.5.1, torchao==0.18.*)"
METHODS = ("reset", "prefill", "decode", "metadata")


@contextlib.contextmanager
def _quiet():
    """Silence the import-time chatter of torchao/torch (missing optional CUDA kernels, deprecations)."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree", "executorch")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@contextlib.contextmanager
def _stderr_to_devnull():
    """Hide ExecuTorch's native logging (cpuinfo probing on first use, load failures that become our error),
    written to file descriptor 2 or, through the Python bindings, to `sys.stderr`."""
    import io
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _first_line(err: BaseException, limit: int = 160) -> str:
    """`TypeName: first line of the message` (messages of native code run over many lines)."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:limit]}" if lines else type(err).__name__


def require_executorch(what: str = "--format executorch") -> None:
    """A one-line error naming the extra to install unless `executorch` imports."""
    try:
        with _quiet():
            import executorch.exir  # noqa: F401
    except Exception as err:  # ImportError, or a broken install (an incompatible torch)
        raise QkvlabError(f"{what} needs the executorch package ({_first_line(err, 100)}); "
                          f"install it with {EXTRA}") from None


class _CacheState(nn.Module):
    """The cache tensors as buffers `cache_<name>`: the same names in every method, so they share memory."""

    def __init__(self, decoder: StaticDecoder):
        super().__init__()
        self.names = [name for name, _, _ in decoder.cache_specs()]
        for name, tensor in zip(self.names, decoder.empty_cache(), strict=True):
            self.register_buffer("cache_" + name, tensor)

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, "cache_" + name) for name in self.names]


class StatefulDecoder(_CacheState):
    """`StaticDecoder` whose cache is held as mutable buffers: forward(idx, start) -> logits (1, V)."""

    def __init__(self, decoder: StaticDecoder):
        super().__init__(decoder)
        self.decoder = decoder

    def forward(self, idx: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        return self.decoder(idx, start, *self.tensors())


class ResetCache(_CacheState):
    """forward() zeroes the cache buffers (same names as `StatefulDecoder`'s); returns a dummy (1,) tensor."""

    def forward(self) -> torch.Tensor:
        for tensor in self.tensors():
            tensor.zero_()
        return torch.zeros(1)


def export_methods(decoder: StaticDecoder) -> dict[str, torch.export.ExportedProgram]:
    """torch.export of reset, prefill (dynamic T in 2..C) and decode (T = 1) over the buffered cache."""
    stateful = StatefulDecoder(decoder).eval()
    start = torch.zeros(1, dtype=torch.long)
    T = torch.export.Dim("T", min=2, max=decoder.max_context)
    with torch.no_grad():
        prefill = torch.export.export(stateful, (torch.zeros(1, 2, dtype=torch.long), start),
                                      dynamic_shapes=({1: T}, None), strict=False)
        decode = torch.export.export(stateful, (torch.zeros(1, 1, dtype=torch.long), start), strict=False)
        reset = torch.export.export(ResetCache(decoder), (), strict=False)
    return {"reset": reset, "prefill": prefill, "decode": decode}


def lower(decoder: StaticDecoder) -> bytes:
    """The `.pte` bytes of `decoder`: its methods lowered to ExecuTorch, the cache buffers shared between them."""
    require_executorch()
    with _quiet():
        from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
        from executorch.exir.passes import MemoryPlanningPass
        from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

        programs = export_methods(decoder)
        meta = json.dumps({**metadata(decoder), "format": FORMAT}).encode()
        try:
            edge = to_edge_transform_and_lower(
                programs, constant_methods={"metadata": torch.tensor(list(meta), dtype=torch.uint8)})
            program = edge.to_executorch(ExecutorchBackendConfig(
                # prefill's activations are planned for its largest prompt (max_context), not the example's
                sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
                memory_planning_pass=MemoryPlanningPass(share_mutable_buffers=True),
                emit_mutable_buffer_names=True))
            return bytes(program.buffer)
        except Exception as err:  # an operator or dtype ExecuTorch cannot lower: one line, not its traceback
            dtype = str(decoder.cache_dtype).removeprefix("torch.")
            raise QkvlabError(f"ExecuTorch could not lower this {decoder.config.variant} model (cache {dtype}): "
                              f"{_first_line(err)}") from None


def export_executorch(run: str | os.PathLike, out: str | os.PathLike, max_context: int | None = None,
                      cache_dtype: str | None = None, force: bool = False) -> dict:
    """Export the decoder saved at `run` to an ExecuTorch program `out` (.pte); returns a summary."""
    from qkvlab.models.gpt import GPT
    from qkvlab.models.io import load_model

    out = Path(out)
    check(out.suffix == ".pte", f"--out {out} must end in .pte")
    require_executorch()
    check_output(out, force, sources=[run])
    model = load_model(Path(run), "cpu")
    if not isinstance(model, GPT):
        kind = getattr(getattr(model, "config", None), "kind", type(model).__name__)
        raise QkvlabError(f"{run} holds a {kind} model; export needs a decoder")
    context = model.config.max_seq_len if max_context is None else max_context
    decoder = StaticDecoder(model, context, cache_dtype)
    started = time.perf_counter()
    data = lower(decoder)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, data)
    return {"out": str(out), "bytes": len(data), "seconds": time.perf_counter() - started,
            "variant": model.config.variant, "max_context": context,
            "cache_dtype": str(decoder.cache_dtype).removeprefix("torch."),
            "cache_bytes": sum(math.prod(s) * torch.empty(0, dtype=d).element_size()
                               for _, s, d in decoder.cache_specs())}


class PteRunner:
    """Prefill and decode from a `.pte` with the ExecuTorch runtime (no qkvlab model code).

    `prefill(idx, start)` and `decode(idx, start)` return the logits (1, V); the cache lives in the
    loaded program, so `reset()` before each new sequence (it zeroes the cache)."""

    def __init__(self, path: str | os.PathLike):
        require_executorch("running a .pte")
        path = Path(path)
        check(path.is_file(), f"{path} is not a file")
        with _quiet(), _stderr_to_devnull():  # a damaged file also logs natively; it becomes the error below
            from executorch.runtime import Runtime

            try:
                program = Runtime.get().load_program(path)
                check(set(METHODS) <= set(program.method_names),
                      f"{path} is not a qkvlab ExecuTorch export (methods {sorted(program.method_names)})")
                raw = program.load_method("metadata").execute([])[0]
                meta = json.loads(bytes(raw.tolist()).decode())
                self._methods = {name: program.load_method(name) for name in ("reset", "prefill", "decode")}
            except QkvlabError:
                raise
            except Exception as err:  # a foreign or damaged file
                raise QkvlabError(f"{path} is not a qkvlab ExecuTorch export ({_first_line(err, 120)})") from None
        check(meta.get("format") == FORMAT, f"{path} is not a qkvlab ExecuTorch export (format {meta.get('format')!r})")
        self.program = program
        self.metadata = meta
        self.config = json.loads(meta["config"])
        self.max_context = int(meta["max_context"])
        self.vocab_size = int(meta["vocab_size"])
        self.specs = [(s["name"], tuple(s["shape"]), getattr(torch, s["dtype"])) for s in json.loads(meta["cache"])]
        with _stderr_to_devnull():  # the first call sets up the kernels' thread pool, which logs its CPU probing
            self.decode(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
        self.reset()

    @property
    def cache_nbytes(self) -> int:
        return sum(math.prod(shape) * torch.empty(0, dtype=dtype).element_size() for _, shape, dtype in self.specs)

    def _run(self, name: str, inputs: list[torch.Tensor]) -> torch.Tensor:
        try:
            return self._methods[name].execute(inputs)[0]
        except Exception as err:  # a kernel missing from this runtime build, a bad shape
            raise QkvlabError(f"the ExecuTorch runtime failed in {name}: {_first_line(err)}") from None

    def reset(self) -> None:
        self._run("reset", [])

    def prefill(self, idx: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        return self._run("prefill", [idx, start])

    def decode(self, idx: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        return self._run("decode", [idx, start])

    def generate(self, prompt: list[int], config) -> list[int]:
        """Continue one prompt (greedy or sampled as `config` says) from a zeroed cache."""
        from qkvlab.deploy.pt2 import generate_with

        self.reset()
        return generate_with(self.prefill, self.decode, [], prompt, config, self.max_context, self.vocab_size)
