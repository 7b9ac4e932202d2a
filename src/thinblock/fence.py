"""The write fence of a node whose right to write is a lease (issue 12, point 5).

A node of a pair may write its PDs and its metadata only while it holds its lease in the
metadata store.  The store decides who holds it with its own clock; the node cannot ask the
store before every write, so it keeps a local deadline: a renewal *sent* at local time ``t``
(``time.monotonic``) and granted proves the lease runs at least until ``t + ttl`` in the
store's clock, and the node stops writing at ``t + ttl - margin``.  The partner takes the
lease only after it expired in the store, so the old holder stopped ``margin`` seconds before
the new one can begin (two nodes never write the same volume), whatever paused the old one
(SIGSTOP, a frozen VM, a loop stalled by the kernel): the deadline is read at the moment of
the write, not by a timer the pause would hold up too.

``check`` is called right before every PD write syscall (physical/pd.py), before every
destage of a cache region (cache/writeback.py) and before every metadata transaction but the
lease's own (metadata/writer.py).  A lost lease closes the fence for good (``close``).

What the fence cannot close: a write whose check passed just before the process was paused
and whose syscall runs after it resumed.  The margin is the bound on how late such a check
may be (the check and the syscall are a few instructions apart, on the same thread).
"""

from __future__ import annotations

import time

from .errors import Fenced


class WriteFence:
    def __init__(self, what: str) -> None:
        self.what = what  # "node n1's lease": for messages
        self.until = 0.0  # local monotonic deadline; closed until the first grant
        self.lost: str | None = None  # set once the lease is lost: closed for good

    def open_until(self, deadline: float) -> None:
        """A grant: writes are allowed until ``deadline`` (monotonic), unless the lease was lost."""
        if self.lost is None:
            self.until = max(self.until, deadline)

    def close(self, reason: str) -> None:
        self.lost = reason
        self.until = 0.0

    @property
    def fenced(self) -> bool:
        return time.monotonic() >= self.until

    def check(self) -> None:
        """Raise ``Fenced`` when writing is not allowed now."""
        if time.monotonic() >= self.until:
            raise Fenced(self.reason())

    def reason(self) -> str:
        if self.lost is not None:
            return f"writes refused: {self.lost}"
        return (
            f"writes refused: {self.what} is not known to be held (renewal late; expiry minus margin passed)"
        )
