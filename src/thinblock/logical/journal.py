"""The RAID 5 journal: closes the write hole of degraded RAID 5 sets (issue 10 case 3).

A RAID 5 set with a failed member keeps that member's units only as the XOR of the survivors.
A partial-stripe write updates a data unit and the parity in place, two writes; a crash (kill
-9, power cut) between them leaves a stripe whose parity no longer matches its data, and the
missing member's unit -- flushed long ago, never rewritten -- is then rebuilt as an XOR mix of
old and new data.  The resync after an unclean stop cannot repair it: with a member missing
there is nothing to compare against.

So before a write to a degraded row changes its parity, the *missing member's content over the
parity range touched* is appended here (what it holds after the write: the reconstructed old
bytes, or the new data where the write covers the missing member), durably (``RWF_DSYNC``) and
before any in-place write.  At the next start every record is replayed in order
(``LogicalDisk.replay``): the parity is recomputed from the logged content and whatever the
surviving data units hold, so the missing unit reads back as it was logged, and each data unit
keeps what reached it (old or new data of a write in flight, as on any disk).  Like md's partial
parity log (PPL, which logs the XOR of the untouched units) it rolls forward, so writes
acknowledged before a kill -9 are kept; unlike md's PPL it logs only writes to degraded sets
(a healthy set is made consistent by the resync after an unclean stop, from its data), and it
logs the missing unit itself, so that replay does not depend on the order in which the page
cache wrote the other units back before a power cut.  Whole-stripe punches on a degraded row
log a zero record (no payload).

Records are retired when the PDs they protect are fsynced: ``Engine.flush_all`` takes a
``mark`` before its fsyncs and ``retire``s after them (a new epoch, when no record was appended
meanwhile).  A full journal first fsyncs the PDs its records cover, then starts a new epoch.
Degraded writes run in I/O threads (``LogicalDisk.submit_write``), so a record may be durable
while the in-place writes it covers are still under way in another thread: the writer calls
``landed`` once they are done, and a record is *open* until then.  An open record is never
dropped: ``retire`` refuses a mark taken while any record was open (its writes may come after
the fsyncs), and a full journal waits for the open records to land before its fsyncs.

Format (little endian).  Two header slots at 0 and 4 KiB, written alternately, each ``magic
TBJ5HEAD, version, slot sequence, epoch, CRC-32``: the valid slot with the higher sequence
names the current epoch.  Records from 8 KiB on, back to back: ``magic TBJR, kind (1 data, 2
zeros), epoch, sequence (0, 1, ... within the epoch), LD id, row, column, chunklet offset,
length, CRC-32`` of the header (CRC field zero) and payload.  Reading stops at the first record
that does not check (torn, of an older epoch, out of sequence): records are written in order,
each durable before the in-place writes it covers, so a torn record covers no write that began.

The file (``DATA_DIR/raid5.journal``, 16 MiB) is created and preallocated on first use, so its
file system filling up later cannot fail a record write; when it cannot be created or written
(the file system full, an I/O error) the write is refused before anything is written in place:
``OutOfSpace`` (NBD ENOSPC) for a full file system, ``MediumError`` otherwise.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..blockdev import Buffer
from ..errors import MediumError, OutOfSpace
from ..units import KiB, MiB, format_size

log = logging.getLogger("thinblock.journal")

FILENAME = "raid5.journal"
DEFAULT_CAPACITY = 16 * MiB
MAX_PAYLOAD = 1 * MiB  # callers split larger records (a record must fit in any journal)
DATA_START = 8 * KiB
_SLOTS = (0, 4 * KiB)
_HEAD = struct.Struct("<8sIQQI")  # magic, version, slot sequence, epoch, crc
_HEAD_MAGIC = b"TBJ5HEAD"
_VERSION = 1
_REC = struct.Struct("<4sB3xQQQIIQQI")  # magic, kind, epoch, seq, ld, row, col, coff, length, crc
_REC_MAGIC = b"TBJR"
KIND_DATA = 1
KIND_ZERO = 2
_RWF_DSYNC = getattr(os, "RWF_DSYNC", 0)
# The two calls that meet a full file system or a failing disk (tests replace them).
_pwritev = os.pwritev
_fallocate = os.posix_fallocate


class Durable(Protocol):
    """What a record protects: something whose writes ``fsync`` makes durable (a PD)."""

    @property
    def failed(self) -> bool: ...

    def fsync(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Record:
    """Column ``col`` of row ``row`` of LD ``ld_id`` (a failed member) holds ``payload`` at
    chunklet bytes ``[coff, coff + length)`` (zeros when ``kind`` is KIND_ZERO)."""

    kind: int
    seq: int
    ld_id: int
    row: int
    col: int
    coff: int
    length: int
    payload: bytes

    def content(self) -> bytes:
        return self.payload if self.kind == KIND_DATA else bytes(self.length)


@dataclass(frozen=True, slots=True)
class Mark:
    epoch: int
    seq: int
    open: int  # records whose in-place writes had not all landed when the mark was taken


def _crc(parts: Iterable[Buffer]) -> int:
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    return crc


# Each CRC covers every byte before it (padding included), then the payload.
def _pack_head(slot_seq: int, epoch: int) -> bytes:
    body = _HEAD.pack(_HEAD_MAGIC, _VERSION, slot_seq, epoch, 0)[:-4]
    return body + struct.pack("<I", _crc([body]))


def _unpack_head(data: bytes) -> tuple[int, int] | None:
    """(slot sequence, epoch) of a valid header slot, or None."""
    if len(data) < _HEAD.size:
        return None
    magic, version, slot_seq, epoch, crc = _HEAD.unpack_from(data)
    if magic != _HEAD_MAGIC or version != _VERSION or _crc([data[: _HEAD.size - 4]]) != crc:
        return None
    return slot_seq, epoch


def _pack_record(
    kind: int,
    epoch: int,
    seq: int,
    ld: int,
    row: int,
    col: int,
    coff: int,
    length: int,
    parts: Sequence[Buffer],
) -> bytes:
    body = _REC.pack(_REC_MAGIC, kind, epoch, seq, ld, row, col, coff, length, 0)[:-4]
    return body + struct.pack("<I", _crc([body, *parts]))


class StripeJournal:
    """The journal file of one data directory; see the module docstring.  Thread-safe (LD
    writes may come from worker threads: the scrub after an unclean stop)."""

    def __init__(self, path: str | Path, capacity: int = DEFAULT_CAPACITY) -> None:
        assert capacity >= DATA_START + _REC.size + MAX_PAYLOAD, capacity
        self.path = Path(path)
        self.capacity = capacity
        self._lock = threading.Lock()
        self._all_landed = threading.Condition(self._lock)  # notified when ``_open`` drops to 0
        self._open = 0  # records logged whose in-place writes have not all landed (``landed``)
        self._fd = -1
        self._slot_seq = 0
        self._epoch = 0
        self._seq = 0  # next record's sequence number in this epoch
        self._end = DATA_START  # where the next record goes
        self._covered: dict[int, Durable] = {}  # what this epoch's records protect
        self.records_written = 0
        self.full_resets = 0

    # --- the file ---------------------------------------------------------------------
    def _ensure_open(self) -> None:
        if self._fd >= 0:
            return
        if self.path.exists():
            self._open_existing()
        else:
            self._create()

    def _open_existing(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            slot_seq, epoch = self._read_head(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self.capacity = max(size, DATA_START)
        self._slot_seq, self._epoch = slot_seq, epoch
        # Append after the records already there (a replay resets the epoch first).
        self._seq, self._end = 0, DATA_START
        for rec, end in self._scan(fd):
            self._seq, self._end = rec.seq + 1, end

    def _create(self) -> None:
        """Create and preallocate the file, then make it and its directory entry durable; on any
        failure remove what was made, so that the next write tries again."""
        tmp = self.path.with_name(self.path.name + ".new")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            _fallocate(fd, 0, self.capacity)
            os.pwrite(fd, _pack_head(1, 1), _SLOTS[1 % 2])
            os.fsync(fd)
            os.rename(tmp, self.path)
            dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except BaseException:
            os.close(fd)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        self._fd = fd
        self._slot_seq, self._epoch, self._seq, self._end = 1, 1, 0, DATA_START
        log.info("RAID 5 journal created at %s (%s)", self.path, format_size(self.capacity))

    @staticmethod
    def _read_head(fd: int) -> tuple[int, int]:
        best: tuple[int, int] | None = None
        for off in _SLOTS:
            head = _unpack_head(os.pread(fd, _HEAD.size, off))
            if head is not None and (best is None or head[0] > best[0]):
                best = head
        if best is None:
            # Both slots bad: no epoch can be trusted, so no record either.  Records are only
            # ever written after a header was durable, so this is a damaged file, not a crash.
            log.error("RAID 5 journal has no valid header: its records are ignored")
            return 0, 0
        return best

    def _scan(self, fd: int) -> Iterable[tuple[Record, int]]:
        """The records of the current epoch in order, each with the offset after it."""
        pos, seq = DATA_START, 0
        while pos + _REC.size <= self.capacity:
            raw = os.pread(fd, _REC.size, pos)
            if len(raw) < _REC.size:
                return
            magic, kind, epoch, rseq, ld_id, row, col, coff, length, crc = _REC.unpack(raw)
            if (
                magic != _REC_MAGIC
                or epoch != self._epoch
                or rseq != seq
                or kind not in (KIND_DATA, KIND_ZERO)
            ):
                return
            plen = length if kind == KIND_DATA else 0
            if plen > MAX_PAYLOAD or pos + _REC.size + plen > self.capacity:
                return
            payload = os.pread(fd, plen, pos + _REC.size) if plen else b""
            if len(payload) != plen or _crc([raw[:-4], payload]) != crc:
                return
            pos += _REC.size + plen
            seq += 1
            yield Record(kind, rseq, ld_id, row, col, coff, length, payload), pos

    # --- writing ----------------------------------------------------------------------
    def log(
        self,
        ld_id: int,
        row: int,
        col: int,
        coff: int,
        length: int,
        payload: Sequence[Buffer] | None,
        covers: Iterable[Durable],
    ) -> None:
        """Append a record, durable when this returns: column ``col`` of (LD, row) holds
        ``payload`` (the buffers, back to back; None: zeros) at chunklet bytes ``[coff, coff +
        length)``.  ``covers``: the PDs whose in-place writes the record protects (fsynced
        before the record may be dropped).  Raises OutOfSpace or MediumError (nothing logged).
        Once it returns, the caller makes its in-place writes and then calls ``landed``, whatever
        happens (try/finally): until then the record is open and is not dropped."""
        kind = KIND_ZERO if payload is None else KIND_DATA
        parts: list[Buffer] = list(payload) if payload is not None else []
        plen = sum(len(p) for p in parts)
        assert kind == KIND_ZERO or plen == length, (plen, length)
        assert plen <= MAX_PAYLOAD, plen
        with self._lock:
            try:
                self._ensure_open()
                if self._end + _REC.size + plen > self.capacity:
                    self._make_room()
                head = _pack_record(kind, self._epoch, self._seq, ld_id, row, col, coff, length, parts)
                want = _REC.size + plen
                done = _pwritev(self._fd, [head, *parts], self._end, _RWF_DSYNC)
                if done != want:
                    raise OSError(errno.EIO, f"short write to the RAID 5 journal ({done} of {want} bytes)")
                if not _RWF_DSYNC:
                    os.fdatasync(self._fd)
            except OSError as exc:
                raise self._error(exc) from exc
            self._end += want
            self._seq += 1
            self._open += 1
            self.records_written += 1
            for pd in covers:
                self._covered[id(pd)] = pd

    def landed(self) -> None:
        """The in-place writes covered by the caller's last ``log`` are done (or failed)."""
        with self._lock:
            assert self._open > 0, "landed() without an open record"
            self._open -= 1
            if not self._open:
                self._all_landed.notify_all()

    def _error(self, exc: OSError) -> OutOfSpace | MediumError:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return OutOfSpace(
                f"RAID 5 journal {self.path}: its file system is full ({exc.strerror}); a write to a "
                "degraded RAID 5 set needs the journal and was refused, nothing was written",
                reason="raid5-journal-full",
            )
        return MediumError(
            f"RAID 5 journal {self.path}: {exc.strerror or exc}; a write to a degraded RAID 5 set "
            "needs the journal and was refused, nothing was written"
        )

    def _make_room(self) -> None:
        """The journal is full: make every write its records protect durable, then start over.
        Records still open (their in-place writes under way in another thread) are waited for
        first: fsynced before they land, they would be dropped uncovered.  (Lock held; the
        wait releases it.  The caller has no open record of its own: a writer logs, writes in
        place and calls ``landed`` before it logs again.)"""
        while self._open:
            self._all_landed.wait()
        for pd in list(self._covered.values()):
            if not pd.failed:
                pd.fsync()  # MediumError: the write is refused, the records stay
        self.full_resets += 1
        self._new_epoch()

    def _new_epoch(self) -> None:
        slot_seq, epoch = self._slot_seq + 1, self._epoch + 1
        done = _pwritev(self._fd, [_pack_head(slot_seq, epoch)], _SLOTS[slot_seq % 2], _RWF_DSYNC)
        if done != _HEAD.size:
            raise OSError(errno.EIO, "short write of the RAID 5 journal header")
        if not _RWF_DSYNC:
            os.fdatasync(self._fd)
        self._slot_seq, self._epoch, self._seq, self._end = slot_seq, epoch, 0, DATA_START
        self._covered.clear()

    # --- retiring and replay -------------------------------------------------------------
    def mark(self) -> Mark:
        """Where the journal is now: pass to ``retire`` once every PD is fsynced."""
        with self._lock:
            return Mark(self._epoch, self._seq, self._open)

    def retire(self, mark: Mark) -> bool:
        """Every PD was fsynced after ``mark`` was taken: drop the records up to it.  Only when
        none was appended since and none was open at the mark (the simple case; otherwise the
        next flush or a full journal does it).  True when records were dropped."""
        with self._lock:
            if (
                self._fd < 0
                or self._seq == 0
                or mark.open
                or (mark.epoch, mark.seq) != (self._epoch, self._seq)
            ):
                return False
            try:
                self._new_epoch()
            except OSError as exc:
                log.error("RAID 5 journal: cannot start a new epoch (%s); its records stay", exc)
                return False
            return True

    def pending(self) -> list[Record]:
        """The records of the current epoch, in order (for replay at start); none without a file."""
        with self._lock:
            if self._fd < 0 and not self.path.exists():
                return []
            try:
                self._ensure_open()
                return [rec for rec, _ in self._scan(self._fd)]
            except OSError as exc:
                raise MediumError(
                    f"RAID 5 journal {self.path} cannot be read: {exc.strerror or exc}"
                ) from exc

    def reset(self) -> None:
        """Drop every record (after a replay made the parity it covers right, durably)."""
        with self._lock:
            if self._fd < 0:
                return
            try:
                self._new_epoch()
            except OSError as exc:
                raise MediumError(f"RAID 5 journal {self.path}: cannot start a new epoch: {exc}") from exc

    @property
    def live_records(self) -> int:
        return self._seq

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
