"""One process per run (or sweep) directory, and child processes that die with their parent.

`DirLock` is an advisory `fcntl.flock` on ``DIR/.qkvlab.lock``, which holds the owner's pid. The
kernel drops the lock when its owner dies (also after `kill -9`), so a lock file left behind by a
dead process is taken over, with a message. A second process gets a one-line error naming the
directory and the owner's pid.

A sweep starts its runs with `child_preexec` (on Linux the child gets SIGTERM when the sweep
dies, via ``prctl(PR_SET_PDEATHSIG)``) and with `PARENT_ENV` set, which makes `qkvlab train`
also poll its parent (`watch_parent`) — the fallback where prctl does not exist.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time
from pathlib import Path

from qkvlab.atomic import pid_alive
from qkvlab.errors import QkvlabError

LOCK = ".qkvlab.lock"
PARENT_ENV = "QKVLAB_DIE_WITH_PARENT"
_PR_SET_PDEATHSIG = 1

try:
    import fcntl
except ImportError:  # not POSIX: no locking
    fcntl = None  # type: ignore[assignment]  # the module is optional: None means no locking



def _read_pid(fd: int) -> int | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 64).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None


class DirLock:
    """Exclusive ownership of a directory by this process (a context manager; created if missing)."""

    def __init__(self, directory: str | Path, what: str = "run directory"):
        self.directory = Path(directory)
        self.path = self.directory / LOCK
        self.what = what
        self._fd: int | None = None
        self._created: list[Path] = []  # directories made for the lock, removed again if left empty

    def acquire(self) -> DirLock:
        if fcntl is None or self._fd is not None:
            return self
        if self.directory.exists() and not self.directory.is_dir():
            raise QkvlabError(f"{self.what} {str(self.directory)!r} is an existing file, not a directory")
        try:
            self._created = [p for p in [self.directory, *self.directory.parents] if not p.exists()]
            self.directory.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    owner = _read_pid(fd)
                    os.close(fd)
                    who = f"pid {owner}" if owner else "another process"
                    raise QkvlabError(f"{self.what} {str(self.directory)!r} is in use by another qkvlab process "
                                      f"({who}); wait for it to finish or stop it") from None
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)  # the owner released and removed the file meanwhile: lock the new one
            stale = _read_pid(fd)
            if stale is not None and stale != os.getpid():
                state = "no longer running" if not pid_alive(stale) else "no longer holding it"
                print(f"qkvlab: taking over the lock of {str(self.directory)!r} from pid {stale} ({state})",
                      file=sys.stderr, flush=True)
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as err:
            raise QkvlabError(f"cannot lock {self.what} {str(self.directory)!r}: {err.strerror or err}") from None
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # still locked: nobody else can own this file right now
        except OSError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None
        for path in self._created:  # deepest first; stops at the first one something was written into
            try:
                path.rmdir()
            except OSError:
                break
        self._created = []

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        return libc.prctl
    except (OSError, AttributeError):
        return None


def child_preexec():
    """A `preexec_fn` for `subprocess.Popen`: the child gets SIGTERM when this process dies (Linux).

    prctl is resolved here, before the fork, so the child only calls it; a parent that died before
    the call is caught by comparing the child's parent pid with ours.
    """
    prctl, parent = _prctl(), os.getpid()

    def preexec() -> None:
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


_watching = False


def watch_parent(interval: float = 0.5) -> None:
    """When `PARENT_ENV` is set: terminate this process (SIGTERM) soon after its parent dies."""
    global _watching
    if os.environ.get(PARENT_ENV) != "1" or _watching:
        return  # one watcher per process (a sweep worker trains many runs)
    _watching = True
    parent = os.getppid()

    def poll() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=poll, name="qkvlab-watch-parent", daemon=True).start()
