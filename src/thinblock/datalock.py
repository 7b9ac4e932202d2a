"""The data directory's lock: one process at a time uses a data directory.

Two engines on one data directory would hand out the same LD regions to different writers, and
``thinblock metadata copy`` and ``thinblock check`` must not read a store a running daemon is
changing.  The lock is an exclusive ``flock`` on ``DATA_DIR/thinblock.lock``, which the kernel releases when the holder
closes it or dies (``kill -9`` leaves no stale lock); the file holds the holder's pid, for the
refusal's message."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from .errors import Conflict

LOCK_FILE = "thinblock.lock"


def lock_data_dir(data_dir: Path, *, user: str = "thinblock process") -> int:
    """An exclusive lock on ``data_dir`` for this process's lifetime (released when the returned
    fd is closed, or when the process dies).  Conflict naming the holder's pid when another
    process holds it."""
    path = data_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise Conflict(f"data directory {data_dir} is in use by another {user} (pid {holder})") from None
    except OSError:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def share_data_dir(data_dir: Path) -> int | None:
    """A shared lock for a reader that must not run beside a daemon (``thinblock check``); the fd
    to close, or None when the directory has no lock file (no daemon ever ran there).  Nothing is
    written (the daemon's pid stays for the messages), and a daemon cannot start while a reader
    holds it.  Conflict naming the daemon's pid when one holds the directory."""
    try:
        fd = os.open(data_dir / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise Conflict(
            f"data directory {data_dir} is in use by another thinblock process (pid {holder})"
        ) from None
    except OSError:
        os.close(fd)
        raise
    return fd
