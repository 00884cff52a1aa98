"""Writing files so that nothing is lost: every file the package writes goes through
:func:`atomic_write` (or its helpers), and a run folder is held by one process at a time
(:class:`FolderLock`).

``atomic_write(path)`` writes a temporary file beside ``path`` (a name unique to this process and
call, so two writers never share one), flushes and fsyncs it, then renames it over ``path`` and
fsyncs the folder: a reader sees the old file or the new one, never a part, and a kill at any
point leaves the previous file intact (and at worst a ``.tmp`` file, which the next write does
not reuse). A full disk raises ``OSError(ENOSPC)`` naming the path, after removing the
temporary file.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import uuid
import warnings
import weakref
from typing import IO, Iterator, Optional

try:  # POSIX; elsewhere the folder lock is a no-op (with a warning)
    import fcntl
except ImportError:  # pragma: no cover - not on this project's machines
    fcntl = None

TMP_SUFFIX = ".tmp"


def _fsync_dir(folder: str) -> None:
    """Make a rename in ``folder`` durable (where the OS lets a folder be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def _no_space(path: str, e: OSError) -> OSError:
    return OSError(errno.ENOSPC, f"no space left on device writing {path} (the previous "
                                 f"version, if any, is intact; free space and retry)")


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb") -> Iterator[IO]:
    """A file object whose content replaces ``path`` atomically when the block ends without an
    error (``mode``: "wb" or "w"). On an error nothing at ``path`` changes."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write: mode must be 'wb' or 'w', got {mode!r}")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}."
                               f"{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC and \
                "no space left on device writing" not in str(e):  # (a nested write named it)
            raise _no_space(path, e) from e
        if isinstance(e, RuntimeError) and "unexpected pos" in str(e):
            # torch.save's zip writer reports a full disk this way
            raise _no_space(path, OSError(errno.ENOSPC, str(e))) from e
        raise
    _fsync_dir(folder)


def save_torch(obj, path: str) -> None:
    """``torch.save(obj, path)``, atomically."""
    import torch
    with atomic_write(path) as f:
        torch.save(obj, f)


def write_json(obj, path: str, indent: Optional[int] = 1) -> None:
    """``obj`` as JSON at ``path``, atomically."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")


def write_text(text: str, path: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def file_sha256(path: str, chunk_bytes: int = 1 << 22) -> str:
    """The SHA-256 of the file at ``path`` (what ``sha256sum`` prints), read in chunks (the
    integrity checks of checkpoints and cache shards)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_bytes), b""):
            h.update(block)
    return h.hexdigest()


class FolderInUseError(RuntimeError):
    """Another process holds the folder (FolderLock)."""


class FolderLock:
    """An exclusive OS lock on ``folder`` for the life of a run (``with FolderLock(folder):``, or
    ``acquire()`` / ``release()``): a second process that asks for it gets FolderInUseError
    naming the holder's pid. The OS releases it when the holder exits, however it exits (a
    killed run leaves no stale lock). The lock file ``.lock`` holds the holder's pid."""

    NAME = ".lock"

    def __init__(self, folder: str):
        self.folder = os.fspath(folder)
        self.path = os.path.join(self.folder, self.NAME)
        self._fd: Optional[int] = None

    def acquire(self) -> "FolderLock":
        if self._fd is not None:
            return self
        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        if fcntl is None:  # pragma: no cover
            warnings.warn("gsae_fast: no fcntl on this platform: run folders are not locked",
                          RuntimeWarning, stacklevel=2)
        else:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise FolderInUseError(
                    f"{self.folder} is in use by another run (process {holder}); wait for it to "
                    f"finish or stop it, or choose another output folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing drops the flock

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class HoldsFolder:
    """What holds a run folder's :class:`FolderLock` (a Trainer, a sweep) shares: the lock is
    taken by :meth:`_hold` and released by :meth:`close` (idempotent), the end of a ``with``
    block, or the holder's collection."""

    _lock: Optional[FolderLock] = None  # (None: no folder held, e.g. a rank other than 0)

    def _hold(self, folder: str) -> FolderLock:
        """The lock of ``folder``, released when this object is collected if close() was not
        called (the caller acquires it)."""
        self._lock = FolderLock(folder)
        self._release = weakref.finalize(self, self._lock.release)
        return self._lock

    def close(self) -> None:
        """Release the folder (idempotent): another run may then use it."""
        if self._lock is not None:
            self._lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
