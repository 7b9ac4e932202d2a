"""The one PostgreSQL session every write of the owner runs on, and what it must re-apply.

Why: a synchronous commit waits for the server to flush its WAL, once per group of region
assignments (an fsync per group with the server's defaults: most of a fresh write's cost, and
PostgreSQL at 0.38 of SQLite on 4 KiB fresh writes).  The durability rule needs less: a
region's assignment must be *durable* before a flush that covers its data is acknowledged,
*committed* (visible) before data goes into the region.  So the hot transactions (assign,
unassign) commit with ``synchronous_commit = off`` and the flush's barrier is a synchronous
commit: it waits for the WAL to be flushed up to its own commit record, which lies after every
earlier commit of this session (one WAL, in commit order), so it covers them all.

The hard part: a server that crashes (or is stopped with ``pg_ctl -m immediate``) after
asynchronous commits and before the barrier loses them, while the daemon already serves from
them (its region maps).  So the session keeps every operation committed asynchronously since
its last synchronous commit (``unsynced``), in order, each with an idempotent way to apply it
again.  A crash of the server, or of any of its processes, ends every session (PostgreSQL
resets its shared memory, WAL buffers included, only after ending them all): as long as this
connection lives, nothing it committed was lost.  When it is gone, the next transaction opens a
new connection and first re-applies the whole list, in order, in one transaction checked
against the bound lease like any other write (``check``), committed synchronously; only then
does it run.  (A synchronous commit waits for the WAL only when its transaction wrote some: a
barrier or a re-application that finds nothing to change still writes, ``barrier_statement``.)  The barrier (``sync``) is such a transaction too, so a flush is acknowledged only
once every operation before it is durable, or fails (the store's error: EIO) with the list kept
for the next attempt.

Replaying in order from whatever prefix the server kept converges: every re-applied step is
"insert this map row unless its key is there" or "delete these rows if they are there", and the
counters follow the rows actually inserted or deleted; for each key the steps alternate, so the
first delete re-applied brings a key back to what the log says, whatever the crash kept.

A commit whose answer was lost with the connection may or may not have happened.  Its caller
is told it failed (the region goes back to the pool), so its ``undo`` joins the list and is
re-applied before anything else runs on the next session: the region is never the map's twice.

Operations that cannot be re-applied safely (an INSERT of a new id, a copy on write's switch,
whose counters would move twice) commit synchronously on the same session; a synchronous commit
covers the list too, which is then emptied.
"""

from __future__ import annotations

import logging
import select
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg

log = logging.getLogger("thinblock.metadata")

Connection = psycopg.Connection[Any]


#: Asynchronous commits kept at most; the next one commits synchronously and empties the list.
#: Why: a client that never flushes would otherwise grow it (and a crash's re-application) for
#: as long as it writes; one fsync per this many groups is nothing beside one per group.
MAX_UNSYNCED = 1024


class SessionBusy(Exception):
    """Another thread held the session longer than the caller may wait."""


@dataclass(frozen=True, slots=True)
class Unsynced:
    """One operation committed asynchronously (or perhaps committed: an ``undo``) and not yet
    covered by a synchronous commit.  ``apply`` runs it again inside a transaction, idempotently,
    and returns how many rows it had to change (0: the server had kept it)."""

    what: str
    apply: Callable[[Connection], int]


class WriteSession:
    """One connection for the writes, under a lock (the metadata writer's thread, a flush's
    thread and the loop may all write), with the list of what it committed asynchronously.

    ``connect`` opens a connection (autocommit: transactions are explicit); ``check`` runs the
    bound lease's check inside a transaction and returns the call that verifies its answer
    (called before the caller's statements); ``barrier_statement`` writes something harmless (a row updated to
    itself), so that a commit holding it waits for the WAL."""

    def __init__(
        self,
        connect: Callable[[], Connection],
        check: Callable[[Connection], Callable[[], None]],
        barrier_statement: str,
    ) -> None:
        self._connect = connect
        self._check = check
        self._barrier_statement = barrier_statement
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._barrier_level: str | None = None  # SET LOCAL synchronous_commit for durable commits
        self.unsynced: list[Unsynced] = []
        self.max_unsynced = MAX_UNSYNCED
        # What re-applying found (tests, logs): sessions replayed, rows they had to change.
        self.replays = 0
        self.restored = 0

    @contextmanager
    def transaction(
        self,
        *,
        durable: bool,
        fenced: bool = True,
        redo: Unsynced | None = None,
        undo: Unsynced | None = None,
        pipeline: bool = False,
        wrote: Callable[[], bool] | None = None,
        wait: float,
    ) -> Iterator[Connection]:
        """One transaction on the session.  ``durable``: a synchronous commit (it covers every
        asynchronous one before it: the list empties); otherwise asynchronous, and ``redo``
        joins the list once it committed.  ``undo``: what to re-apply when the connection breaks
        during it (the commit's outcome then unknown).  ``pipeline``: BEGIN, the caller's
        statements and COMMIT go in one round trip; the caller's statements then check the lease
        themselves (the session's check would need an answer before the COMMIT is sent), and
        write nothing when it is not held; ``wrote``, asked once it committed, says whether they
        did (False: the redo does not join the list -- re-applied once the lease was taken
        again, it would assign what its caller was told failed).  Raises ``SessionBusy`` after
        ``wait`` seconds without the session, the driver's errors as they are."""
        assert durable or redo is not None, "an asynchronous commit needs its redo"
        if not self._lock.acquire(timeout=wait):
            raise SessionBusy("the metadata store's write session is busy")
        try:
            if len(self.unsynced) >= self.max_unsynced:
                durable = True
            conn = self._open()
            try:
                if pipeline:
                    # Leaving the block syncs: the first error of any statement is raised then.
                    with conn.pipeline():
                        conn.execute("BEGIN")
                        self._begin(conn, durable, fenced=False)
                        yield conn
                        conn.execute("COMMIT")
                else:
                    with conn.transaction():
                        verify = self._begin(conn, durable, fenced)
                        verify()
                        yield conn
            except BaseException:
                if conn.broken or conn.closed:
                    self._drop()
                    if undo is not None:
                        self.unsynced.append(undo)
                elif pipeline:
                    _roll_back(conn)
                raise
            if durable:
                self.unsynced.clear()
            elif redo is not None and (wrote is None or wrote()):
                self.unsynced.append(redo)
        finally:
            self._lock.release()

    def barrier(self, wait: float) -> None:
        """Make every commit of the session durable (a flush's barrier): nothing when all of
        them were synchronous; otherwise one synchronous commit that writes (``_begin``), on
        this connection, or on a new one after re-applying the list (itself such a commit)."""
        if not self._lock.acquire(timeout=wait):
            raise SessionBusy("the metadata store's write session is busy")
        try:
            if not self.unsynced:
                return
            conn = self._open()
            if not self.unsynced:
                return
            try:
                with conn.transaction():
                    self._begin(conn, durable=True, fenced=False)
            except BaseException:
                if conn.broken or conn.closed:
                    self._drop()
                raise
            self.unsynced.clear()
        finally:
            self._lock.release()

    def close(self) -> None:
        with self._lock:
            self._drop()

    # --- inside the lock ---
    def _open(self) -> Connection:
        conn = self._conn
        if conn is not None and _alive(conn):
            return conn
        self._drop()
        conn = self._connect()
        try:
            level = conn.execute("SHOW synchronous_commit").fetchone()
            # A server set to "off" would make the barrier wait for nothing: it asks for "on".
            self._barrier_level = "on" if level is None or level[0] == "off" else None
            if self.unsynced:
                self._replay(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _begin(self, conn: Connection, durable: bool, fenced: bool) -> Callable[[], None]:
        """The transaction's first statements: its commit level; for a synchronous commit that
        must cover the list, a write (``barrier_statement``): PostgreSQL waits for the WAL at a
        commit only when the transaction wrote some (a transaction that changed nothing, even
        one holding a transaction id, commits without waiting); the lease's check."""
        if not durable:
            conn.execute("SET LOCAL synchronous_commit = off")
        else:
            if self._barrier_level is not None:
                conn.execute(f"SET LOCAL synchronous_commit = {self._barrier_level}")
            if self.unsynced:
                conn.execute(self._barrier_statement)
        return self._check(conn) if fenced else _nothing

    def _replay(self, conn: Connection) -> None:
        """Re-apply the list on a new connection: one transaction, checked against the lease,
        committed synchronously; the list empties only once it is."""
        with conn.transaction():
            self._begin(conn, durable=True, fenced=True)()
            changed = sum(entry.apply(conn) for entry in self.unsynced)
        self.replays += 1
        self.restored += changed
        log.warning(
            "metadata session lost: re-applied %d operation(s) committed since the last durable"
            " commit; %d row(s) the server had lost were restored",
            len(self.unsynced),
            changed,
            extra={"event": "metadata-replayed", "operations": len(self.unsynced), "restored": changed},
        )
        self.unsynced.clear()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # already broken: nothing to close cleanly
                pass


def _alive(conn: Connection) -> bool:
    """Whether an idle connection still has its session, without a round trip: an idle session
    is rarely sent anything unasked, so anything to read (the server's last words, the end of
    the stream) is taken to say it is gone -- after a restart of the server, before the first
    write tries it.  (A notice or a parameter's new value makes it open a new session needlessly:
    the list is re-applied, changing nothing.)"""
    if conn.broken or conn.closed:
        return False
    try:
        readable, _, _ = select.select([conn.fileno()], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable


def _roll_back(conn: Connection) -> None:
    """After a pipelined transaction failed on a live connection: the server skipped the rest
    up to the sync, COMMIT included, and holds the failed transaction open."""
    try:
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.execute("ROLLBACK")
    except psycopg.Error:
        conn.close()  # cannot tell what it holds: the next transaction opens another


def _nothing() -> None:
    pass
