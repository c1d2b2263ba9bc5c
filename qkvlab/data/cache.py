"""Where fetched data lives, how a dataset is marked complete, and atomic writes.

Layout: `<root>/<dataset>/` holds `raw/` (the verified files taken from the package) and the
converted arrays; `READY.json`, written last, marks it complete. `<root>` is `$QKVLAB_DATA`, or
`$XDG_CACHE_HOME/qkvlab`, or `~/.cache/qkvlab`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from qkvlab.errors import QkvlabError

READY = "READY.json"


def cache_root(data_dir: str | os.PathLike | None = None) -> Path:
    """The cache directory: `data_dir` if given, else `$QKVLAB_DATA`, else the user's cache dir."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    if os.environ.get("QKVLAB_DATA"):
        return Path(os.environ["QKVLAB_DATA"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qkvlab"


def dataset_dir(name: str, root: str | os.PathLike | None = None) -> Path:
    return cache_root(root) / name


def is_ready(name: str, root: str | os.PathLike | None = None) -> bool:
    return (dataset_dir(name, root) / READY).is_file()


def fetch_command(name: str, root: str | os.PathLike | None = None) -> str:
    """The command that fetches `name` into `root` (as a user would type it)."""
    if root is None or cache_root(root) == cache_root():
        return f"qkvlab data fetch {name}"
    return f"QKVLAB_DATA={cache_root(root)} qkvlab data fetch {name}"


def require(name: str, root: str | os.PathLike | None = None) -> Path:
    """The directory of fetched dataset `name`; a QkvlabError naming the fetch command if absent."""
    path = dataset_dir(name, root)
    if not (path / READY).is_file():
        raise QkvlabError(f"dataset {name!r} is not in the cache {cache_root(root)}; "
                          f"fetch it with: {fetch_command(name, root)}")
    return path


def read_ready(path: Path) -> dict:
    return json.loads((path / READY).read_text())


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
