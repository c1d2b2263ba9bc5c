"""The import layering of docs/architecture.md, enforced on the source: a module imports only
modules of lower layers (or of its own package), and the foundation imports no PyTorch."""

import ast
from pathlib import Path

import pytest

import qkvlab

ROOT = Path(qkvlab.__file__).parent

# Lower layers never import higher ones (function-level and TYPE_CHECKING imports included).
LAYERS = [
    ["errors", "table"],  # table: plain-text tables for every command
    ["variants", "atomic"],
    ["arch"],  # ModelConfig and presets: no PyTorch
    ["cost", "nn", "weights", "data"],  # cost: no PyTorch at import time
    ["models"],
    ["generate", "convert", "analysis", "tasks"],
    ["interop"],  # checkpoint formats: GPT-2, the paper's, Llama
    ["hf", "deploy", "train"],
    ["experiments", "bench"],
    ["cli"],
    ["__main__"],  # python -m qkvlab
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}
NO_TORCH = ("errors", "table", "variants", "atomic", "arch", "cost")  # importable without PyTorch


def _unit(module: str) -> str:
    """`qkvlab.nn.attention` -> `nn`; `qkvlab` itself -> ``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, module: str) -> list[tuple[str, int, bool]]:
    """(imported qkvlab/torch module, line, at module level) for every import statement in `path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            names = [".".join([*base, node.module] if node.module else base)]
        else:
            continue
        found += [(n, node.lineno, id(node) in top) for n in names]
    return found


def test_every_module_has_a_layer():
    units = {_unit(m) for m in _modules()} - {""}
    assert units <= set(RANK), f"add {sorted(units - set(RANK))} to LAYERS here and to docs/architecture.md"


@pytest.mark.parametrize("module", sorted(_modules()))
def test_no_module_imports_a_higher_layer(module):
    unit = _unit(module)
    if not unit:
        return  # qkvlab/__init__.py
    upward = [f"line {line}: {name}" for name, line, _ in _imports(_modules()[module], module)
              if name.startswith("qkvlab.") and _unit(name) != unit and RANK[_unit(name)] >= RANK[unit]]
    assert not upward, f"{module} (layer {RANK[unit]}) imports a module of its own or a higher layer: {upward}"


@pytest.mark.parametrize("module", [m for m in sorted(_modules()) if _unit(m) in NO_TORCH])
def test_the_foundation_imports_no_torch_at_module_level(module):
    # cost.measured_flops imports torch inside the function, only when asked to measure a model
    heavy = [f"line {line}: {name}" for name, line, top in _imports(_modules()[module], module)
             if top and name.split(".")[0] in ("torch", "numpy")]
    assert not heavy, f"{module} must import without PyTorch: {heavy}"
