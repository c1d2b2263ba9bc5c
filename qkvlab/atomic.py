"""Atomic writes: a reader sees the old file (or directory) or the new one, never half of one.

Temporary files and directories are created beside their destination and get the permissions
the user's umask gives ordinary files (``mkstemp``/``mkdtemp`` would make them private). An
``OSError`` while writing (a full disk, a file-size limit, no permission) becomes a one-line
`QkvlabError` saying what could not be written; the destination is left as it was.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from qkvlab.errors import QkvlabError

_WRAPPED_ERRNO = re.compile(r"\(os error (\d+)\)")
_FULL = (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC))


def umask() -> int:
    """The process's umask (read without changing it for longer than one call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_error(path: str | os.PathLike, err: OSError) -> QkvlabError:
    """A one-line error for an `OSError` raised while writing `path` (nothing was replaced)."""
    reason = err.strerror or str(err) or type(err).__name__
    if err.errno in _FULL:
        return QkvlabError(f"could not write {path}: {reason}; nothing was lost (previous files are intact)")
    where = f" ({err.filename})" if err.filename and str(err.filename) != str(path) else ""
    return QkvlabError(f"could not write {path}: {reason}{where}; nothing was replaced")


def as_os_error(err: BaseException) -> OSError | None:
    """`err` if it is an OSError, or the OSError a library wrapped in its message
    (safetensors: "... I/O error: File too large (os error 27)"); None otherwise."""
    if isinstance(err, OSError):
        return err
    found = _WRAPPED_ERRNO.search(str(err))
    return OSError(int(found.group(1)), os.strerror(int(found.group(1)))) if found else None


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory entry (a rename inside it) to disk; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """Delete a file or a directory tree, ignoring what is already gone."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to a temporary file next to `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise write_error(path, err) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            Path(tmp).unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, data) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _sweep_stale(final: Path) -> None:
    """Remove `.NAME.tmp-PID-*` / `.NAME.old-PID` leftovers of writers that were killed."""
    pattern = re.compile(rf"^\.{re.escape(final.name)}\.(?:tmp|old)-(\d+)(?:-.*)?$")
    with contextlib.suppress(OSError):
        for entry in final.parent.iterdir():
            m = pattern.match(entry.name)
            if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
                _remove(entry)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `final`; on success it replaces `final` in one rename.

    On an exception (or SIGINT/SIGTERM, which the CLI turns into exceptions) `final` is untouched
    and the temporary directory is removed; after a `kill -9` it is left as a hidden
    `.NAME.tmp-PID-*` that readers ignore and the next write to `final` removes.
    """
    final = Path(final)
    tmp: Path | None = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        _sweep_stale(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
        os.chmod(tmp, 0o777 & ~umask())
        yield tmp
        fsync_dir(tmp)
        old = None
        if final.exists() or final.is_symlink():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        if old is not None:
            _remove(old)
    except Exception as err:
        os_err = as_os_error(err)
        if os_err is None or (os_err.filename and Path(os.path.abspath(final.parent))
                              not in Path(os.path.abspath(os_err.filename)).parents):
            raise  # not a failed write of ours (e.g. reading an input): the caller reports it
        raise write_error(final, os_err) from None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def check_output(out: str | os.PathLike, force: bool, sources: Iterable[str | os.PathLike] = (),
                 flag: str = "--out") -> Path:
    """Refuse to write `out` where that would destroy something the user did not ask to replace.

    An existing file or non-empty directory needs `force`; an input (`sources`) can never be the
    output, nor contain it or lie inside it, even with `force`.
    """
    out_path = Path(out).expanduser()
    target = _resolved(out_path)
    for src in sources:
        source = _resolved(src)
        if target == source or source in target.parents or target in source.parents:
            relation = ("is" if target == source else "is inside" if source in target.parents else "contains")
            raise QkvlabError(f"{flag} {out} {relation} the input {src}; choose another output directory")
    if out_path.is_symlink() or out_path.exists():
        if out_path.is_dir() and not out_path.is_symlink() and not any(out_path.iterdir()):
            return out_path
        if not force:
            kind = "directory" if out_path.is_dir() else "file"
            raise QkvlabError(f"{flag} {out} is an existing {kind}; choose a new path, or pass --force to replace it")
    return out_path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
