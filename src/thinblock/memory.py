"""Process-wide allocator settings for a server that moves megabyte buffers all day.

Every NBD request of 128 KiB or more needs a buffer of its size (a WRITE payload that did
not fit in the receive buffer, a READ's data).  glibc's malloc serves such sizes with a
fresh ``mmap`` and gives them back with ``munmap`` (or trims the heap top) when freed,
so every byte of every large request is a page fault on first touch.  On the virtual
machines this was measured on, a page fault costs about 4 us: allocating and filling a
1 MiB bytearray took 1,100 us, of which the copy itself is about 50 us.

``warm_heap`` raises glibc's mmap and trim thresholds so that freed request buffers
stay in the heap and the next request reuses their already-mapped pages: the same
allocate-and-fill then takes about 60 us (``bench/README.md``, "What the profile
showed").  The price is that up to ``trim_threshold`` bytes of freed memory stay with
the process instead of going back to the kernel; the daemon bounds what is in flight
(``max_bytes_per_connection``, the write-back cache bound) anyway.

Only the daemon (and the benchmark's launcher) call this: a library must not change the
allocator of the process that imports it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("thinblock.memory")

# mallopt(3) parameter numbers (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 * 1024 * 1024  # the largest NBD request is 32 MiB
TRIM_THRESHOLD = 256 * 1024 * 1024


def warm_heap(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Keep large freed buffers in the heap for reuse.  True when the settings took
    (glibc), False where there is no ``mallopt`` (musl, other platforms): harmless."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    if not ok:
        log.debug("mallopt refused the heap settings", extra={"event": "malloc-settings"})
    return ok


__all__ = ["warm_heap"]
