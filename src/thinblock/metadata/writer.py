"""The metadata writer: the one way the engine changes its store while serving.

Why: with a network database every store call is a round trip, and the event loop must never
wait on one per request.  So the data path's transactions -- region assignments, above all --
are queued here and run in groups: everything queued while the previous group was being
committed goes into the next one (assignments into one ``assign_many`` transaction), the way a
database's group commit works.  Callers get futures and carry on serving other requests.

Where a group runs: on the event loop at the end of the current turn when the store is local
(SQLite: a commit is a WAL append, about 10 us for a group, cheaper than a thread hop), on one
thread of its own when the store is remote (``MetadataStore.remote``).  A call queued with
``off_loop=True`` -- one whose transaction is long: a snapshot's or clone's copy of a million
map rows takes a second, a revert's as long, a big batch of unassignments milliseconds -- makes
its group run on that thread on a local store too: run on the loop, it stalled the I/O of every
volume for its whole length.  One queue either way, and one group at a time, so calls run in
the order they were made: an unassignment queued after an assignment never overtakes it, and
what is queued behind a long call waits for it (an assignment of another volume included),
while the loop serves everything that needs no store write (reads, writes into mapped regions).

The durability rule the engine keeps on top of this (volume/vv.py): a region's assignment is
*committed* before any data is written into it, so memory never runs ahead of the store.  When
a commit fails (the store's file system full, the database gone) the future fails, the region
goes back to the pool untouched, and the write that needed it fails with ENOSPC (full) or EIO
(unreachable); nothing was acknowledged that the store does not hold.  ``on_trouble`` and
``on_recovered`` let the engine raise and clear an alert.

Committed is not yet durable: a flush makes it so (``store.sync()`` in the engine's flush, off
the loop).  On PostgreSQL assignments commit asynchronously, and what a crash of the server loses
before that flush is re-applied by the store's write session (``pgsession.py``), not here: only
the store sees its connections, and the re-application must run on a new one before anything
else does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from ..errors import LeaseLost, MetadataStoreFull, MetadataUnavailable
from ..fence import WriteFence
from .store import Assignment, MetadataStore

log = logging.getLogger("thinblock.metadata")

T = TypeVar("T")

#: store errors that say the store is in trouble (not the request): the engine alerts on them
TROUBLE = (MetadataStoreFull, MetadataUnavailable, LeaseLost)


class _Assign:
    __slots__ = ("future", "row")

    def __init__(self, row: Assignment, future: asyncio.Future[None]) -> None:
        self.row = row
        self.future = future


class _Call:
    __slots__ = ("args", "fn", "future", "off_loop", "unfenced")

    def __init__(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        future: asyncio.Future[Any],
        unfenced: bool = False,
        off_loop: bool = False,
    ) -> None:
        self.fn = fn
        self.args = args
        self.future = future
        self.unfenced = unfenced
        self.off_loop = off_loop


_Item = _Assign | _Call
# (item, result or exception, failed?)
_Outcome = tuple[_Item, Any, bool]


class MetadataWriter:
    def __init__(
        self,
        store: MetadataStore,
        loop: asyncio.AbstractEventLoop,
        *,
        threaded: bool | None = None,
        on_trouble: Callable[[Exception], None] | None = None,
        on_recovered: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self._loop = loop
        self._threaded = store.remote if threaded is None else threaded
        # The writer's one thread: every group runs there when threaded; otherwise made the
        # first time a group holds an ``off_loop`` call (a local store's long transaction).
        self._executor = (
            ThreadPoolExecutor(1, thread_name_prefix="thinblock-metadata") if self._threaded else None
        )
        self._queue: list[_Item] = []
        self._busy = False  # a group is being committed (or scheduled to be, inline)
        self._idle: asyncio.Future[None] | None = None
        self.on_trouble = on_trouble
        self.on_recovered = on_recovered
        self.in_trouble = False
        self.closed = False  # close() has drained it: callers that must not wait call the store
        self.groups = 0  # groups committed (tests, metrics)
        # A node of a pair changes its store only while it holds its lease (fence.py): checked
        # before every transaction but the lease's own (``call(..., unfenced=True)``).
        self.fence: WriteFence | None = None

    # --- what callers queue ---
    def assign(self, vv_id: int, vv_region: int, ld_id: int, ld_region: int) -> asyncio.Future[None]:
        """Queue a region assignment; the future completes once it is committed (or fails with
        the store's error, the assignment not made)."""
        future: asyncio.Future[None] = self._loop.create_future()
        self._queue.append(_Assign((vv_id, vv_region, ld_id, ld_region), future))
        self._kick()
        return future

    def call(
        self, fn: Callable[..., T], *args: Any, unfenced: bool = False, off_loop: bool = False
    ) -> asyncio.Future[T]:
        """Queue any store method (``writer.call(store.add_vv, row)``), run in order with the rest.
        ``unfenced``: run even when the fence is closed (the lease's renewal, nothing else).
        ``off_loop``: a long transaction (a map copy): its group runs on the writer's thread
        even on a local store, so that the loop goes on serving meanwhile."""
        future: asyncio.Future[T] = self._loop.create_future()
        self._queue.append(_Call(fn, args, future, unfenced, off_loop))
        self._kick()
        return future

    @property
    def pending(self) -> int:
        return len(self._queue) + (1 if self._busy else 0)

    async def drain(self) -> None:
        """Until everything queued so far has run."""
        while self._busy or self._queue:
            if self._idle is None or self._idle.done():
                self._idle = self._loop.create_future()
            await asyncio.shield(self._idle)

    async def close(self) -> None:
        await self.drain()
        self.closed = True
        if self._executor is not None:
            await self._loop.run_in_executor(None, self._executor.shutdown)

    # --- running groups ---
    def _kick(self) -> None:
        if self._busy:
            return  # the running group's completion starts the next one
        self._busy = True
        # At the end of this loop turn: every request of the turn joins the group.
        self._loop.call_soon(self._start_group)

    def _start_group(self) -> None:
        batch, self._queue = self._queue, []
        if not self._threaded and not any(isinstance(item, _Call) and item.off_loop for item in batch):
            self._finish(self._run_group(batch))
        else:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="thinblock-metadata")
            # _busy stays set until _finish: the next group starts only after this one, in order.
            done = self._executor.submit(self._run_group, batch)
            done.add_done_callback(lambda f: self._loop.call_soon_threadsafe(self._finish, f.result()))

    def _run_group(self, batch: list[_Item]) -> list[_Outcome]:
        """On the writer thread (or inline): runs consecutive assignments as one transaction,
        calls one by one, in order.  Never raises: each item gets its result or error."""
        out: list[_Outcome] = []
        i = 0
        while i < len(batch):
            item = batch[i]
            if isinstance(item, _Assign):
                j = i
                while j < len(batch) and isinstance(batch[j], _Assign):
                    j += 1
                group = batch[i:j]
                try:
                    if self.fence is not None:
                        self.fence.check()
                    self.store.assign_many([a.row for a in group])  # type: ignore[union-attr]
                except Exception as exc:
                    out += [(a, exc, True) for a in group]
                else:
                    out += [(a, None, False) for a in group]
                i = j
                continue
            try:
                if self.fence is not None and not item.unfenced:
                    self.fence.check()
                out.append((item, item.fn(*item.args), False))
            except Exception as exc:
                out.append((item, exc, True))
            i += 1
        return out

    def _finish(self, outcomes: list[_Outcome]) -> None:
        """On the loop: complete every future, say whether the store is in trouble, go on."""
        self.groups += 1
        trouble: Exception | None = None
        succeeded = False
        for item, value, failed in outcomes:
            if failed:
                if isinstance(value, TROUBLE):
                    trouble = value
                if not item.future.done():
                    item.future.set_exception(value)
            else:
                succeeded = True
                if not item.future.done():
                    item.future.set_result(value)
        self._busy = False
        if trouble is not None:
            self._set_trouble(trouble)
        elif succeeded and self.in_trouble:
            self.in_trouble = False
            log.warning("metadata store %s accepts writes again", self.store.url)
            if self.on_recovered is not None:
                self.on_recovered()
        if self._queue:
            self._kick()
        elif self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    def _set_trouble(self, exc: Exception) -> None:
        if not self.in_trouble:
            log.error("metadata store %s refused a write: %s", self.store.url, exc)
        self.in_trouble = True
        if self.on_trouble is not None:
            try:
                self.on_trouble(exc)
            except Exception:
                log.exception("metadata trouble handler failed")
