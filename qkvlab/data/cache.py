"""Where fetched data lives, how a dataset is marked complete, and atomic writes.

Layout: `<root>/<dataset>/` holds `raw/` (the verified files taken from the package) and the
converted arrays; `READY.json`, written last, marks it complete. `<root>` is `$QKVLAB_DATA`, or
`$XDG_CACHE_HOME/qkvlab`, or `~/.cache/qkvlab`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
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


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp dir beside `final`; on success it replaces `final` in one rename."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
