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
    """The directory of fetched dataset `name`; a QkvlabError naming the fetch command if absent,
    or naming the damaged file and the repair command if a file differs from what READY.json records."""
    path = dataset_dir(name, root)
    if not (path / READY).is_file():
        raise QkvlabError(f"dataset {name!r} is not in the cache {cache_root(root)}; "
                          f"fetch it with: {fetch_command(name, root)}")
    broken = problems(path)
    if broken:
        raise QkvlabError(damaged(name, root, broken))
    return path


def damaged(name: str, root: str | os.PathLike | None, broken: list[str]) -> str:
    more = f" (and {len(broken) - 1} more)" if len(broken) > 1 else ""
    return (f"dataset {name!r} is damaged: {broken[0]}{more}; repair it with: "
            f"{fetch_command(name, root)} --force")


def file_manifest(path: Path) -> dict[str, dict]:
    """{relative path: {"bytes", "sha256"}} of every file under `path` (recorded in READY.json)."""
    from qkvlab.atomic import sha256_file

    return {p.relative_to(path).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(path.rglob("*")) if p.is_file() and p.name != READY}


def problems(path: Path, hashes: bool = False) -> list[str]:
    """What is wrong with the dataset at `path` against its READY.json: missing or truncated files
    (sizes always; sha256 too with `hashes`). Caches fetched before READY.json listed its files are
    checked against their token shards' meta.json and the .npy headers."""
    try:
        files = read_ready(path).get("files")
    except QkvlabError as err:
        return [str(err)]
    if not isinstance(files, dict):
        return _structural_problems(path)
    found = []
    for rel, expected in files.items():
        file = path / rel
        if not file.is_file():
            found.append(f"{file} is missing")
        elif file.stat().st_size != expected.get("bytes"):
            found.append(f"{file} has {file.stat().st_size} bytes, READY.json records {expected.get('bytes')}")
        elif hashes and expected.get("sha256"):
            from qkvlab.atomic import sha256_file

            if sha256_file(file) != expected["sha256"]:
                found.append(f"{file} does not match its sha256 in READY.json")
    return found


def _structural_problems(path: Path) -> list[str]:
    """Sizes implied by a token directory's meta.json and by .npy headers (for older caches)."""
    import numpy as np

    from qkvlab.data.tokens import META, shard_sizes

    found = []
    if (path / META).is_file():
        try:
            shards = shard_sizes(path, read_json(path / META, dict, "a token directory's metadata"))
        except QkvlabError as err:
            return [str(err)]
        for file, _, size in (s for split in shards.values() for s in split):
            if not file.is_file() or file.stat().st_size != size:
                found.append(f"{file} is missing or not {size} bytes as {META} records")
    for file in sorted(path.glob("*.npy")):
        try:
            with open(file, "rb") as f:
                major, _ = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shape, _, dtype = read_header(f)
                size = f.tell() + int(np.prod(shape)) * dtype.itemsize
        except (OSError, ValueError) as err:
            found.append(f"{file} is not a readable .npy file ({err})")
            continue
        if file.stat().st_size != size:
            found.append(f"{file} has {file.stat().st_size} bytes, its header implies {size}")
    return found


def read_json(path: Path, kind: type, what: str):
    """The JSON value of `path`, which must be a `kind`; a one-line error naming the file otherwise."""
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise QkvlabError(f"{path} is not valid JSON ({what}): {err}") from None
    if not isinstance(value, kind):
        raise QkvlabError(f"{path} must hold a JSON {kind.__name__} ({what}), not {type(value).__name__}")
    return value


def read_ready(path: Path) -> dict:
    return read_json(path / READY, dict, "a dataset's completion record")


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
