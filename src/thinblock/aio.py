"""Eager coroutine start: run a coroutine synchronously until it first suspends.

Most engine requests (a read of an assigned region, a write to one, a read of the
zero LD) never suspend: they are a map lookup and a pread/pwrite.  Wrapping each of
them in an asyncio Task costs more than the I/O itself.  ``start_eager`` steps the
coroutine by hand; only when it really suspends (LD creation, back-pressure, a flush
waiting on fsync) is the rest of it handed to a Task.  Python 3.12's
``asyncio.eager_task_factory`` does the same; we support 3.11.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")


class _Resume:
    """Awaitable that continues an already-started coroutine inside a Task."""

    __slots__ = ("_coro", "_first")

    def __init__(self, coro: Coroutine[Any, Any, Any], first: Any) -> None:
        self._coro = coro
        self._first = first

    def __await__(self) -> Generator[Any, Any, Any]:
        coro = self._coro
        yielded = self._first
        if getattr(yielded, "_asyncio_future_blocking", None) is not None:
            # start_eager cleared the flag; our Task needs it to see "the coroutine waits on me".
            yielded._asyncio_future_blocking = True
        while True:
            try:
                sent = yield yielded
            except BaseException as exc:  # cancellation and errors go into the coroutine
                try:
                    yielded = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    yielded = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


async def _await(aw: _Resume) -> Any:
    return await aw


def start_eager(coro: Coroutine[Any, Any, T]) -> tuple[bool, Any]:
    """Step ``coro`` until it finishes or first suspends.

    Returns ``(True, result)`` when it finished without suspending (an exception it
    raised propagates to the caller), else ``(False, task)`` with an ``asyncio.Task``
    that carries on from where it stopped.  Must be called from the event loop thread.
    """
    try:
        first = coro.send(None)
    except StopIteration as stop:
        return True, stop.value
    if getattr(first, "_asyncio_future_blocking", False):
        # Until our Task takes it, the future would look "already awaited": another coroutine
        # started eagerly in this turn that awaits the same future would get RuntimeError("await
        # wasn't used with future").  _Resume sets the flag again when it hands the future over.
        first._asyncio_future_blocking = False
    return False, asyncio.ensure_future(_await(_Resume(coro, first)))
