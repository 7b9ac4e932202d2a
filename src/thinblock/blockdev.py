"""The narrow block interfaces every layer implements (in the style of nbdkit's plugin API).

Two flavours, one vocabulary:

* ``RawDevice`` -- synchronous, implemented by the storage layers below the volume:
  a PD's chunklet range, a RAID LD, the zero LD.  Their I/O is a handful of
  pread/pwrite calls into the page cache, cheap enough to run inline on the event
  loop; slow work (fsync, zeroing large ranges, rebuild) is pushed to threads by
  the caller.
* ``Volume`` -- asynchronous, implemented by a virtual volume (with or without its
  write cache).  Front ends (NBD, the API's import/export, tests) drive only this.
  Fast paths never suspend, so a front end can run them with
  ``thinblock.aio.start_eager`` and reply without creating a Task.

Requests are validated at the front-end edge (offset + length <= size, length > 0);
inside the stack those are invariants and are asserted, not re-validated.
"""

from __future__ import annotations

import copy
import enum
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

# Anything a write accepts: the NBD server hands in memoryviews of its receive buffer.
Buffer = bytes | bytearray | memoryview


class FileSpan:
    """Bytes of a read that are in a file right now: ``length`` bytes at ``offset`` of the open
    descriptor ``fd``.  A volume returns these (``read_spans``) so that a
    front end can send them with ``sendfile(2)`` -- from the page cache to the socket, never
    through Python -- and read them where it cannot (TLS, data already queued).  Valid
    only until the event loop next runs other work: use it at once.  The layer that made it
    implements ``read_part`` with its own error handling (a PD marks itself failed)."""

    __slots__ = ("fd", "length", "offset")

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self.fd = fd
        self.offset = offset
        self.length = length

    def read_part(self, skip: int = 0) -> bytearray:
        """The span's bytes from ``skip`` on, read with the maker's error handling (MediumError)."""
        raise NotImplementedError

    def part(self, skip: int, length: int) -> FileSpan:
        """``length`` bytes of the span from ``skip`` on: a span of the same maker (its
        ``read_part``), for a front end that sends a read in several messages (iSCSI Data-In)."""
        assert skip >= 0 and 0 < length <= self.length - skip, (skip, length, self.length)
        piece = copy.copy(self)
        piece.offset = self.offset + skip
        piece.length = length
        return piece

    def __repr__(self) -> str:
        return f"{type(self).__name__}(fd={self.fd}, offset={self.offset}, length={self.length})"


# A piece of a read (``Volume.read_extents``): (volume offset, length, data), data None for a
# run that reads as zeros because nothing backs it (a hole).
ReadPiece = tuple[int, int, bytes | bytearray | memoryview | None]
# A piece of ``read_spans``: the same, or a FileSpan where the bytes lie in a file as they are.
SpanPiece = tuple[int, int, bytes | bytearray | memoryview | FileSpan | None]


class ExtentFlags(enum.IntFlag):
    """Block-status flags; the same bits as NBD's base:allocation context."""

    ALLOCATED = 0
    HOLE = 1  # no storage behind it (zero LD)
    ZERO = 2  # reads as zeros


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of ``length`` bytes with the same status; extents are contiguous from the query offset."""

    length: int
    flags: ExtentFlags


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a volume can do; the NBD server advertises exactly these."""

    can_write: bool = True
    can_flush: bool = True
    can_fua: bool = True
    can_trim: bool = True
    can_zero: bool = True
    can_fast_zero: bool = True
    can_cache: bool = True
    can_multi_conn: bool = True
    # Block size constraints (NBD_INFO_BLOCK_SIZE).
    minimum_block: int = 1
    preferred_block: int = 4096
    maximum_block: int = 32 * 1024 * 1024
    # The volume has ``read_spans`` (read_extents that may answer with FileSpan pieces).
    file_spans: bool = False
    # The volume has ``dirty_bitmaps()`` and ``dirty_bitmap(name)`` (``BitmapVolume``): what
    # changed since a snapshot, for incremental backups (NBD's qemu:dirty-bitmap:NAME contexts).
    dirty_bitmaps: bool = False


@runtime_checkable
class RawDevice(Protocol):
    """Synchronous byte-addressed device: a PD range, an LD, the zero LD.

    Callers guarantee ``0 <= offset`` and ``offset + length <= size``.
    """

    @property
    def size(self) -> int: ...

    def read_into(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with ``len(buf)`` bytes from ``offset``.  Raises MediumError."""
        ...

    def read(self, offset: int, length: int) -> bytes | bytearray:
        """Return ``length`` bytes from ``offset``.  Raises MediumError."""
        ...

    def write(self, offset: int, data: Buffer) -> None:
        """Write ``data`` at ``offset``.  Raises MediumError, ReadOnlyDevice (zero LD)."""
        ...

    def zero(self, offset: int, length: int) -> None:
        """Make the range read as zeros (punch a hole where possible, else write zeros)."""
        ...

    def flush(self) -> None:
        """Make everything written so far durable (fsync).  Blocking: call it off the loop."""
        ...


@runtime_checkable
class Volume(Protocol):
    """What a host sees: a virtual volume.  All methods are coroutines; the front end
    has validated ranges against ``size`` and ``capabilities.maximum_block``.

    Errors: ``OutOfSpace`` (ENOSPC: a write needed a new region and none may be had),
    ``MediumError`` (EIO), ``InvalidArgument`` (EINVAL).
    """

    @property
    def name(self) -> str: ...

    @property
    def description(self) -> str: ...

    @property
    def size(self) -> int: ...

    @property
    def capabilities(self) -> Capabilities: ...

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview: ...

    async def read_extents(self, offset: int, length: int) -> list[ReadPiece]:
        """The same read as pieces covering the range in order, ``None`` data for a hole, so that
        a front end can send holes as holes (NBD_REPLY_TYPE_OFFSET_HOLE: no zeros on the wire).
        The NBD server reads only through this.  A volume that knows no holes returns one piece
        of data.  Buffers returned must not change afterwards (they go to the transport).

        A volume whose ``capabilities.file_spans`` is true also has ``read_spans(offset,
        length) -> list[SpanPiece]``: the same pieces, with ``FileSpan`` data where the bytes
        lie in files as they are (no cache data laid over them); the caller sends or reads
        them at once (not part of this protocol: most volumes have no files)."""
        ...

    async def write(self, offset: int, data: Buffer, fua: bool = False) -> None: ...

    async def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool = True, fast: bool = False, fua: bool = False
    ) -> None:
        """Zero a range.  ``may_trim=False`` is NBD's NO_HOLE: keep the allocation.
        ``fast=True`` is NBD's FAST_ZERO: raise ``SlowZero`` rather than write zeros slowly."""
        ...

    async def trim(self, offset: int, length: int, fua: bool = False) -> None: ...

    async def flush(self) -> None:
        """Every write acknowledged before this call (on any connection) becomes durable."""
        ...

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        """Extents covering at least the first byte of the range, at most ``length`` bytes.  The
        one call whose ``length`` may exceed ``maximum_block`` (up to 4 GiB, NBD's u32): the cost
        must follow the extents, not the bytes."""
        ...

    async def cache(self, offset: int, length: int) -> None:
        """Advisory prefetch (NBD_CMD_CACHE)."""
        ...


# A run of a dirty bitmap's status (``DirtyBitmap.status``): ``length`` bytes, dirty or clean.
DirtyRun = tuple[int, bool]


class DirtyBitmap(Protocol):
    """The regions of a volume that changed since a fixed point (a snapshot), bound once: the
    bitmap named ``name`` when it was asked for stays that one whatever is renamed later."""

    @property
    def name(self) -> str: ...

    async def status(self, offset: int, length: int) -> list[DirtyRun]:
        """Runs ``(length, dirty)`` from ``offset`` on, at least one, together at most
        ``length`` bytes (they may describe less: the caller asks again from where they end).
        Like ``block_status``, ``length`` may be up to 4 GiB: the cost follows the runs.  Raises
        ``VolumeGone`` when the volume or the fixed point the bitmap compares with is gone."""
        ...


@runtime_checkable
class BitmapVolume(Volume, Protocol):
    """A volume with dirty bitmaps (``capabilities.dirty_bitmaps``)."""

    def dirty_bitmaps(self) -> list[str]:
        """The names of the bitmaps this volume has now."""
        ...

    def dirty_bitmap(self, name: str) -> DirtyBitmap:
        """The bitmap ``name``; raises ``NotFound`` when there is none by that name."""
        ...


@runtime_checkable
class VolumeProvider(Protocol):
    """How a front end finds exports: the engine implements it; tests may use a toy one."""

    def export_names(self) -> list[str]: ...

    def open_volume(self, name: str) -> Volume:
        """Raises NotFound for an unknown name."""
        ...
