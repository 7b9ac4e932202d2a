"""RAID logical disks: chunklets of distinct PDs combined by RAID 0, 1 or 5.

An LD is a list of *rows*.  A row is one RAID set: ``set_size`` chunklets on distinct PDs
(its *columns*).  Rows are concatenated: LD bytes ``[r * row_usable, (r + 1) * row_usable)``
live in row ``r``.  Inside a row, with ``step`` the stripe unit:

RAID 0, set of 3: units go round the columns; stripe ``s`` is at chunklet offset ``s * step``::

                col 0   col 1   col 2
    stripe 0:   D0      D1      D2
    stripe 1:   D3      D4      D5

RAID 1, 2 or 3 mirrors: every column holds the whole row (chunklet offset = row offset).

RAID 5, set of 4: rotating parity, left-symmetric (Linux md's default).  Parity of stripe
``s`` is on column ``p = (n - 1) - s % n``; data unit ``d`` of the stripe is on column
``(p + 1 + d) % n``, so consecutive data units walk across every column::

                col 0   col 1   col 2   col 3
    stripe 0:   D0      D1      D2      P
    stripe 1:   D4      D5      P       D3
    stripe 2:   D8      P       D6      D7
    stripe 3:   P       D9      D10     D11

Failure rules (issue 2): RAID 1 and RAID 5 serve reads and writes with one failed member
in a set (RAID 1: any number short of all mirrors).  Two failed members of a RAID 5 set,
or every mirror of a RAID 1 set, lose that row: any I/O touching it raises MediumError.
RAID 0 loses exactly the stripe units on a failed PD.  Other rows keep working.  After a
MediumError from a write, the written range is undefined (as on any disk).

Concurrency: reads and writes normally run on the event-loop thread, but the engine may
zero or flush an LD from a worker thread.  RAID 1 and RAID 5 writes, zeroing, degraded
RAID 5 reads and rebuild steps hold the LD's lock (a RAID 5 read-modify-write must not
interleave with another on the same stripe); healthy reads and RAID 0 take no lock.

Large writes may be handed to I/O threads (``submit_write``, see ``physical.workers``): one
job per PD part, without the lock, so a RAID 1 write's mirror copies are made in parallel.
That is offered where no lock is needed -- RAID 0, and RAID 1 rows with every mirror healthy
and no rebuild job -- and a rebuild must not start while such writes are in flight (it would
copy a range a late mirror write then changes on one side only): the engine calls
``hold_offload``, awaits ``offload_drained`` and only then ``start_rebuild``, which checks.
The counters of offloaded writes are touched on the event-loop thread only.  Writes to a
degraded RAID 5 row, of any size, are offered too (``write_is_journaled``), as one job that
runs the whole ``write`` under the LD's lock: they wait for a synchronous journal write
(below), which is then a worker's wait, not the event loop's.

The RAID 5 write hole: a crash between a data write and its parity write leaves that stripe's
parity stale.  In a healthy set the resync after an unclean stop (``resync``) recomputes it from
the data.  In a degraded set that is impossible (the missing member's units exist only as the
XOR of the survivors), so every write to a degraded row that changes parity first logs the
missing member's content over the range to the LD's ``journal`` (``logical/journal.py``), and
``replay`` recomputes the parity from it at the next start.  An LD without a journal (bare LDs
in tests) keeps the hole; the engine gives every LD its data directory's journal.
"""

from __future__ import annotations

import asyncio
import enum
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..blockdev import Buffer, FileSpan
from ..errors import Conflict, Fenced, InvalidArgument, MediumError
from ..model import LDHealth
from ..physical.pd import FAILURES, PhysicalDisk
from ..physical.workers import Submit
from ..units import KiB, MiB, format_size
from . import parity as px
from .journal import MAX_PAYLOAD, Record, StripeJournal

MIN_STEP = 512
MAX_STEP = 1 * MiB
MAX_RAID0_SET = 32
REBUILD_STEP = 1 * MiB

# Shared sink for parity units a RAID 5 read skips over: reading through them keeps each
# column's read to one preadv.  Its contents are never looked at, so sharing is harmless.
_DISCARD = memoryview(bytearray(MAX_STEP))
# Shared zero source for zeroing partial RAID 5 stripes.
_ZEROS = memoryview(bytes(MAX_STEP))


class RaidLevel(enum.IntEnum):
    RAID0 = 0
    RAID1 = 1
    RAID5 = 5


@dataclass(frozen=True, slots=True)
class Chunklet:
    """Chunklet ``index`` of ``pd``: bytes ``[index * chunklet_size, (index + 1) * chunklet_size)``."""

    pd: PhysicalDisk
    index: int

    @property
    def offset(self) -> int:
        return self.pd.chunklet_offset(self.index)


def _raid_level(raid: int) -> RaidLevel:
    try:
        return RaidLevel(raid)
    except ValueError:
        raise InvalidArgument(f"RAID level must be 0, 1 or 5, not {raid!r}") from None


def validate_policy(raid: int, set_size: int, step: int, chunklet_size: int | None = None) -> None:
    """Check a RAID policy (level, set size, step); InvalidArgument says what is wrong.

    RAID 0: 1..32 chunklets; RAID 1: 2 or 3 mirrors; RAID 5: 3..9 (one of them parity).
    ``step`` (the stripe unit) is a power of two from 512 B to 1 MiB, and no larger than
    the chunklet when ``chunklet_size`` is given."""
    level = _raid_level(raid)
    if level is RaidLevel.RAID0 and not 1 <= set_size <= MAX_RAID0_SET:
        raise InvalidArgument(f"RAID 0 set size must be 1 to {MAX_RAID0_SET}, not {set_size}")
    if level is RaidLevel.RAID1 and set_size not in (2, 3):
        raise InvalidArgument(f"RAID 1 set size (mirrors) must be 2 or 3, not {set_size}")
    if level is RaidLevel.RAID5 and not 3 <= set_size <= 9:
        raise InvalidArgument(f"RAID 5 set size must be 3 to 9, not {set_size}")
    if step <= 0 or step & (step - 1) or not MIN_STEP <= step <= MAX_STEP:
        raise InvalidArgument(
            f"step must be a power of two from {MIN_STEP} B to {format_size(MAX_STEP)}, not {step}"
        )
    if chunklet_size is not None and step > chunklet_size:
        raise InvalidArgument(
            f"step {format_size(step)} is larger than the chunklet ({format_size(chunklet_size)})"
        )


def usable_per_row(raid: int, set_size: int, chunklet_size: int) -> int:
    """Usable bytes of one row (RAID set) of ``set_size`` chunklets."""
    level = _raid_level(raid)
    if level is RaidLevel.RAID0:
        return set_size * chunklet_size
    if level is RaidLevel.RAID1:
        return chunklet_size
    return (set_size - 1) * chunklet_size


# A piece of a request inside one row: (column, offset in the chunklet, offset in the
# request, length).
_Unit = tuple[int, int, int, int]


class LogicalDisk:
    """A RAID LD; implements ``thinblock.blockdev.RawDevice``."""

    def __init__(self, ld_id: int, raid: int, set_size: int, step: int, rows: Sequence[Sequence[Chunklet]]):
        level = _raid_level(raid)
        if not rows:
            raise InvalidArgument(f"LD {ld_id}: an LD needs at least one row of chunklets")
        chunklet_size = rows[0][0].pd.chunklet_size if rows[0] else 0
        validate_policy(level, set_size, step, chunklet_size or None)
        seen: set[tuple[int, int]] = set()
        for r, row in enumerate(rows):
            if len(row) != set_size:
                raise InvalidArgument(
                    f"LD {ld_id}: row {r} has {len(row)} chunklets, the set size is {set_size}"
                )
            pd_ids = [id(ch.pd) for ch in row]
            if len(set(pd_ids)) != len(pd_ids):
                raise InvalidArgument(f"LD {ld_id}: row {r} uses a PD twice; a RAID set needs distinct PDs")
            for ch in row:
                if ch.pd.chunklet_size != chunklet_size:
                    raise InvalidArgument(
                        f"LD {ld_id}: PD {ch.pd.id} has chunklets of {ch.pd.chunklet_size} bytes, "
                        f"not {chunklet_size}"
                    )
                ch.pd.chunklet_offset(ch.index)  # raises InvalidArgument when out of range
                key = (id(ch.pd), ch.index)
                if key in seen:
                    raise InvalidArgument(f"LD {ld_id}: chunklet {ch.index} of PD {ch.pd.id} is used twice")
                seen.add(key)

        self.id = ld_id
        self.raid = level
        self.set_size = set_size
        self.step = step
        self.chunklet_size = chunklet_size
        self.rows: list[list[Chunklet]] = [list(row) for row in rows]
        self.row_usable = usable_per_row(level, set_size, chunklet_size)
        self._size = self.row_usable * len(self.rows)
        # Per-row (PD, byte offset of the chunklet) tuples: the hot path indexes these.
        self._pds: list[tuple[PhysicalDisk, ...]] = []
        self._bases: list[tuple[int, ...]] = []
        for row in self.rows:
            self._pds.append(tuple(ch.pd for ch in row))
            self._bases.append(tuple(ch.offset for ch in row))
        self._stripe_data = (set_size - 1) * step  # RAID 5 data bytes per stripe
        # Degraded RAID 5 writes log here before touching parity (see the module docstring).
        self.journal: StripeJournal | None = None
        self._lock = threading.RLock()
        self._rebuilds: dict[int, list[RebuildJob]] = {}
        # Offloaded writes (submit_write): how many are in flight, how many holders keep new
        # ones inline, and who waits for the count to reach zero.  Event-loop thread only.
        self.offloaded = 0
        self._offload_holds = 0
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._lost_at_flush: set[int] = self._lost_rows()  # losses before we existed were reported then
        # Set by the engine while the failure of a member PD is not recorded yet (engine
        # failures.py, issue 10 case 1): writes raise MediumError with this reason instead of
        # being acknowledged, so nothing is acknowledged that a restart could forget.
        self.write_fence: str | None = None
        # Lost rows, recomputed only when some PD has failed since (see FAILURES).
        self._lost_cache: frozenset[int] = frozenset()
        self._lost_generation = -1
        if level is RaidLevel.RAID0:
            self._read_row = self._r0_read_row
            self._write_row = self._r0_write_row
            self._zero_row = self._r0_zero_row
        elif level is RaidLevel.RAID1:
            self._read_row = self._r1_read_row
            self._write_row = self._r1_write_row
            self._zero_row = self._r1_zero_row
        else:
            self._read_row = self._r5_read_row
            self._write_row = self._r5_write_row
            self._zero_row = self._r5_zero_row

    # --- RawDevice --------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self._size

    def _row_spans(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        """Split an LD range at row boundaries: (row, offset in row, offset in the request, length)."""
        ru = self.row_usable
        r, roff = divmod(offset, ru)
        pos = 0
        while pos < length:
            take = min(ru - roff, length - pos)
            yield r, roff, pos, take
            pos += take
            r += 1
            roff = 0

    def read_into(self, offset: int, buf: memoryview) -> None:
        n = len(buf)
        assert offset >= 0 and offset + n <= self._size, (offset, n, self._size)
        ru = self.row_usable
        r, roff = divmod(offset, ru)
        if roff + n <= ru:
            self._read_row(r, roff, buf)
            return
        for r, roff, pos, take in self._row_spans(offset, n):
            self._read_row(r, roff, buf[pos : pos + take])

    def read(self, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        self.read_into(offset, memoryview(buf))
        return buf

    def file_spans(self, offset: int, length: int) -> list[FileSpan] | None:
        """Where ``read(offset, length)`` would read from, as FileSpans in order (for sendfile),
        or None when it is not a plain copy of file bytes: RAID 5 (parity), a range across
        rows, a PD that cannot give a span.  RAID 1: the mirror ``read`` would choose (the
        first healthy one); RAID 0: one span per stripe unit."""
        ru = self.row_usable
        r, roff = divmod(offset, ru)
        if roff + length > ru or self.raid is RaidLevel.RAID5:
            return None
        pds, bases = self._pds[r], self._bases[r]
        if self.raid is RaidLevel.RAID1:
            for c, pd in enumerate(pds):
                if not pd.failed:
                    span = pd.span(bases[c] + roff, length)
                    return None if span is None else [span]
            return None
        spans: list[FileSpan] = []
        for col, coff, _pos, take in self._r0_units(roff, length):
            span = pds[col].span(bases[col] + coff, take)
            if span is None:
                return None
            spans.append(span)
        return spans

    def write(self, offset: int, data: Buffer) -> None:
        if self.write_fence is not None:
            raise MediumError(self.write_fence)
        mv = data if type(data) is memoryview else memoryview(data)
        n = len(mv)
        assert offset >= 0 and offset + n <= self._size, (offset, n, self._size)
        ru = self.row_usable
        r, roff = divmod(offset, ru)
        if roff + n <= ru:
            self._write_row(r, roff, mv)
        else:
            for r, roff, pos, take in self._row_spans(offset, n):
                self._write_row(r, roff, mv[pos : pos + take])
        if self.write_fence is not None:  # a member failed during this write, not recorded yet
            raise MediumError(self.write_fence)

    def zero(self, offset: int, length: int) -> None:
        """Make the range read as zeros: punch holes on the members (parity of zeros is
        zeros, so whole RAID 5 stripes are punched too); partial RAID 5 stripes are written."""
        assert offset >= 0 and offset + length <= self._size, (offset, length, self._size)
        if self.write_fence is not None:
            raise MediumError(self.write_fence)
        for r, roff, _pos, take in self._row_spans(offset, length):
            self._zero_row(r, roff, take)
        if self.write_fence is not None:
            raise MediumError(self.write_fence)

    def allocate(self, offset: int, length: int) -> None:
        """Give LD range [offset, offset + length) real blocks on every healthy member (data and
        parity), so that writes into it cannot meet a full host file system later (issue 10
        case 5).  HostOutOfSpace (an OutOfSpace) when a member's file system is full."""
        assert offset >= 0 and offset + length <= self._size, (offset, length, self._size)
        for r, roff, _pos, n in self._row_spans(offset, length):
            pds, bases = self._pds[r], self._bases[r]
            for col, (lo, hi) in self._space_spans(roff, n, shared_stripes=True).items():
                if not pds[col].failed:
                    pds[col].allocate(bases[col] + lo, hi - lo)

    def deallocate(self, offset: int, length: int) -> None:
        """Give back the host blocks ``allocate`` gave LD range [offset, offset + length), which
        holds nothing (a region whose assignment was refused: free, so zeros).  RAID 5 stripes
        the range shares with its neighbours are left alone (their parity covers the
        neighbour's data).  Best effort, see ``PhysicalDisk.deallocate``."""
        assert offset >= 0 and offset + length <= self._size, (offset, length, self._size)
        for r, roff, _pos, n in self._row_spans(offset, length):
            pds, bases = self._pds[r], self._bases[r]
            for col, (lo, hi) in self._space_spans(roff, n, shared_stripes=False).items():
                if not pds[col].failed and lo < hi:
                    pds[col].deallocate(bases[col] + lo, hi - lo)

    def _space_spans(self, roff: int, n: int, *, shared_stripes: bool) -> dict[int, tuple[int, int]]:
        """Per column, the chunklet bytes [lo, hi) behind row bytes [roff, roff + n): a contiguous
        row range covers one contiguous range of each column.  RAID 5: whole stripes, parity
        included -- every stripe touched (``shared_stripes``) or only those inside the range."""
        step, k = self.step, self.set_size
        spans: dict[int, tuple[int, int]] = {}
        if self.raid is RaidLevel.RAID1:
            spans = {c: (roff, roff + n) for c in range(k)}
        elif self.raid is RaidLevel.RAID0:
            for col, coff, _p, take in self._r0_units(roff, n):
                lo, hi = spans.get(col, (coff, coff))
                spans[col] = (min(lo, coff), max(hi, coff + take))
        else:
            sd = self._stripe_data
            if shared_stripes:
                s0, s1 = roff // sd, -(-(roff + n) // sd)
            else:
                s0, s1 = -(-roff // sd), (roff + n) // sd
            if s0 < s1:
                spans = {c: (s0 * step, s1 * step) for c in range(k)}
        return spans

    # --- offloaded writes (see the module docstring) ------------------------------------
    def submit_write(
        self, offset: int, data: memoryview, submit: Submit
    ) -> asyncio.Future[list[object]] | None:
        """Hand the write of ``data`` at ``offset`` to I/O threads, one job per PD part (a
        degraded RAID 5 row: one job, the whole journaled ``write``): a future of the parts'
        outcomes (pass them to ``check_write``), or None when this write must be done inline
        with ``write`` (a healthy RAID 5 row, a degraded or rebuilding RAID 1 row, a write that
        spans rows, offload held for a rebuild).  Event-loop thread only."""
        if self.write_fence is not None:
            raise MediumError(self.write_fence)
        if self._offload_holds:
            return None
        n = len(data)
        assert offset >= 0 and offset + n <= self._size, (offset, n, self._size)
        r, roff = divmod(offset, self.row_usable)
        if roff + n > self.row_usable:
            return None
        pds, bases = self._pds[r], self._bases[r]
        if self.raid is RaidLevel.RAID0:
            futures = [
                submit(pds[col].pwritev, bases[col] + start, views)
                for col, (start, views) in self._r0_runs(roff, data).items()
            ]
        elif self.raid is RaidLevel.RAID1:
            if r in self._rebuilds or any(pd.failed for pd in pds):
                return None
            futures = [submit(pd.pwrite, bases[c] + roff, data) for c, pd in enumerate(pds)]
        elif self._journaled_row(r):
            # The whole write in one job, journal record first (``_r5_write_row`` under the LD
            # lock: the record is durable before anything is written in place, as inline).
            futures = [submit(self.write, offset, data)]
        else:
            return None
        self.offloaded += 1
        done = asyncio.gather(*futures, return_exceptions=True)
        done.add_done_callback(self._offload_done)
        return done

    def _journaled_row(self, r: int) -> bool:
        """Whether writes to row ``r`` log to the journal first: RAID 5 with a journal and a
        failed member (one; two lose the row, and the write fails wherever it runs)."""
        return (
            self.raid is RaidLevel.RAID5
            and self.journal is not None
            and any(pd.failed for pd in self._pds[r])
        )

    def write_is_journaled(self, offset: int, length: int) -> bool:
        """Whether a write of ``length`` bytes at ``offset`` logs to the RAID 5 journal before it
        is written in place (a synchronous, ``RWF_DSYNC`` write): the VV then hands it to the I/O
        threads whatever its size, so the event loop does not wait for the journal's disk."""
        if self.raid is not RaidLevel.RAID5 or self.journal is None:
            return False
        r, roff = divmod(offset, self.row_usable)
        return roff + length <= self.row_usable and self._journaled_row(r)

    def _offload_done(self, _done: asyncio.Future[list[object]]) -> None:
        self.offloaded -= 1
        if not self.offloaded and self._drain_waiters:
            waiters, self._drain_waiters = self._drain_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def check_write(self, outcomes: list[object]) -> None:
        """Raise what an offloaded write's parts raised, by the same rules as ``write``: a RAID 1
        write stands if one mirror took it (a mirror that failed marked its PD failed)."""
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        if self.write_fence is not None:
            raise MediumError(self.write_fence)
        if not errors:
            return
        if (
            self.raid is RaidLevel.RAID1
            and len(errors) < len(outcomes)
            and all(isinstance(e, MediumError) for e in errors)
        ):
            return
        raise errors[0]

    def hold_offload(self) -> None:
        """New writes run inline until ``release_offload``; pair with ``offload_drained``."""
        self._offload_holds += 1

    def release_offload(self) -> None:
        assert self._offload_holds > 0
        self._offload_holds -= 1

    async def offload_drained(self) -> None:
        """Return when no offloaded write of this LD is in flight."""
        while self.offloaded:
            waiter = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(waiter)
            await waiter

    def flush(self) -> None:
        """fsync every distinct healthy PD under this LD (members and rebuild targets).  Blocking.

        Raises MediumError when a RAID set lost data since the last flush (a write
        acknowledged since then may be gone), once per loss, like Linux's fsync."""
        pds: dict[int, PhysicalDisk] = {}
        with self._lock:
            for row_pds in self._pds:
                for pd in row_pds:
                    pds[id(pd)] = pd
            for jobs in self._rebuilds.values():
                for job in jobs:
                    pds[id(job.replacement.pd)] = job.replacement.pd
        for pd in pds.values():
            if pd.failed:
                continue
            try:
                pd.fsync()
            except MediumError:
                pass  # the PD is now failed; whether data is lost is decided below
        lost = self._lost_rows()
        new_losses = lost - self._lost_at_flush
        self._lost_at_flush = lost
        if new_losses:
            rows = ", ".join(str(r) for r in sorted(new_losses))
            raise MediumError(
                f"LD {self.id}: data lost in row(s) {rows} (failed PDs); flush cannot make it durable"
            )

    # --- health -----------------------------------------------------------------------
    def _failed_cols(self, r: int) -> list[int]:
        return [c for c, pd in enumerate(self._pds[r]) if pd.failed]

    def _row_lost(self, failed: int) -> bool:
        if self.raid is RaidLevel.RAID0:
            return failed > 0
        if self.raid is RaidLevel.RAID1:
            return failed >= self.set_size
        return failed >= 2

    def _lost_rows(self) -> set[int]:
        return {r for r in range(len(self.rows)) if self._row_lost(len(self._failed_cols(r)))}

    def _refresh_lost_cache(self) -> None:
        self._lost_generation = FAILURES.value
        self._lost_cache = frozenset(self._lost_rows())

    @property
    def health(self) -> LDHealth:
        degraded = False
        for r in range(len(self.rows)):
            failed = len(self._failed_cols(r))
            if self._row_lost(failed):
                return LDHealth.FAILED
            degraded = degraded or failed > 0
        if any(self._rebuilds.values()):
            return LDHealth.REBUILDING
        return LDHealth.DEGRADED if degraded else LDHealth.NORMAL

    def failed_members(self) -> list[tuple[int, int]]:
        """(row, column) of every member whose PD has failed."""
        return [(r, c) for r in range(len(self.rows)) for c in self._failed_cols(r)]

    def rebuildable_members(self) -> list[tuple[int, int]]:
        """Failed members that ``start_rebuild`` would accept now: in a row that has not lost
        its data (an LD can be FAILED in one row and merely degraded in another), and not
        already being rebuilt.  Always empty for RAID 0."""
        if self.raid is RaidLevel.RAID0:
            return []
        out: list[tuple[int, int]] = []
        for r in range(len(self.rows)):
            failed = self._failed_cols(r)
            if not failed or self._row_lost(len(failed)):
                continue
            busy = {job.column for job in self._rebuilds.get(r, ())}
            out.extend((r, c) for c in failed if c not in busy)
        return out

    def is_readable(self, offset: int, length: int) -> bool:
        """False when some byte of the range is lost (reading it would raise MediumError)."""
        assert offset >= 0 and length >= 0 and offset + length <= self._size
        ru = self.row_usable
        end = offset + length
        while offset < end:
            r, roff = divmod(offset, ru)
            take = min(ru - roff, end - offset)
            failed = self._failed_cols(r)
            if failed:
                if self.raid is RaidLevel.RAID0:
                    touched = {
                        u[0] for u in self._r0_units(roff, min(take, self.set_size * self.step + self.step))
                    }
                    if touched.intersection(failed):
                        return False
                elif self._row_lost(len(failed)):
                    return False
            offset += take
        return True

    @property
    def pds(self) -> list[PhysicalDisk]:
        """The distinct PDs holding this LD's chunklets."""
        seen: dict[int, PhysicalDisk] = {}
        for row_pds in self._pds:
            for pd in row_pds:
                seen.setdefault(id(pd), pd)
        return list(seen.values())

    @property
    def rebuild_jobs(self) -> list[RebuildJob]:
        return [job for jobs in self._rebuilds.values() for job in jobs]

    def _lost_error(self, r: int) -> MediumError:
        failed = self._failed_cols(r)
        pds = ", ".join(str(self._pds[r][c].id) for c in failed)
        return MediumError(
            f"LD {self.id} (RAID {int(self.raid)}) row {r}: {len(failed)} of {self.set_size} members "
            f"failed (PD {pds}); the data of this RAID set is lost"
        )

    # --- striping helpers (RAID 0 and RAID 5 data units) --------------------------------
    def _r0_units(self, roff: int, n: int) -> list[_Unit]:
        step, k = self.step, self.set_size
        u, uoff = divmod(roff, step)
        units = []
        pos = 0
        while pos < n:
            take = min(step - uoff, n - pos)
            s, col = divmod(u, k)
            units.append((col, s * step + uoff, pos, take))
            pos += take
            u += 1
            uoff = 0
        return units

    def _r5_units(self, roff: int, n: int) -> list[_Unit]:
        step, k = self.step, self.set_size
        u, uoff = divmod(roff, step)
        units = []
        pos = 0
        while pos < n:
            take = min(step - uoff, n - pos)
            s, d = divmod(u, k - 1)
            p = k - 1 - s % k
            units.append(((p + 1 + d) % k, s * step + uoff, pos, take))
            pos += take
            u += 1
            uoff = 0
        return units

    def _read_runs(self, r: int, units: list[_Unit], buf: memoryview, skip_col: int = -1) -> None:
        """Read ``units`` with one preadv per column: a column's units are consecutive on
        its chunklet, except RAID 5 parity units in between, which are read into a discard
        buffer rather than splitting the read."""
        runs: dict[int, tuple[int, list[memoryview]]] = {}
        ends: dict[int, int] = {}
        for col, coff, pos, take in units:
            if col == skip_col:
                continue
            view = buf[pos : pos + take]
            run = runs.get(col)
            if run is None:
                runs[col] = (coff, [view])
            else:
                gap = coff - ends[col]
                if gap:
                    assert 0 < gap <= self.step, gap  # only a RAID 5 parity unit lies between
                    run[1].append(_DISCARD[:gap])
                run[1].append(view)
            ends[col] = coff + take
        pds, bases = self._pds[r], self._bases[r]
        for col, (start, views) in runs.items():
            pds[col].preadv(bases[col] + start, views)

    # --- RAID 0 -------------------------------------------------------------------------
    def _r0_read_row(self, r: int, roff: int, buf: memoryview) -> None:
        step = self.step
        u, uoff = divmod(roff, step)
        if uoff + len(buf) <= step:  # inside one stripe unit: one pread
            s, col = divmod(u, self.set_size)
            self._pds[r][col].pread_into(self._bases[r][col] + s * step + uoff, buf)
            return
        self._read_runs(r, self._r0_units(roff, len(buf)), buf)

    def _r0_write_row(self, r: int, roff: int, data: memoryview) -> None:
        step = self.step
        u, uoff = divmod(roff, step)
        pds, bases = self._pds[r], self._bases[r]
        if uoff + len(data) <= step:
            s, col = divmod(u, self.set_size)
            pds[col].pwrite(bases[col] + s * step + uoff, data)
            return
        for col, (start, views) in self._r0_runs(roff, data).items():
            pds[col].pwritev(bases[col] + start, views)

    def _r0_runs(self, roff: int, data: memoryview) -> dict[int, tuple[int, list[memoryview]]]:
        """Per column: (chunklet offset, the pieces of ``data``) -- a column's units of a
        contiguous row range are consecutive on its chunklet, so one pwritev each."""
        runs: dict[int, tuple[int, list[memoryview]]] = {}
        for col, coff, pos, take in self._r0_units(roff, len(data)):
            run = runs.get(col)
            if run is None:
                runs[col] = (coff, [data[pos : pos + take]])
            else:
                run[1].append(data[pos : pos + take])
        return runs

    def _r0_zero_row(self, r: int, roff: int, n: int) -> None:
        # A contiguous LD range covers one contiguous range of each column's chunklet.
        spans: dict[int, list[int]] = {}
        for col, coff, _pos, take in self._r0_units(roff, n):
            span = spans.get(col)
            if span is None:
                spans[col] = [coff, coff + take]
            else:
                span[1] = coff + take
        pds, bases = self._pds[r], self._bases[r]
        for col, (lo, hi) in spans.items():
            pds[col].punch(bases[col] + lo, hi - lo)

    # --- RAID 1 -------------------------------------------------------------------------
    def _r1_read_row(self, r: int, roff: int, buf: memoryview) -> None:
        # First healthy mirror: keeps one copy of hot data in the page cache.  A mirror
        # that fails mid-read is marked failed by the PD; try the next one.
        bases = self._bases[r]
        for c, pd in enumerate(self._pds[r]):
            if pd.failed:
                continue
            try:
                pd.pread_into(bases[c] + roff, buf)
                return
            except MediumError:
                continue
        raise self._lost_error(r)

    def _r1_write_row(self, r: int, roff: int, data: memoryview) -> None:
        with self._lock:
            bases = self._bases[r]
            written = 0
            for c, pd in enumerate(self._pds[r]):
                if pd.failed:
                    continue
                try:
                    pd.pwrite(bases[c] + roff, data)
                    written += 1
                except Fenced:
                    raise  # this node may not write: not a member failure
                except MediumError:
                    pass
            if not written:
                raise self._lost_error(r)
            jobs = self._rebuilds.get(r)
            if jobs:
                # Below the watermark the replacement is already a copy: keep it one.
                for job in list(jobs):
                    below = min(len(data), job.bytes_done - roff)
                    if below > 0:
                        job._write_replacement(roff, data[:below])

    def _r1_zero_row(self, r: int, roff: int, n: int) -> None:
        with self._lock:
            bases = self._bases[r]
            zeroed = 0
            for c, pd in enumerate(self._pds[r]):
                if pd.failed:
                    continue
                try:
                    pd.punch(bases[c] + roff, n)
                    zeroed += 1
                except Fenced:
                    raise  # this node may not write: not a member failure
                except MediumError:
                    pass
            if not zeroed:
                raise self._lost_error(r)
            for job in list(self._rebuilds.get(r, ())):
                below = min(n, job.bytes_done - roff)
                if below > 0:
                    job._punch_replacement(roff, below)

    # --- RAID 5 -------------------------------------------------------------------------
    def _r5_read_row(self, r: int, roff: int, buf: memoryview) -> None:
        step, k = self.step, self.set_size
        n = len(buf)
        u, uoff = divmod(roff, step)
        if uoff + n <= step:  # inside one data unit: one pread
            s, d = divmod(u, k - 1)
            col = (k - s % k + d) % k  # (p + 1 + d) % k with p = k - 1 - s % k
            pd = self._pds[r][col]
            if FAILURES.value != self._lost_generation:
                self._refresh_lost_cache()
            # Row-level rule: a set with two failed members is lost as a whole, even the
            # units that happen to sit on a surviving PD.
            if not pd.failed and r not in self._lost_cache:
                try:
                    pd.pread_into(self._bases[r][col] + s * step + uoff, buf)
                    return
                except MediumError:
                    pass
        elif not any(pd.failed for pd in self._pds[r]):
            try:
                self._read_runs(r, self._r5_units(roff, n), buf)
                return
            except MediumError:
                pass
        self._r5_read_row_degraded(r, roff, buf)

    def _r5_read_row_degraded(self, r: int, roff: int, buf: memoryview) -> None:
        """Read with at most one failed column, rebuilding its units from the others."""
        with self._lock:
            while True:
                failed = self._failed_cols(r)
                if len(failed) > 1:
                    raise self._lost_error(r)
                try:
                    units = self._r5_units(roff, len(buf))
                    missing = failed[0] if failed else -1
                    self._read_runs(r, units, buf, skip_col=missing)
                    for col, coff, pos, take in units:
                        if col == missing:
                            self._r5_reconstruct_into(r, missing, coff, buf[pos : pos + take])
                    return
                except MediumError:
                    # Another member failed during the read: retry with one more failed
                    # column (at most set_size times, then the row is lost).
                    if len(self._failed_cols(r)) == len(failed):
                        raise

    def _r5_reconstruct_into(self, r: int, missing: int, coff: int, dest: memoryview) -> None:
        """``dest`` = XOR of the other columns at chunklet offset ``coff`` (data and parity)."""
        k = self.set_size
        pds, bases = self._pds[r], self._bases[r]
        m = px.scratch_matrix(px.OLD, k - 1, len(dest))
        i = 0
        for c in range(k):
            if c != missing:
                pds[c].pread_into(bases[c] + coff, px.view(m[i]))
                i += 1
        px.xor_rows(m, px.as_array(dest))

    def _r5_write_row(self, r: int, roff: int, data: memoryview) -> None:
        n = len(data)
        d_bytes = self._stripe_data
        step = self.step
        with self._lock:
            pos = 0
            while pos < n:
                s, within = divmod(roff + pos, d_bytes)
                if within == 0 and n - pos >= d_bytes:
                    count = (n - pos) // d_bytes
                    if self.journal is not None and self._failed_cols(r):
                        count = min(count, max(1, MAX_PAYLOAD // step))  # one journal record each
                    self._r5_write_full(r, s, count, data[pos : pos + count * d_bytes])
                    pos += count * d_bytes
                else:
                    take = min(d_bytes - within, n - pos)
                    self._r5_write_partial(r, s, within, data[pos : pos + take])
                    pos += take
            jobs = self._rebuilds.get(r)
            if jobs:
                first, last = roff // d_bytes, (roff + n - 1) // d_bytes
                if first == last and (roff % step) + n <= step:  # one unit: resync just its bytes
                    lo = first * step + roff % step
                    hi = lo + n
                else:
                    lo, hi = first * step, (last + 1) * step
                for job in list(jobs):
                    job._resync(lo, hi)

    def _r5_write_full(self, r: int, s0: int, count: int, data: memoryview) -> None:
        """Full-stripe writes: parity straight from the new data, no reads."""
        k, step = self.set_size, self.step
        failed = self._failed_cols(r)
        if len(failed) > 1:
            raise self._lost_error(r)
        parity = px.stripe_parity(px.as_array(data), count, k - 1, step)
        pmv = px.view(parity.reshape(-1))
        pds, bases = self._pds[r], self._bases[r]

        def column(c: int) -> list[memoryview]:
            views: list[memoryview] = []
            for i in range(count):
                p = k - 1 - (s0 + i) % k
                if c == p:
                    views.append(pmv[i * step : (i + 1) * step])
                else:
                    o = (i * (k - 1) + (c - p - 1) % k) * step
                    views.append(data[o : o + step])
            return views

        journal = self.journal if failed else None
        if journal is not None:
            # What the missing member holds after this write, before any of it is written.
            journal.log(self.id, r, failed[0], s0 * step, count * step, column(failed[0]), pds)
        try:
            for c in range(k):
                pd = pds[c]
                if pd.failed:
                    continue
                views = column(c)
                try:
                    pd.pwritev(bases[c] + s0 * step, views)
                except Fenced:
                    raise  # this node may not write: not a member failure
                except MediumError:
                    pass  # tolerated below if it is the only failed member
        finally:
            if journal is not None:
                journal.landed()
        if len(self._failed_cols(r)) > 1:
            raise self._lost_error(r)

    def _r5_write_partial(self, r: int, s: int, within: int, data: memoryview) -> None:
        """Write part of one stripe: read-modify-write of the parity (new parity = old parity
        ^ old data ^ new data), or, when the write lands on the failed column, reconstruct-write."""
        k, step = self.set_size, self.step
        p = k - 1 - s % k
        pieces: list[tuple[int, int, memoryview]] = []  # (column, offset in unit, data)
        d, uoff = divmod(within, step)
        pos = 0
        n = len(data)
        while pos < n:
            take = min(step - uoff, n - pos)
            pieces.append(((p + 1 + d) % k, uoff, data[pos : pos + take]))
            pos += take
            d += 1
            uoff = 0
        # The parity bytes touched: one unit's range, or (spanning units) the whole unit.
        lo, hi = (pieces[0][1], pieces[0][1] + n) if len(pieces) == 1 else (0, step)
        base = s * step
        journal = self.journal
        while True:
            failed = self._failed_cols(r)
            if len(failed) > 1:
                raise self._lost_error(r)
            missing = failed[0] if failed else -1
            try:
                if missing == p:
                    parity = None  # parity member is gone: data alone is the truth
                elif missing >= 0 and (journal is not None or any(col == missing for col, _, _ in pieces)):
                    parity = self._r5_parity_reconstruct(r, base, p, missing, pieces, lo, hi)
                else:
                    parity = self._r5_parity_rmw(r, base, p, pieces, lo, hi)
                break
            except MediumError:
                # A member failed while reading old data/parity; nothing is written yet,
                # so start over with one more failed column.
                if len(self._failed_cols(r)) == len(failed):
                    raise
        pds, bases = self._pds[r], self._bases[r]
        logged = parity is not None and missing >= 0 and journal is not None
        if logged:
            assert journal is not None
            # The write hole: the missing member's bytes [lo, hi) exist only as the XOR of the
            # others, which the writes below change one by one.  Log what they are to be (the
            # reconstruct left them in row ``missing`` of the OLD scratch matrix) before any.
            content = px.scratch_matrix(px.OLD, self.set_size, hi - lo)[missing]
            journal.log(self.id, r, missing, base + lo, hi - lo, [px.view(content)], pds)
        try:
            # Write phase.  Parity first; whichever member fails from here on, the parity
            # computed above is the right one for the new data, so the survivors stay
            # consistent as long as at most one member of the set is failed.
            if parity is not None and not pds[p].failed:
                try:
                    pds[p].pwrite(bases[p] + base + lo, parity)
                except Fenced:
                    raise  # this node may not write: not a member failure
                except MediumError:
                    pass
            for col, uoff, view in pieces:
                if not pds[col].failed:
                    try:
                        pds[col].pwrite(bases[col] + base + uoff, view)
                    except Fenced:
                        raise  # this node may not write: not a member failure
                    except MediumError:
                        pass
        finally:
            if logged:
                assert journal is not None
                journal.landed()
        if len(self._failed_cols(r)) > 1:
            raise self._lost_error(r)

    def _r5_parity_rmw(
        self, r: int, base: int, p: int, pieces: list[tuple[int, int, memoryview]], lo: int, hi: int
    ) -> memoryview:
        pds, bases = self._pds[r], self._bases[r]
        par = px.scratch(px.PARITY, hi - lo)
        pds[p].pread_into(bases[p] + base + lo, px.view(par))
        for col, uoff, view in pieces:
            old = px.scratch(px.OLD, len(view))
            pds[col].pread_into(bases[col] + base + uoff, px.view(old))
            seg = par[uoff - lo : uoff - lo + len(view)]
            px.xor_into(seg, old, px.as_array(view))
        return px.view(par)

    def _r5_parity_reconstruct(
        self,
        r: int,
        base: int,
        p: int,
        missing: int,
        pieces: list[tuple[int, int, memoryview]],
        lo: int,
        hi: int,
    ) -> memoryview:
        """Degraded write: rebuild the stripe's bytes [lo, hi) from the survivors, lay the new
        data over them, and take the parity of the result.  Row ``missing`` of the OLD scratch
        matrix then holds the missing member's bytes as they are after the write."""
        k = self.set_size
        pds, bases = self._pds[r], self._bases[r]
        m = px.scratch_matrix(px.OLD, k, hi - lo)
        for c in range(k):
            if c != missing:
                pds[c].pread_into(bases[c] + base + lo, px.view(m[c]))
        px.xor_rows(m[[c for c in range(k) if c != missing]], m[missing])
        for col, uoff, view in pieces:
            m[col, uoff - lo : uoff - lo + len(view)] = px.as_array(view)
        par = px.scratch(px.PARITY, hi - lo)
        px.xor_rows(m[[c for c in range(k) if c != p]], par)
        return px.view(par)

    def _r5_zero_row(self, r: int, roff: int, n: int) -> None:
        d_bytes, step, k = self._stripe_data, self.step, self.set_size
        end = roff + n
        first_full = -(-roff // d_bytes)
        last_full = end // d_bytes  # exclusive
        with self._lock:
            if first_full >= last_full:  # no whole stripe inside: write zeros
                self._r5_write_zeros(r, roff, n)
                return
            if roff < first_full * d_bytes:
                self._r5_write_zeros(r, roff, first_full * d_bytes - roff)
            # Whole stripes: punch every member over them; parity of zeros is zeros.
            if len(self._failed_cols(r)) > 1:
                raise self._lost_error(r)
            lo, hi = first_full * step, last_full * step
            pds, bases = self._pds[r], self._bases[r]
            failed = self._failed_cols(r)
            journal = self.journal if failed else None
            if journal is not None:
                # A punch torn by a crash would leave the missing member an XOR of what was and
                # was not punched: log that it reads zeros (a record without payload).
                journal.log(self.id, r, failed[0], lo, hi - lo, None, pds)
            try:
                for c in range(k):
                    if not pds[c].failed:
                        try:
                            pds[c].punch(bases[c] + lo, hi - lo)
                        except Fenced:
                            raise  # this node may not write: not a member failure
                        except MediumError:
                            pass
            finally:
                if journal is not None:
                    journal.landed()
            if len(self._failed_cols(r)) > 1:
                raise self._lost_error(r)
            for job in list(self._rebuilds.get(r, ())):
                below = min(hi, job.bytes_done) - lo
                if below > 0:
                    job._punch_replacement(lo, below)
            if last_full * d_bytes < end:
                self._r5_write_zeros(r, last_full * d_bytes, end - last_full * d_bytes)

    def _r5_write_zeros(self, r: int, roff: int, n: int) -> None:
        pos = 0
        while pos < n:
            take = min(len(_ZEROS), n - pos)
            self._r5_write_row(r, roff + pos, _ZEROS[:take])
            pos += take

    # --- resync after an unclean stop ----------------------------------------------------
    def resync(self, offset: int, length: int) -> int:
        """Make the redundancy of LD range [offset, offset + length) agree with its data again;
        returns how many chunklet bytes were rewritten.  Blocking; holds the LD lock.

        After an unclean stop a write may have reached some members of a set and not others:
        one RAID 1 mirror has it, the other not; a RAID 5 stripe has new data and old parity.
        Reads look fine (RAID 1 reads the first healthy mirror) until a member fails -- then
        the same read returns other bytes, or RAID 5 rebuilds a unit from stale parity.  So,
        like Linux md after an unclean shutdown, the first healthy mirror is copied over the
        others where they differ, and parity is recomputed where a stripe does not XOR to
        zero.  Rows with a failed member are left alone (RAID 1 with two or more healthy
        mirrors excepted): there is nothing consistent to compare against."""
        if self.raid is RaidLevel.RAID0:
            return 0
        assert offset >= 0 and offset + length <= self._size, (offset, length, self._size)
        repaired = 0
        with self._lock:
            for r, roff, _pos, take in self._row_spans(offset, length):
                if self.raid is RaidLevel.RAID1:
                    repaired += self._r1_resync(r, roff, take)
                else:
                    repaired += self._r5_resync(r, roff, take)
        return repaired

    def _r1_resync(self, r: int, roff: int, n: int) -> int:
        pds, bases = self._pds[r], self._bases[r]
        healthy = [c for c, pd in enumerate(pds) if not pd.failed]
        if len(healthy) < 2:
            return 0
        first, others = healthy[0], healthy[1:]
        repaired = 0
        pos = 0
        while pos < n:
            take = min(REBUILD_STEP, n - pos)
            want = px.scratch(px.REBUILD_OUT, take)
            pds[first].pread_into(bases[first] + roff + pos, px.view(want))
            for c in others:
                have = px.scratch(px.REBUILD, take)
                pds[c].pread_into(bases[c] + roff + pos, px.view(have))
                if not np.array_equal(have, want):
                    pds[c].pwrite(bases[c] + roff + pos, px.view(want))
                    repaired += take
            pos += take
        return repaired

    def _r5_resync(self, r: int, roff: int, n: int) -> int:
        """Every stripe touching row bytes [roff, roff + n): all k units XOR to zero when the
        parity is right; where not, parity := XOR of the data units."""
        if any(pd.failed for pd in self._pds[r]):
            return 0
        step, k = self.step, self.set_size
        stripe_data = (k - 1) * step
        s, s_end = roff // stripe_data, -(-(roff + n) // stripe_data)
        pds, bases = self._pds[r], self._bases[r]
        batch = max(1, REBUILD_STEP // step)
        repaired = 0
        while s < s_end:
            count = min(batch, s_end - s)
            m = px.scratch_matrix(px.REBUILD, k, count * step)
            for c in range(k):
                pds[c].pread_into(bases[c] + s * step, px.view(m[c]))
            total = px.scratch(px.REBUILD_OUT, count * step)
            px.xor_rows(m, total)
            for i in range(count):
                unit = slice(i * step, (i + 1) * step)
                if total[unit].any():
                    p = k - 1 - (s + i) % k
                    fixed = total[unit] ^ m[p, unit]  # XOR of the data units alone
                    pds[p].pwrite(bases[p] + (s + i) * step, px.view(fixed))
                    repaired += step
            s += count
        return repaired

    # --- journal replay (degraded RAID 5 after an unclean stop) ---------------------------
    def replay(self, record: Record) -> int:
        """Make the parity of the record's range agree with what the record says the missing
        member holds and with what the surviving data units hold now (``logical/journal.py``);
        returns the parity bytes rewritten.  A record for a member that is not the row's one
        failed member is skipped: a healthy row is the resync's work, a lost one has nothing to
        repair.  Blocking; holds the LD lock."""
        assert self.raid is RaidLevel.RAID5, self
        r, col = record.row, record.col
        if not 0 <= r < len(self.rows) or self._failed_cols(r) != [col]:
            return 0
        step, k = self.step, self.set_size
        pds, bases = self._pds[r], self._bases[r]
        content = px.as_array(record.content())
        rewritten = 0
        with self._lock:
            pos, end = record.coff, record.coff + record.length
            while pos < end:
                s, uoff = divmod(pos, step)
                take = min(step - uoff, end - pos)
                p = k - 1 - s % k
                if p != col:  # where the missing member holds parity, the data is the truth
                    m = px.scratch_matrix(px.REBUILD, k - 1, take)
                    m[0] = content[pos - record.coff : pos - record.coff + take]
                    i = 1
                    for c in range(k):
                        if c not in (col, p):
                            pds[c].pread_into(bases[c] + pos, px.view(m[i]))
                            i += 1
                    out = px.scratch(px.REBUILD_OUT, take)
                    px.xor_rows(m, out)
                    pds[p].pwrite(bases[p] + pos, px.view(out))
                    rewritten += take
                pos += take
        return rewritten

    # --- rebuild ------------------------------------------------------------------------
    def replacement_problem(self, row: int, pd: PhysicalDisk) -> InvalidArgument | None:
        """Why ``pd`` cannot take a failed member's place in ``row`` (None: it can).  The one
        statement of the rule, asked by ``start_rebuild`` and, for every member at once before
        anything is copied, by a PD replacement (diskrepair.py)."""
        if pd.failed:
            return InvalidArgument(f"replacement PD {pd.id} has failed")
        if pd.chunklet_size != self.chunklet_size:
            return InvalidArgument(
                f"replacement PD {pd.id} has chunklets of {pd.chunklet_size} bytes, "
                f"LD {self.id} uses {self.chunklet_size}"
            )
        if any(member is pd for member in self._pds[row]):
            return InvalidArgument(
                f"replacement PD {pd.id} already holds a member of the same RAID set (LD {self.id}"
                f" row {row}): a RAID set needs distinct PDs"
            )
        return None

    def start_rebuild(self, row: int, column: int, replacement: Chunklet) -> RebuildJob:
        """Start rebuilding the failed member (row, column) onto ``replacement`` (a free
        chunklet on a healthy PD that is not in the row).  Drive it with ``job.step()``."""
        if self.raid is RaidLevel.RAID0:
            raise Conflict(f"LD {self.id} is RAID 0: there is no redundancy to rebuild from")
        if not 0 <= row < len(self.rows) or not 0 <= column < self.set_size:
            raise InvalidArgument(f"LD {self.id} has no member (row {row}, column {column})")
        if self.offloaded:
            # A mirror write still landing could change a range after the rebuild copied it.
            raise Conflict(
                f"LD {self.id}: {self.offloaded} offloaded write(s) in flight; hold_offload and await "
                "offload_drained before starting a rebuild"
            )
        with self._lock:
            member = self.rows[row][column]
            if not member.pd.failed:
                raise Conflict(f"LD {self.id} row {row} column {column} (PD {member.pd.id}) has not failed")
            jobs = self._rebuilds.get(row, [])
            if any(job.column == column for job in jobs):
                raise Conflict(f"LD {self.id} row {row} column {column} is already being rebuilt")
            rpd = replacement.pd
            problem = self.replacement_problem(row, rpd)
            if problem is not None:
                raise problem
            replacement.pd.chunklet_offset(replacement.index)  # range check
            if any(job.replacement.pd is rpd for job in jobs):
                raise InvalidArgument(
                    f"replacement PD {rpd.id} already holds a member of the same RAID set (LD {self.id}"
                    f" row {row}, being rebuilt): a RAID set needs distinct PDs"
                )
            for other_row in self.rows:
                if replacement in other_row:
                    raise InvalidArgument(
                        f"chunklet {replacement.index} of PD {rpd.id} already belongs to LD {self.id}"
                    )
            if self._row_lost(len(self._failed_cols(row))):
                raise Conflict(f"LD {self.id} row {row} has lost its data; there is nothing to rebuild from")
            job = RebuildJob(self, row, column, replacement)
            self._rebuilds.setdefault(row, []).append(job)
            return job

    def _end_rebuild(self, job: RebuildJob) -> None:
        jobs = self._rebuilds.get(job.row)
        if jobs and job in jobs:
            jobs.remove(job)
            if not jobs:
                del self._rebuilds[job.row]

    def reinstate_member(self, row: int, column: int, chunklet: Chunklet) -> None:
        """Put a RAID 0 member whose PD failed back in place, as it is: ``chunklet`` is the same
        chunklet of the same PD, reopened after it turned out healthy (``Engine.restore_pd``).

        Only RAID 0: there a failed member answered every read and write that touched it with an
        error, so nothing was acknowledged on it since it failed and its content is still the
        member's.  A member of a redundant set missed the writes its row took meanwhile: it
        must be rebuilt (``start_rebuild``), never reinstated."""
        if self.raid is not RaidLevel.RAID0:
            raise Conflict(
                f"LD {self.id} is RAID {int(self.raid)}: a failed member is rebuilt, not reinstated"
            )
        if not 0 <= row < len(self.rows) or not 0 <= column < self.set_size:
            raise InvalidArgument(f"LD {self.id} has no member (row {row}, column {column})")
        with self._lock:
            member = self.rows[row][column]
            if not member.pd.failed:
                raise Conflict(f"LD {self.id} row {row} column {column} (PD {member.pd.id}) has not failed")
            if chunklet.pd.failed or chunklet.pd.id != member.pd.id or chunklet.index != member.index:
                raise InvalidArgument(
                    f"LD {self.id} row {row} column {column}: chunklet {chunklet.index} of PD {chunklet.pd.id} "
                    f"is not its member (chunklet {member.index} of PD {member.pd.id}) back in service"
                )
            self.rows[row][column] = chunklet
            self._pds[row] = tuple(ch.pd for ch in self.rows[row])
            self._bases[row] = tuple(ch.offset for ch in self.rows[row])
            self._lost_generation = -1

    def _complete_rebuild(self, job: RebuildJob) -> None:
        """The replacement is a full copy: it takes the failed member's place."""
        self._end_rebuild(job)
        r, c = job.row, job.column
        self.rows[r][c] = job.replacement
        self._pds[r] = tuple(ch.pd for ch in self.rows[r])
        self._bases[r] = tuple(ch.offset for ch in self.rows[r])
        self._lost_generation = -1

    def _rebuild_range(self, job: RebuildJob, lo: int, hi: int) -> None:
        """Write the member's true content for chunklet bytes [lo, hi) onto the replacement."""
        r, col = job.row, job.column
        pds, bases = self._pds[r], self._bases[r]
        rpd, rbase = job.replacement.pd, job._base
        while lo < hi:
            n = min(REBUILD_STEP, hi - lo)
            out = px.scratch(px.REBUILD_OUT, n)
            if self.raid is RaidLevel.RAID1:
                for c, pd in enumerate(pds):
                    if c == col or pd.failed:
                        continue
                    try:
                        pd.pread_into(bases[c] + lo, px.view(out))
                        break
                    except MediumError:
                        continue
                else:
                    raise self._lost_error(r)
            else:
                others = [c for c in range(self.set_size) if c != col]
                m = px.scratch_matrix(px.REBUILD, len(others), n)
                for i, c in enumerate(others):
                    pds[c].pread_into(bases[c] + lo, px.view(m[i]))
                px.xor_rows(m, out)
            rpd.pwrite(rbase + lo, px.view(out))
            lo += n

    def __repr__(self) -> str:
        return (
            f"LogicalDisk(id={self.id}, RAID {int(self.raid)}, set_size={self.set_size}, step={self.step}, "
            f"rows={len(self.rows)}, size={self._size}, {self.health})"
        )


class RebuildJob:
    """Rebuild of one failed member onto a replacement chunklet, in bounded steps.

    Run ``step()`` on the event-loop thread and yield between steps.  Writes to the row
    meanwhile also reach the replacement below the watermark (``bytes_done``); above it
    the rebuild copies them later.  Reads never use the replacement until it is done; then
    it takes the failed member's place in ``ld.rows`` (the caller records that in the
    metadata store, after fsyncing the replacement PD).

    A failure of the replacement PD, or of another member that leaves nothing to rebuild
    from, ends the job: ``step()`` raises MediumError and ``error`` says why."""

    def __init__(self, ld: LogicalDisk, row: int, column: int, replacement: Chunklet) -> None:
        self.ld = ld
        self.row = row
        self.column = column
        self.replacement = replacement
        self.bytes_total = ld.chunklet_size
        self.bytes_done = 0
        self.done = False
        self.error: str | None = None
        self._base = replacement.offset

    @property
    def failed_member(self) -> Chunklet:
        return self.ld.rows[self.row][self.column] if not self.done else self.replacement

    def step(self, max_bytes: int = 1 << 20) -> int:
        """Rebuild the next ``max_bytes`` (at most) of the member; returns how many."""
        if self.error is not None:
            raise MediumError(
                f"rebuild of LD {self.ld.id} row {self.row} column {self.column} failed: {self.error}"
            )
        if self.done:
            return 0
        with self.ld._lock:
            lo = self.bytes_done
            hi = min(self.bytes_total, lo + max(max_bytes, 4 * KiB))
            try:
                self.ld._rebuild_range(self, lo, hi)
            except MediumError as exc:
                self._abort(str(exc))
                raise
            self.bytes_done = hi
            if hi == self.bytes_total:
                self.done = True
                self.ld._complete_rebuild(self)
            return hi - lo

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop the job; the member stays failed and the replacement chunklet unused."""
        with self.ld._lock:
            if not self.done and self.error is None:
                self._abort(reason)

    def _abort(self, reason: str) -> None:
        self.error = reason
        self.ld._end_rebuild(self)

    # Called by the LD's write paths with the LD lock held.
    def _write_replacement(self, coff: int, data: memoryview) -> None:
        try:
            self.replacement.pd.pwrite(self._base + coff, data)
        except MediumError as exc:
            self._abort(str(exc))  # the host write succeeded on the members; only the rebuild ends

    def _punch_replacement(self, coff: int, length: int) -> None:
        try:
            self.replacement.pd.punch(self._base + coff, length)
        except MediumError as exc:
            self._abort(str(exc))

    def _resync(self, lo: int, hi: int) -> None:
        """RAID 5: a write changed chunklet bytes [lo, hi) of the row; redo the rebuilt part."""
        hi = min(hi, self.bytes_done)
        if lo < hi:
            try:
                self.ld._rebuild_range(self, lo, hi)
            except MediumError as exc:
                self._abort(str(exc))

    def __repr__(self) -> str:
        state = "done" if self.done else f"failed: {self.error}" if self.error else "running"
        return (
            f"RebuildJob(ld={self.ld.id}, row={self.row}, column={self.column}, "
            f"{self.bytes_done}/{self.bytes_total}, {state})"
        )


@dataclass(frozen=True, slots=True)
class ReplayReport:
    records: int  # records found in the journal
    applied: int  # records that found their member still the row's one failed member
    parity_bytes: int  # parity bytes rewritten


def replay_journal(journal: StripeJournal, lds: Mapping[int, LogicalDisk]) -> ReplayReport:
    """Replay every record of ``journal`` in order (``LogicalDisk.replay``), make the parity it
    rewrote durable, then drop the records.  Run at start before serving, before the scrub and
    resync of an unclean start (whose zeroing of free regions writes degraded rows too).
    Blocking.  A record of an LD that no longer exists is skipped (its regions were released:
    zeroed and fsynced before the LD went)."""
    records = journal.pending()
    if not records:
        return ReplayReport(0, 0, 0)
    applied = rewritten = 0
    touched: dict[int, PhysicalDisk] = {}
    for record in records:
        ld = lds.get(record.ld_id)
        if ld is None or ld.raid is not RaidLevel.RAID5:
            continue
        done = ld.replay(record)
        if done or (0 <= record.row < len(ld.rows) and ld._failed_cols(record.row) == [record.col]):
            applied += 1
        rewritten += done
        for pd in ld.pds:
            touched[id(pd)] = pd
    for pd in touched.values():
        if not pd.failed:
            pd.fsync()
    journal.reset()
    return ReplayReport(len(records), applied, rewritten)
