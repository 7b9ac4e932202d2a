"""Starting after a crash, before serving (called by the engine's load): what an interrupted
write may have left behind is made consistent here, off the event loop.

* Degraded RAID 5 writes a crash interrupted: their stripes' parity recomputed from the
  journal (logical/journal.py), before anything reads them.
* An unclean stop (the store's ``clean`` mark is 0): free regions zeroed before they are
  offered, assigned regions of RAID 1 / RAID 5 LDs resynchronised.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from .errors import MediumError
from .logical.journal import StripeJournal
from .logical.raid import LogicalDisk, RaidLevel, replay_journal
from .model import LDHealth
from .pool.pool import Pool
from .units import format_size

log = logging.getLogger("thinblock.engine")


async def replay_raid5_journal(journal: StripeJournal, lds: dict[int, LogicalDisk]) -> None:
    """Degraded RAID 5 writes a crash interrupted: recompute their stripes' parity from the
    journal (logical/journal.py) before anything reads them.  A clean stop leaves none."""
    report = await asyncio.get_running_loop().run_in_executor(None, replay_journal, journal, lds)
    if report.records:
        log.warning(
            "RAID 5 journal replayed: %d record(s), %d applied, %d parity bytes rewritten",
            report.records,
            report.applied,
            report.parity_bytes,
            extra={
                "event": "raid5-journal-replayed",
                "records": report.records,
                "applied": report.applied,
                "bytes": report.parity_bytes,
            },
        )


async def recover_after_unclean_stop(pools: Iterable[Pool]) -> None:
    """After an unclean shutdown, before serving:

    * a free region may hold data whose assignment never reached the store (power cut
      between data and WAL): every free region is zeroed before it is offered;
    * a write in flight at the crash may have reached some members of a RAID set and not
      others: every assigned region of a RAID 1 or RAID 5 LD is resynchronised
      (``LogicalDisk.resync``), so that a later member failure does not change what reads
      return.  This reads the assigned data once; md limits the same pass with a
      write-intent bitmap, which thinblock does not have (yet)."""
    log.warning("unclean shutdown detected: zeroing free regions, resynchronising RAID 1/5 LDs")
    jobs = []
    resyncs = []
    for pool in pools:
        size = pool.region_size
        for slots in pool.slots.values():
            if slots.ld.health == LDHealth.FAILED:
                continue
            for first, count in slots.free_ranges():
                jobs.append((slots.ld, first * size, count * size))
            if slots.ld.raid is not RaidLevel.RAID0:
                for first, count in slots.assigned_ranges():
                    resyncs.append((slots.ld, first * size, count * size))

    def scrub() -> int:
        for ld, offset, length in jobs:
            try:
                ld.zero(offset, length)
            except MediumError as exc:
                log.error("scrub failed: %s", exc, extra={"event": "scrub-failed", "ld": ld.id})
        repaired = checked = 0
        total = sum(length for _, _, length in resyncs)
        started = last_report = time.monotonic()
        for ld, offset, length in resyncs:
            try:
                repaired += ld.resync(offset, length)
            except MediumError as exc:
                log.error("resync failed: %s", exc, extra={"event": "resync-failed", "ld": ld.id})
            checked += length
            if time.monotonic() - last_report >= 10:  # a long pass says how far it got
                last_report = time.monotonic()
                log.warning(
                    "resync: %s of %s checked (%.0f s)",
                    format_size(checked),
                    format_size(total),
                    last_report - started,
                    extra={"event": "resync-progress", "bytes": checked, "total": total},
                )
        for ld in {j[0] for j in jobs + resyncs}:
            try:
                ld.flush()
            except MediumError:
                pass
        return repaired

    repaired = await asyncio.get_running_loop().run_in_executor(None, scrub)
    log.warning(
        "unclean shutdown recovery done: %d bytes of RAID redundancy rewritten",
        repaired,
        extra={"event": "resync-done", "bytes": repaired},
    )
