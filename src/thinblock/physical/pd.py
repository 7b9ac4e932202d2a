"""Physical disks: a file or a block device carved into fixed-size chunklets.

A PD is the bottom of the stack: positional I/O (``preadv``/``pwritev`` straight into and
out of the caller's buffers, no copies), punch-hole for zeroing, fsync.  It has a health
state; the first I/O error marks it failed ("an I/O error marks it failed", issue 2),
tells its failure listeners once, and every later I/O on it raises ``MediumError`` at
once, so a RAID layer above can route around it.

Threading: the I/O methods are plain syscalls and may be called from any thread (the
engine runs fsync and large zeroing in worker threads).  Failure listeners are therefore
called on whichever thread hit the error; a listener that touches the event loop must
use ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import logging
import mmap
import os
import stat
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..blockdev import Buffer, FileSpan
from ..errors import HostOutOfSpace, InvalidArgument, MediumError
from ..model import PDHealth
from ..units import KiB, MiB, format_size
from . import header as pd_header
from .header import PDHeader

if TYPE_CHECKING:
    from ..fence import WriteFence

log = logging.getLogger(__name__)

MIN_CHUNKLET = 1 * MiB
MIN_TINY_CHUNKLET = 4 * KiB

# Linux limits one preadv/pwritev to IOV_MAX buffers; longer lists are split.
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
# Writes go to the kernel in pieces of at most this many bytes.  Linux (6.x, ext4 and xfs)
# sizes the page-cache folios of a file range after the length of the write that fills
# them, and a later small write costs in proportion to the folio it lands in: measured
# here, a 4 KiB overwrite took 12-14 us in space written with 1 MiB pwrites and 5 us in
# space written with 256 KiB ones, while fresh space was written as fast either way
# (about 4.5 GiB/s).  Hosts write 1 MiB and then overwrite 4 KiB all the time.
WRITE_PIECE = 256 * KiB

# Direct I/O (``enable_direct_io``, engine.pd_direct_io): O_DIRECT needs the file offset, the
# length and the memory address aligned to the device's logical block size; 4 KiB covers every
# disk in use.  Requests that are not (a 512-byte write) go through the page cache as before:
# Linux keeps the two coherent (a direct read first writes back dirty cached pages of its range,
# a direct write drops the cached pages of its range, mm/filemap.c).  Caller buffers that are not
# page-aligned (most: Python's allocator aligns to 16 bytes) go through a per-thread aligned
# bounce buffer of DIRECT_PIECE bytes: one memory copy, no page cache.
DIRECT_ALIGN = 4096
DIRECT_PIECE = 1 * MiB
_BOUNCE = threading.local()


def _bounce_buffer() -> memoryview:
    """This thread's page-aligned DIRECT_PIECE buffer (an anonymous mapping: page-aligned)."""
    view: memoryview | None = getattr(_BOUNCE, "view", None)
    if view is None:
        view = _BOUNCE.view = memoryview(mmap.mmap(-1, DIRECT_PIECE))
    return view


def buffer_address(buf: Buffer) -> int:
    """The memory address of a buffer's first byte (read-only buffers too)."""
    return int(np.frombuffer(buf, np.uint8).ctypes.data)


# Bounded zero source for the write-zeros fallback (never one allocation per request).
_ZERO_CHUNK = 1 * MiB
_ZEROS = memoryview(bytes(_ZERO_CHUNK))

# fallocate(2) modes (linux/falloc.h).
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

# Errors meaning "this file system / device cannot punch holes at all": fall back to
# writing zeros, and stop trying.
_NO_PUNCH_ERRNOS = {errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.ENODEV}
# The host file system under a PD file is full (or the owner's quota): a space condition, not a
# disk failure (issue 10 case 5) -- except under fsync, where written data was lost.
_NO_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


class FailureGeneration:
    """Counts PD failures process-wide.  Layers above cache what they derive from PD health
    (e.g. which RAID rows are lost) and recompute only when this number moves: one integer
    compare on the hot path instead of a scan of every member's state."""

    value = 0


FAILURES = FailureGeneration()
_FAIL_LOCK = threading.Lock()  # failures are rare: one lock for all PDs keeps FAILURES exact


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6", use_errno=True)
        fn = libc.fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_libc_fallocate = _load_fallocate()


def fallocate_space(fd: int, offset: int, length: int) -> None:
    """``fallocate(fd, 0, offset, length)``: real blocks behind the range; raises OSError."""
    if _libc_fallocate is None:
        raise OSError(errno.ENOSYS, "fallocate is not available")
    if _libc_fallocate(fd, 0, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def fallocate_punch(fd: int, offset: int, length: int) -> None:
    """``fallocate(fd, PUNCH_HOLE | KEEP_SIZE, offset, length)``; raises OSError.

    A module-level function so that tests can replace it to exercise the fallback."""
    if _libc_fallocate is None:
        raise OSError(errno.ENOSYS, "fallocate is not available")
    if _libc_fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _lock(fd: int, path: str) -> None:
    """An exclusive flock on the PD for as long as it is open: a second thinblock process (or
    a second data directory's engine) adding the same file or device would hand out its
    chunklets twice.  The lock goes with the fd (close, or the process dying)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise InvalidArgument(f"PD {path} is in use: another process (or engine) holds its lock") from None
    except OSError as exc:
        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise InvalidArgument(f"cannot lock PD {path}: {exc.strerror}") from None
        # a file system without flock (some network ones): run unlocked, as before


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class PhysicalDisk:
    """One PD.  Build it with :meth:`open`."""

    def __init__(
        self,
        pd_id: int,
        path: str,
        fd: int,
        size: int,
        chunklet_size: int,
        is_block: bool,
        data_offset: int = 0,
    ) -> None:
        self.id = pd_id
        self.path = path
        # ``size`` bytes of chunklets from ``data_offset``; what lies before (the engine's PD
        # header area, physical/header.py) is not chunklet space.
        self.size = size
        self.data_offset = data_offset
        self.end = data_offset + size  # the file or device must hold at least this many bytes
        self.chunklet_size = chunklet_size
        self.is_block_device = is_block
        # True when open() created the file: sparse, fsynced with its directory entry, so
        # every chunklet durably reads zeros (no old data to zero before first use).
        self.created = False
        self._fd = fd
        # A second descriptor opened with O_DIRECT (enable_direct_io); -1: all I/O buffered.
        self._direct_fd = -1
        # ``failed`` is read on the hot path of every RAID I/O: a plain attribute, set only
        # by fail().  ``_blocked`` folds "failed or errors injected" into one check.
        self.failed = False
        self.failure_reason: str | None = None
        self._blocked = False
        self._inject = False
        self._closed = False
        self._can_punch = True
        self._can_allocate = not is_block
        self._listeners: list[Callable[[PhysicalDisk, str], None]] = []
        # Told when the host file system under the PD has no room (ENOSPC, EDQUOT), on the
        # thread that met it; the PD stays in service.
        self.on_no_space: Callable[[PhysicalDisk, str], None] | None = None
        # A node of a pair writes only while it holds its lease (fence.py): checked right
        # before every write syscall, on the thread that makes it.
        self.fence: WriteFence | None = None

    # --- construction -----------------------------------------------------------------
    @classmethod
    def open(
        cls,
        pd_id: int,
        path: str,
        *,
        size: int | None,
        chunklet_size: int,
        create: bool,
        allow_tiny: bool = False,
        data_offset: int = 0,
        lock: bool = True,
    ) -> PhysicalDisk:
        """Open a PD.

        ``size`` counts chunklet space, which starts at ``data_offset`` (the engine reserves
        ``header.HEADER_AREA`` there for the PD header; bare PDs in tests use 0).

        * A missing file is created sparse at ``data_offset + size`` when ``create`` is true.
        * An existing file or block device is used as it is: all of it after ``data_offset``,
          or the smaller ``size`` given (the rest is left alone).
        * ``chunklet_size`` is a power of two from 1 MiB (from 4 KiB with ``allow_tiny``,
          for tests); the PD must hold at least one chunklet.

        ``lock`` False: no flock (a node taking over a paused partner's PDs, which that
        partner still holds locked; the lease fences the two instead, fence.py).

        Raises InvalidArgument with a message naming the path on any bad input.
        """
        path = os.fspath(path)
        min_chunklet = MIN_TINY_CHUNKLET if allow_tiny else MIN_CHUNKLET
        if not _is_power_of_two(chunklet_size) or chunklet_size < min_chunklet:
            raise InvalidArgument(
                f"chunklet size must be a power of two of at least {format_size(min_chunklet)}, "
                f"not {chunklet_size}"
            )
        if size is not None and size <= 0:
            raise InvalidArgument(f"PD size must be positive, not {size}")

        try:
            st = os.stat(path)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise InvalidArgument(f"cannot use {path} as a PD: {exc.strerror}") from None

        if st is None:
            if not create:
                raise InvalidArgument(f"PD {path} does not exist")
            if size is None:
                raise InvalidArgument(f"PD {path} does not exist; give a size to create it")
            if size < chunklet_size:
                raise InvalidArgument(
                    f"PD size {format_size(size)} is smaller than one chunklet ({format_size(chunklet_size)})"
                )
            fd = cls._create_sparse(path, data_offset + size)
            pd = cls(pd_id, path, fd, size, chunklet_size, is_block=False, data_offset=data_offset)
            pd.created = True
            return pd

        is_block = stat.S_ISBLK(st.st_mode)
        if not (is_block or stat.S_ISREG(st.st_mode)):
            raise InvalidArgument(f"{path} is neither a regular file nor a block device")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise InvalidArgument(f"cannot open PD {path}: {exc.strerror}") from None
        try:
            if lock:
                _lock(fd, path)
            actual = (os.lseek(fd, 0, os.SEEK_END) if is_block else st.st_size) - data_offset
            if size is None:
                size = actual
            elif size > actual:
                raise InvalidArgument(
                    f"PD {path} holds {format_size(actual)} ({actual} bytes) after its first "
                    f"{data_offset} bytes, less than the size asked for ({size} bytes)"
                    if data_offset
                    else f"PD {path} holds {format_size(actual)} ({actual} bytes), "
                    f"less than the size asked for ({size} bytes)"
                )
            if size < chunklet_size:
                raise InvalidArgument(
                    f"PD {path} ({format_size(size)}) is smaller than one chunklet "
                    f"({format_size(chunklet_size)})"
                )
        except BaseException:
            os.close(fd)
            raise
        return cls(pd_id, path, fd, size, chunklet_size, is_block=is_block, data_offset=data_offset)

    @staticmethod
    def _create_sparse(path: str, size: int) -> int:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise InvalidArgument(f"cannot create PD {path}: {exc.strerror}") from None
        try:
            _lock(fd, path)
        except InvalidArgument:
            os.close(fd)
            raise
        try:
            os.ftruncate(fd, size)
            # The new file and its size must survive a crash before any chunklet of it is
            # recorded as in use: fsync the file and its directory entry.
            os.fsync(fd)
            dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            os.close(fd)
            try:
                os.unlink(path)
            except OSError:
                pass
            raise InvalidArgument(f"cannot create PD {path} of {size} bytes: {exc.strerror}") from None
        return fd

    # --- geometry ---------------------------------------------------------------------
    @property
    def chunklet_count(self) -> int:
        return self.size // self.chunklet_size

    def chunklet_offset(self, index: int) -> int:
        if not 0 <= index < self.chunklet_count:
            raise InvalidArgument(f"PD {self.id} has no chunklet {index} (it has {self.chunklet_count})")
        return self.data_offset + index * self.chunklet_size

    @property
    def health(self) -> PDHealth:
        return PDHealth.FAILED if self.failed else PDHealth.NORMAL

    @property
    def fd(self) -> int:
        return self._fd

    def as_device(self, offset: int = 0, length: int | None = None) -> PDRange:
        """A RawDevice over file bytes ``[offset, offset + length)`` of this PD (default: to its end)."""
        return PDRange(self, offset, self.end - offset if length is None else length)

    # --- failure ----------------------------------------------------------------------
    def add_failure_listener(self, cb: Callable[[PhysicalDisk, str], None]) -> None:
        self._listeners.append(cb)

    def remove_failure_listener(self, cb: Callable[[PhysicalDisk, str], None]) -> None:
        try:
            self._listeners.remove(cb)
        except ValueError:
            pass

    def fail(self, reason: str) -> None:
        """Mark the PD failed.  Listeners hear of it once, however many threads fail it."""
        with _FAIL_LOCK:
            if self.failed:
                return
            self.failed = True
            self._blocked = True
            FAILURES.value += 1
            self.failure_reason = reason
            listeners = list(self._listeners)
        log.error("PD %d (%s) failed: %s", self.id, self.path, reason)
        for cb in listeners:
            try:
                cb(self, reason)
            except Exception:
                log.exception("PD %d failure listener %r raised", self.id, cb)

    def inject_errors(self, on: bool) -> None:
        """Drills: while on, every I/O fails as if the device returned EIO (and so fails the PD)."""
        self._inject = on
        self._blocked = on or self.failed

    def _refuse(self, what: str, offset: int) -> MediumError:
        """The error for I/O attempted while ``_blocked``: a failed PD or injected errors."""
        if not self.failed:
            self.fail(f"injected I/O error on {what} at offset {offset}")
        return MediumError(f"PD {self.id} ({self.path}) has failed: {self.failure_reason}")

    def _io_error(self, what: str, offset: int, exc: OSError) -> MediumError | HostOutOfSpace:
        if self._closed:
            return MediumError(f"PD {self.id} ({self.path}) is closed")
        if exc.errno in _NO_SPACE_ERRNOS and what != "fsync":
            # Nothing was lost: this write (or allocation) did not happen, in part or at all, and
            # the caller is told so; the PD's other data is intact and stays readable.
            message = f"PD {self.id} ({self.path}): the host file system is full ({what} at offset {offset}: {exc.strerror})"
            log.warning("%s", message, extra={"event": "pd-host-full", "pd": self.id})
            if self.on_no_space is not None:
                try:
                    self.on_no_space(self, message)
                except Exception:
                    log.exception("PD %d no-space listener raised", self.id)
            return HostOutOfSpace(message)
        self.fail(f"{what} error at offset {offset}: {exc}")
        return MediumError(f"PD {self.id} ({self.path}): {what} error at offset {offset}: {exc.strerror}")

    # --- the PD header (physical/header.py) --------------------------------------------
    def read_header(self) -> PDHeader | None:
        """The header in this PD's header area (None: none there).  header.HeaderError for a
        damaged one; MediumError (and the PD failed) when it cannot be read."""
        if self._blocked:
            raise self._refuse("header read", 0)
        try:
            return pd_header.read_header(self._fd)
        except OSError as exc:
            raise self._io_error("header read", 0, exc) from exc

    def write_header(self, header: PDHeader) -> None:
        """Write ``header`` durably; MediumError (and the PD failed) when it cannot be."""
        if self._blocked:
            raise self._refuse("header write", 0)
        if self.fence is not None:
            self.fence.check()
        assert self.data_offset >= pd_header.HEADER_AREA, "this PD has no header area"
        try:
            pd_header.write_header(self._fd, header)
        except OSError as exc:
            raise self._io_error("header write", 0, exc) from exc

    def span(self, offset: int, length: int) -> PDSpan | None:
        """``[offset, offset + length)`` of this PD as a FileSpan for ``sendfile`` (None when it
        cannot be: the PD failed, erroring or closed, or opened for direct I/O, whose reads must
        not fill the page cache)."""
        if self._blocked or self._direct_fd >= 0 or self._fd < 0 or self._closed:
            return None
        return PDSpan(self, offset, length)

    # --- direct I/O -------------------------------------------------------------------
    @property
    def direct_io(self) -> bool:
        return self._direct_fd >= 0

    def enable_direct_io(self) -> bool:
        """Open a second descriptor with O_DIRECT: aligned reads and writes bypass the page
        cache from now on.  False (and a log line) where the file system refuses O_DIRECT
        (tmpfs): the PD stays buffered."""
        if self._direct_fd >= 0 or self._fd < 0 or self._closed:
            return self._direct_fd >= 0
        try:
            self._direct_fd = os.open(f"/proc/self/fd/{self._fd}", os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
        except OSError as exc:
            log.warning("PD %d (%s): direct I/O refused (%s); using the page cache", self.id, self.path, exc)
            return False
        return True

    def _aligned(self, offset: int, n: int) -> bool:
        return self._direct_fd >= 0 and not (offset | n) & (DIRECT_ALIGN - 1)

    def _pread_direct(self, offset: int, view: memoryview) -> None:
        n = len(view)
        if not buffer_address(view) & (DIRECT_ALIGN - 1):
            got = os.preadv(self._direct_fd, (view,), offset)
            if got != n:
                self._finish_read(offset, [view], got)
            return
        bounce = _bounce_buffer()
        for pos in range(0, n, DIRECT_PIECE):
            k = min(DIRECT_PIECE, n - pos)
            piece = bounce[:k]
            got = os.preadv(self._direct_fd, (piece,), offset + pos)
            if got != k:
                self._finish_read(offset + pos, [piece], got)
            view[pos : pos + k] = piece

    def _pwrite_direct(self, offset: int, data: Buffer) -> None:
        view = data if type(data) is memoryview and data.format == "B" else memoryview(data).cast("B")
        n = len(view)
        if not buffer_address(view) & (DIRECT_ALIGN - 1):
            done = os.pwrite(self._direct_fd, view, offset)
            if done != n:
                self._finish_write(offset, [view], done)
            return
        bounce = _bounce_buffer()
        for pos in range(0, n, DIRECT_PIECE):
            k = min(DIRECT_PIECE, n - pos)
            piece = bounce[:k]
            piece[:] = view[pos : pos + k]
            done = os.pwrite(self._direct_fd, piece, offset + pos)
            if done != k:
                self._finish_write(offset + pos, [view[pos : pos + k]], done)

    # --- I/O --------------------------------------------------------------------------
    def pread_into(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` from ``offset`` with one syscall.  A read that cannot be filled (the file
        ends before it: cut short under us) is an I/O error of this PD, never zeros."""
        if self._blocked:
            raise self._refuse("read", offset)
        if self._direct_fd >= 0 and self._aligned(offset, len(buf)):
            try:
                self._pread_direct(offset, buf)
            except OSError as exc:
                raise self._io_error("read", offset, exc) from exc
            return
        try:
            got = os.preadv(self._fd, (buf,), offset)
        except OSError as exc:
            raise self._io_error("read", offset, exc) from exc
        if got != len(buf):
            self._finish_read(offset, [buf], got)

    def preadv(self, offset: int, bufs: Sequence[memoryview]) -> None:
        """Fill ``bufs`` (consecutive on the disk from ``offset``): one syscall per IOV_MAX buffers."""
        if self._blocked:
            raise self._refuse("read", offset)
        if self._direct_fd >= 0 and all(self._aligned(offset, len(b)) for b in bufs):
            try:
                for buf in bufs:
                    self._pread_direct(offset, buf)
                    offset += len(buf)
            except OSError as exc:
                raise self._io_error("read", offset, exc) from exc
            return
        start = 0
        while start < len(bufs):
            part = bufs[start : start + IOV_MAX]
            want = sum(len(b) for b in part) if len(part) > 1 else len(part[0])
            try:
                got = os.preadv(self._fd, part, offset)
            except OSError as exc:
                raise self._io_error("read", offset, exc) from exc
            if got != want:
                self._finish_read(offset, list(part), got)
            offset += want
            start += IOV_MAX

    def _finish_read(self, offset: int, bufs: list[memoryview], got: int) -> None:
        """Slow path of a short read: keep reading; end of file is an I/O error (issue 10 case 4:
        a PD file truncated while serving returned zeros with success, and RAID 1 did not read
        its intact mirror).  Every byte up to ``end`` exists in a PD of the size formatted."""
        while True:
            # Drop what is already filled.
            while bufs and got >= len(bufs[0]):
                got -= len(bufs[0])
                offset += len(bufs[0])
                bufs.pop(0)
            if not bufs:
                return
            if got:
                offset += got
                bufs[0] = bufs[0][got:]
            try:
                got = os.preadv(self._fd, bufs[:IOV_MAX], offset)
            except OSError as exc:
                raise self._io_error("read", offset, exc) from exc
            if got == 0:
                problem = self.file_problem() or f"the file ends before offset {offset}"
                raise self._io_error("read", offset, OSError(errno.EIO, f"short read: {problem}"))

    def file_problem(self) -> str | None:
        """What is wrong with the file under this PD, or None: shorter than the PD as formatted
        (truncated), or no longer the file at its path (replaced or removed).  Cheap (fstat and
        stat): the engine asks on a timer and the PD on every error."""
        if self._closed or self._fd < 0:
            return None
        try:
            st = os.fstat(self._fd)
        except OSError as exc:
            return f"fstat failed: {exc.strerror}"
        if self.is_block_device:
            try:
                actual = os.lseek(self._fd, 0, os.SEEK_END)
            except OSError as exc:
                return f"cannot size the device: {exc.strerror}"
        else:
            actual = st.st_size
        if actual < self.end:
            return f"it is {actual} bytes, shorter than the {self.end} it was formatted with (truncated?)"
        try:
            at_path = os.stat(self.path)
        except FileNotFoundError:
            return f"{self.path} no longer exists (removed or renamed?)"
        except OSError as exc:
            return f"cannot stat {self.path}: {exc.strerror}"
        if (at_path.st_dev, at_path.st_ino) != (st.st_dev, st.st_ino) and not self.is_block_device:
            return f"{self.path} is another file now (replaced?)"
        if self.is_block_device and at_path.st_rdev != st.st_rdev:
            return f"{self.path} is another device now"
        return None

    def pwrite(self, offset: int, data: Buffer) -> None:
        """Write all of ``data`` at ``offset`` (in WRITE_PIECE syscalls when it is larger)."""
        if self._blocked:
            raise self._refuse("write", offset)
        if self.fence is not None:
            self.fence.check()
        try:
            n = len(data)
            if self._direct_fd >= 0 and self._aligned(offset, n):
                self._pwrite_direct(offset, data)
                return
            if n <= WRITE_PIECE:
                done = os.pwrite(self._fd, data, offset)
                if done != n:
                    self._finish_write(offset, [data], done)
                return
            view = memoryview(data).cast("B")
            for pos in range(0, n, WRITE_PIECE):
                piece = view[pos : pos + WRITE_PIECE]
                done = os.pwrite(self._fd, piece, offset + pos)
                if done != len(piece):
                    self._finish_write(offset + pos, [piece], done)
        except OSError as exc:
            raise self._io_error("write", offset, exc) from exc

    def pwritev(self, offset: int, bufs: Sequence[Buffer]) -> None:
        """Write ``bufs`` consecutively from ``offset``: one syscall per run of buffers of at
        most WRITE_PIECE bytes and IOV_MAX buffers (a larger buffer goes as ``pwrite``)."""
        if self._blocked:
            raise self._refuse("write", offset)
        if self._direct_fd >= 0 and all(self._aligned(offset, len(b)) for b in bufs):
            try:
                for buf in bufs:
                    self._pwrite_direct(offset, buf)
                    offset += len(buf)
            except OSError as exc:
                raise self._io_error("write", offset, exc) from exc
            return
        part: list[Buffer] = []
        want = 0
        for buf in bufs:
            n = len(buf)
            if part and (want + n > WRITE_PIECE or len(part) == IOV_MAX):
                self._pwritev_part(offset, part, want)
                offset += want
                part, want = [], 0
            if n > WRITE_PIECE:
                self.pwrite(offset, buf)
                offset += n
                continue
            part.append(buf)
            want += n
        if part:
            self._pwritev_part(offset, part, want)

    def _pwritev_part(self, offset: int, part: list[Buffer], want: int) -> None:
        if self.fence is not None:
            self.fence.check()
        try:
            done = os.pwritev(self._fd, part, offset)
            if done != want:
                self._finish_write(offset, part, done)
        except OSError as exc:
            raise self._io_error("write", offset, exc) from exc

    def _finish_write(self, offset: int, bufs: Sequence[Buffer], done: int) -> None:
        rest = [memoryview(b) for b in bufs]
        while rest:
            while rest and done >= len(rest[0]):
                done -= len(rest[0])
                offset += len(rest[0])
                rest.pop(0)
            if not rest:
                return
            if done:
                offset += done
                rest[0] = rest[0][done:]
            done = os.pwritev(self._fd, rest[:IOV_MAX], offset)
            if done <= 0:
                raise OSError(errno.ENOSPC, "no progress writing")

    def allocate(self, offset: int, length: int) -> None:
        """Give ``[offset, offset + length)`` real blocks on the host file system now, so that
        writes into it cannot meet ENOSPC later (the engine calls it when a region is assigned).
        HostOutOfSpace when the file system is full; nothing on block devices and file systems
        without fallocate."""
        if self._blocked:
            raise self._refuse("allocate", offset)
        if self.fence is not None:
            self.fence.check()
        if not self._can_allocate or length <= 0:
            return
        try:
            fallocate_space(self._fd, offset, length)
        except OSError as exc:
            if exc.errno in _NO_PUNCH_ERRNOS or exc.errno == errno.EINVAL:
                log.info("PD %d (%s) cannot preallocate (%s)", self.id, self.path, exc)
                self._can_allocate = False
                return
            raise self._io_error("allocate", offset, exc) from exc

    def deallocate(self, offset: int, length: int) -> None:
        """Undo ``allocate`` for a range that holds nothing (a region whose assignment was
        refused): punch it, giving the host file system its blocks back.  Only where ``allocate``
        gave some and a hole can be punched (never zeros written instead: that would allocate).
        Best effort: a failure is logged, the range reads zeros either way."""
        if self._blocked or self._closed or not self._can_allocate or not self._can_punch or length <= 0:
            return
        if self.fence is not None and self.fence.fenced:
            return  # this node may not write (fence.py): the range may be another owner's by now
        try:
            fallocate_punch(self._fd, offset, length)
        except OSError as exc:
            log.warning(
                "PD %d (%s): cannot give back the blocks of an unused range at %d (%s)",
                self.id,
                self.path,
                offset,
                exc,
            )

    def host_free_bytes(self) -> int | None:
        """Free bytes on the host file system under a PD file (None: a device, or unknown)."""
        if self.is_block_device or self._closed or self._fd < 0:
            return None
        try:
            st = os.fstatvfs(self._fd)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    def punch(self, offset: int, length: int) -> None:
        """Make ``[offset, offset + length)`` read as zeros: punch a hole (freeing the space of
        a sparse file), or write zeros where the file system or device cannot punch."""
        if self._blocked:
            raise self._refuse("punch", offset)
        if self.fence is not None:
            self.fence.check()
        if length <= 0:
            return
        if self._can_punch:
            lo, hi = offset, offset + length
            if self.is_block_device:
                # Block devices punch (discard with zeroing) only whole logical blocks; write
                # zeros at unaligned edges.
                lo, hi = -(-offset // 4096) * 4096, (offset + length) // 4096 * 4096
            if lo < hi:
                try:
                    fallocate_punch(self._fd, lo, hi - lo)
                except OSError as exc:
                    # EINVAL: a file system or device that does not take this fallocate mode.
                    if exc.errno in _NO_PUNCH_ERRNOS or exc.errno == errno.EINVAL:
                        log.info("PD %d (%s) cannot punch holes (%s); writing zeros", self.id, self.path, exc)
                        self._can_punch = False
                    else:
                        raise self._io_error("punch", offset, exc) from exc
                else:
                    if lo > offset:
                        self._write_zeros(offset, lo - offset)
                    if hi < offset + length:
                        self._write_zeros(hi, offset + length - hi)
                    return
        self._write_zeros(offset, length)

    def _write_zeros(self, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            n = min(_ZERO_CHUNK, end - offset)
            self.pwrite(offset, _ZEROS[:n])
            offset += n

    def fsync(self) -> None:
        """Make everything written (and punched) so far durable.  Blocking."""
        if self._blocked:
            raise self._refuse("fsync", 0)
        try:
            os.fsync(self._fd)
        except OSError as exc:
            raise self._io_error("fsync", 0, exc) from exc

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for fd in (self._direct_fd, self._fd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._direct_fd = -1

    def __enter__(self) -> PhysicalDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "failed" if self.failed else "normal"
        return (
            f"PhysicalDisk(id={self.id}, path={self.path!r}, size={self.size}, "
            f"chunklet_size={self.chunklet_size}, {state})"
        )


class PDSpan(FileSpan):
    """A FileSpan of a PD: read with the PD's own error handling (MediumError, the PD failed)."""

    __slots__ = ("pd",)

    def __init__(self, pd: PhysicalDisk, offset: int, length: int) -> None:
        super().__init__(pd.fd, offset, length)
        self.pd = pd

    def read_part(self, skip: int = 0) -> bytearray:
        assert 0 <= skip <= self.length
        buf = bytearray(self.length - skip)
        if buf:
            self.pd.pread_into(self.offset + skip, memoryview(buf))
        return buf


class PDRange:
    """A RawDevice over a byte range of one PD (a chunklet, or the whole disk)."""

    def __init__(self, pd: PhysicalDisk, offset: int, length: int) -> None:
        if offset < 0 or length <= 0 or offset + length > pd.end:
            raise InvalidArgument(f"range [{offset}, {offset + length}) is not inside PD {pd.id}")
        self.pd = pd
        self.offset = offset
        self._size = length

    @property
    def size(self) -> int:
        return self._size

    def read_into(self, offset: int, buf: memoryview) -> None:
        assert offset >= 0 and offset + len(buf) <= self._size
        self.pd.pread_into(self.offset + offset, buf)

    def read(self, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        self.read_into(offset, memoryview(buf))
        return buf

    def write(self, offset: int, data: Buffer) -> None:
        assert offset >= 0 and offset + len(data) <= self._size
        self.pd.pwrite(self.offset + offset, data)

    def zero(self, offset: int, length: int) -> None:
        assert offset >= 0 and offset + length <= self._size
        self.pd.punch(self.offset + offset, length)

    def flush(self) -> None:
        self.pd.fsync()
