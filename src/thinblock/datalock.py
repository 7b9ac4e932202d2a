"""The data directory's lock: one process at a time uses a data directory.

Two engines on one data directory would hand out the same LD regions to different writers, and
``thinblock metadata copy`` must not read a store a running daemon is changing.  The lock is an
exclusive ``flock`` on ``DATA_DIR/thinblock.lock``, which the kernel releases when the holder
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
