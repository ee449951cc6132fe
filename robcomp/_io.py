"""Files: atomic writes and appends with ordinary permissions, the one cache directory, and an
exclusive lock on an output directory. Every file robcomp (and bench/) writes goes through here.

``tempfile.mkstemp`` creates files readable by their owner only (0600); a result file a user
shares should get the same permissions as any other file they write (0666 minus the umask), so
:func:`atomic_path` sets them before the rename.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = ["atomic_path", "write_text_atomic", "write_json_atomic", "append_text_atomic", "umask_mode", "cache_dir",
           "DirectoryLock", "DirectoryBusyError"]


def cache_dir() -> Path:
    """Where robcomp keeps what it can recompute (trained checkpoints, dispatch decisions):
    ``$ROBCOMP_CACHE_DIR``, else ``$XDG_CACHE_HOME/robcomp``, else ``~/.cache/robcomp``. Not created here."""
    root = os.environ.get("ROBCOMP_CACHE_DIR", "").strip()
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "robcomp"


def umask_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file (0666 minus the umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary sibling of ``path`` to write; on success it gets the umask's
    permissions and replaces ``path`` in one rename; on failure it is removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: str | os.PathLike, text: str, *, parents: bool = False) -> Path:
    """Replace ``path`` by ``text`` (UTF-8) atomically, fsynced before the rename; ``parents``
    creates the missing directories first."""
    path = Path(path)
    if parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    return path


def write_json_atomic(path: str | os.PathLike, obj: Any, *, parents: bool = False, **dumps: Any) -> Path:
    """:func:`write_text_atomic` of ``json.dumps(obj, **dumps)``."""
    return write_text_atomic(path, json.dumps(obj, **dumps), parents=parents)


def append_text_atomic(path: str | os.PathLike, text: str, *, keep: Callable[[str], str] = lambda old: old) -> None:
    """Append ``text`` to ``path`` by replacing the file with ``keep(old) + text`` in one rename: a
    crash leaves the old file or the new one, never half a line. ``keep`` trims what the old
    content must lose first (e.g. a partial last line an interrupted writer left)."""
    path = Path(path)
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    write_text_atomic(path, keep(old) + text)


class DirectoryBusyError(RuntimeError):
    """Another process holds the lock on the output directory."""


class DirectoryLock:
    """Exclusive, non-blocking lock on ``directory`` (an ``flock`` on ``directory/.robcomp.lock``).

    The operating system releases it when the holder exits, even after ``kill -9``, so a stale
    lock file never blocks a later run. The file holds the holder's pid for the error message.
    Where ``fcntl`` does not exist (Windows) the directory is not locked, with a warning.
    """

    NAME = ".robcomp.lock"

    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory) / self.NAME
        self._fd: int | None = None

    def acquire(self) -> "DirectoryLock":
        try:
            import fcntl
        except ImportError:
            import warnings

            warnings.warn(f"cannot lock {self.path.parent} on this platform (no fcntl): do not start two runs "
                          "into it at once", stacklevel=2)
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, umask_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DirectoryBusyError(
                f"{self.path.parent} is in use by another robcomp run (pid {holder}): wait for it to finish "
                "or pass another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
