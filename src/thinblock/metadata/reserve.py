"""Room kept on the metadata store's file system for the store generation's bump.

At every flush that follows a change of the store, the engine commits the store generation + 1
and then writes it to every PD header (``pdheaders.py``): a store that later loses commits (its
WAL deleted, an old copy put back) is found older than the data at the next start (issue 10
case 6).  While the store's file system is full (case 2) that commit fails, the flush goes on
(its data and every commit that did land are durable), and until a later bump lands, a store
that lost its WAL as well would not be noticed.

So, like the blocks ext4 reserves for root or btrfs's global reserve, a small file
(``DATA_DIR/thinblock.reserve``, 1 MiB, preallocated) holds room for that commit: when the bump
finds the store full, the reserve is deleted and the bump tried once more.  The room it gives
back is the file system's, so other writers may take it first (then the bump fails as before,
logged, and the next flush tries again); it is made again once the store accepts writes.  SQLite
stores only: a PostgreSQL server's disk is not ours to keep room on.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

log = logging.getLogger("thinblock.metadata")

FILENAME = "thinblock.reserve"
DEFAULT_SIZE = 1024 * 1024
# The two calls that meet a full file system (tests replace them).
_fallocate = os.posix_fallocate


class StoreReserve:
    def __init__(self, path: str | Path, size: int = DEFAULT_SIZE) -> None:
        self.path = Path(path)
        self.size = size
        self.releases = 0

    @property
    def in_place(self) -> bool:
        return self.path.exists()

    def ensure(self) -> bool:
        """Make the reserve if it is missing (whole, or not at all); True when it is in place."""
        if self.path.exists():
            return True
        tmp = self.path.with_name(self.path.name + ".new")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                _fallocate(fd, 0, self.size)
            finally:
                os.close(fd)
            os.rename(tmp, self.path)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                log.warning("cannot make the store's reserve %s: %s", self.path, exc)
            return False
        return True

    def release(self) -> bool:
        """Give the reserve's room back to the file system; True when there was one."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            log.warning("cannot release the store's reserve %s: %s", self.path, exc)
            return False
        self.releases += 1
        return True
