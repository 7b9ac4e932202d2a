"""Threads for large PD writes, so the event loop is never the one the kernel stalls.

The engine runs on one event-loop thread.  A ``pwrite`` of a 4 KiB overwrite costs a few
microseconds and is done inline (a thread hop would cost more).  A ``pwrite`` of a megabyte
into fresh space is another matter: the kernel copies it into newly allocated page cache,
and when the machine holds much dirty data it makes the writer sleep
(``balance_dirty_pages``).  Done inline, that sleep stops every connection of the server;
qemu-nbd and nbdkit lose one worker thread of several.  So writes of at least
``EngineOptions.offload_min_bytes`` go to these threads (``LogicalDisk.submit_write``), one
job per PD part -- a RAID 1 write's two mirror copies are made in parallel -- while the
loop goes on parsing and answering other requests.  ``os.pwrite`` releases the GIL.

The pool is a plain ``concurrent.futures.ThreadPoolExecutor``; what makes handing work to
it safe lives with the callers: the LD counts writes in flight and a rebuild waits for them
(``LogicalDisk.hold_offload``), and a pool releases an LD region only after the writes in
flight into it have landed (``Pool.write_started`` / ``write_landed``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class IOWorkers:
    """A fixed set of threads running blocking PD calls for the event loop."""

    def __init__(self, threads: int, name: str = "thinblock-io") -> None:
        assert threads > 0
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)

    def submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Run ``fn(*args)`` in a worker; an asyncio future of its result.  Loop thread only."""
        return asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def shutdown(self) -> None:
        """Wait for the jobs already submitted, then stop the threads.  Blocking."""
        self._executor.shutdown(wait=True)


Submit = Callable[..., "asyncio.Future[Any]"]

__all__ = ["IOWorkers", "Submit"]
