"""Repairing redundancy after a PD failed: rebuild onto spare chunklets, restore a PD that turned
out healthy, replace a failed PD by a new one.  One role, taken out of the engine (which only
delegates): it walks the LDs' members, picks spare chunklets, drives each LD's own rebuild job
(logical/raid.py ``start_rebuild``) in bounded steps on the loop, and records the result in the
store.

Lock order: ``DiskRepair.lock`` (one repair at a time) -> an LD's offload hold -> the LD's own lock
(taken inside ``start_rebuild`` and the job's steps).  Host I/O never takes the repair lock: it
runs between the job's steps, and the job sends writes to ranges already copied to the target too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from .errors import Conflict, InvalidArgument, MediumError
from .logical.raid import REBUILD_STEP, Chunklet, LogicalDisk, RaidLevel
from .model import AlertKind, LDHealth, PDHealth, RebuildProgress, Severity
from .physical.header import HEADER_AREA
from .physical.pd import PhysicalDisk

if TYPE_CHECKING:
    from .alerts import AlertBus
    from .failures import FailureRecorder
    from .metadata.store import MetadataStore
    from .metadata.writer import MetadataWriter
    from .pdheaders import PDHeaders
    from .pool.chunklets import ChunkletAllocator
    from .pool.pool import Pool

log = logging.getLogger("thinblock.engine")

Member = tuple[LogicalDisk, int, int]  # (LD, row, column)


class DiskRepair:
    """See the module docstring.  The dictionaries are the engine's own (shared, not copied);
    ``attach_pd`` readies a PD opened anew exactly as the engine readies every PD it opens
    (fence, direct I/O, failure listener, host-full hook), so a restored PD is no exception."""

    def __init__(
        self,
        *,
        pds: dict[int, PhysicalDisk],
        lds: dict[int, LogicalDisk],
        ld_pool: dict[int, Pool],
        chunklets: ChunkletAllocator,
        store: MetadataStore,
        meta: MetadataWriter,
        alerts: AlertBus,
        failures: FailureRecorder,
        headers: Callable[[], PDHeaders],
        attach_pd: Callable[[PhysicalDisk], None],
        refresh_ld_alerts: Callable[[], None],
        remove_pd: Callable[[int], Awaitable[None]],
    ) -> None:
        self._pds = pds
        self._lds = lds
        self._ld_pool = ld_pool
        self._chunklets = chunklets
        self._store = store
        self._meta = meta
        self._alerts = alerts
        self._failures = failures
        self._headers = headers
        self._attach_pd = attach_pd
        self._refresh_ld_alerts = refresh_ld_alerts
        self._remove_pd = remove_pd
        self.lock = asyncio.Lock()
        self.progress = RebuildProgress(False, 0, 0, 0, 0)

    # --- rebuild onto spares --------------------------------------------------------
    async def rebuild(self, progress: Callable[[RebuildProgress], None] | None = None) -> RebuildProgress:
        """Rebuild every degraded LD onto spare chunklets of healthy PDs, in bounded steps on the
        loop (no lock needed against host I/O, which runs between steps)."""
        async with self.lock:
            # Per member, not per LD health: an LD can have lost one row and be merely degraded in another.
            work = [(ld, row, col) for ld in self._lds.values() for row, col in ld.rebuildable_members()]
            lds_total = len({ld.id for ld, _, _ in work})
            total = sum(ld.rows[row][col].pd.chunklet_size for ld, row, col in work)
            done_bytes = 0
            done_lds: set[int] = set()
            self.progress = RebuildProgress(bool(work), lds_total, 0, total, 0)
            if progress:
                progress(self.progress)
            for ld, row, col in work:
                base = done_bytes

                def stepped(n: int, ld: LogicalDisk = ld, base: int = base) -> None:
                    self.progress = RebuildProgress(True, lds_total, len(done_lds), total, base + n, ld.id)
                    if progress:
                        progress(self.progress)

                rebuilt = await self._rebuild_onto_spare(ld, row, col, set(), stepped)
                if rebuilt is None:
                    log.error(
                        "rebuild: no spare chunklet on another healthy PD",
                        extra={"event": "rebuild-no-spare", "ld": ld.id, "row": row},
                    )
                    self._alerts.condition(
                        AlertKind.POOL_OUT_OF_CHUNKLETS,
                        self._ld_pool[ld.id].object_name,
                        Severity.CRITICAL,
                        f"LD {ld.id} cannot be rebuilt: no spare chunklet on a healthy PD outside its RAID set",
                    )
                    continue
                done_bytes = base + ld.chunklet_size
                if not rebuilt:
                    continue
                if ld.health == LDHealth.NORMAL:
                    done_lds.add(ld.id)
                    self._alerts.event(
                        AlertKind.REBUILD_DONE,
                        f"ld:{ld.id}",
                        Severity.INFO,
                        f"LD {ld.id} rebuilt: redundancy restored",
                    )
            self._refresh_ld_alerts()
            self.progress = RebuildProgress(False, lds_total, len(done_lds), total, done_bytes)
            if progress:
                progress(self.progress)
            return self.progress

    async def _rebuild_onto_spare(
        self, ld: LogicalDisk, row: int, col: int, exclude: set[int], on_step: Callable[[int], None]
    ) -> bool | None:
        """Rebuild the failed member (row, col) of ``ld`` onto a free chunklet of a healthy PD
        outside its row and ``exclude`` (PD ids), and record it: True.  None when there is no
        such chunklet; False when the copy failed (logged; the chunklet is given back)."""
        failed = ld.rows[row][col]
        exclude = exclude | {ch.pd.id for ch in ld.rows[row]}
        picked = self._chunklets.pick(1, chunklet_size=failed.pd.chunklet_size, exclude=exclude)
        if picked is None:
            return None
        spare = picked[0]
        self._chunklets.take_zeroed(spare)  # the rebuild writes it whole
        await asyncio.get_running_loop().run_in_executor(
            None, spare.pd.punch, spare.pd.chunklet_offset(spare.index), spare.pd.chunklet_size
        )
        if not await self._rebuild_member(ld, row, col, spare, on_step):
            self._chunklets.release(spare.pd.id, spare.index)
            return False
        await self._meta.call(self._store.replace_chunklet, ld.id, row, col, spare.pd.id, spare.index)
        self._chunklets.release(failed.pd.id, failed.index)
        return True

    async def _rebuild_member(
        self, ld: LogicalDisk, row: int, col: int, target: Chunklet, on_step: Callable[[int], None]
    ) -> bool:
        """Copy the true content of the failed member (row, col) onto ``target`` in bounded steps
        on the loop (host I/O runs between steps; the job sends writes to copied ranges to the
        target too), fsync it: True once ``target`` took the member's place."""
        # No offloaded write may still be landing on a mirror when the copy starts; while the
        # job runs, RAID 1 writes to its row are inline (submit_write).
        ld.hold_offload()
        try:
            await ld.offload_drained()
            job = ld.start_rebuild(row, col, target)
        finally:
            ld.release_offload()
        while not job.done:
            try:
                job.step(REBUILD_STEP)
            except MediumError as exc:  # the target's PD failed, or the set lost a second member
                log.error(
                    "rebuild failed: %s",
                    exc,
                    extra={"event": "rebuild-failed", "ld": ld.id, "row": row, "column": col},
                )
                return False
            on_step(job.bytes_done)
            await asyncio.sleep(0)
        await asyncio.get_running_loop().run_in_executor(None, target.pd.fsync)
        return True

    # --- one PD's members -------------------------------------------------------------
    def _members_on(self, pd: PhysicalDisk) -> list[Member]:
        return [
            (ld, row, col)
            for ld in self._lds.values()
            for row, chunklets in enumerate(ld.rows)
            for col, chunklet in enumerate(chunklets)
            if chunklet.pd is pd
        ]

    def _refuse_unrebuildable(self, pd: PhysicalDisk, what: str, *, raid0_ok: bool = False) -> list[Member]:
        """The members of ``pd``; Conflict when one of them cannot be rebuilt from the others
        (with ``raid0_ok``, RAID 0 members pass: a restore puts them back as they are)."""
        members = self._members_on(pd)
        stuck = sorted(
            {
                ld.id
                for ld, row, col in members
                if (row, col) not in ld.rebuildable_members()
                and not (raid0_ok and ld.raid is RaidLevel.RAID0)
            }
        )
        if stuck:
            raise Conflict(
                f"PD {pd.id} cannot be {what}: LD(s) {', '.join(map(str, stuck))} hold no other copy of"
                " its data (RAID 0, or a row that lost another member)"
            )
        return members

    # --- restore ----------------------------------------------------------------------
    async def restore_pd(self, old: PhysicalDisk) -> PhysicalDisk:
        """A failed PD that turned out healthy, back in service: the PD opened anew.  It missed
        every write since it failed, so each of its LD members is rebuilt in place from the
        others (the rebuild's own job: writes during the copy reach it too) before anything reads
        it again; then its failure is cleared in the store and the PD headers.  Until the last
        member is done the store still says failed: a restart in the middle serves it as failed,
        never stale.

        RAID 0 members have no other copy and need none: every request that touched them failed
        while the PD was failed, so nothing was acknowledged there since; they are put back as
        they are (``LogicalDisk.reinstate_member``) once the PD's header proves it is the same PD.
        A member of a redundant row that lost another member too is refused: which copy is
        current cannot be told."""
        async with self.lock:
            pd_id = old.id
            if not old.failed:
                raise Conflict(f"PD {pd_id} is in service; only a failed PD can be restored")
            members = self._refuse_unrebuildable(old, "restored", raid0_ok=True)
            sole = [(ld, row, col) for ld, row, col in members if ld.raid is RaidLevel.RAID0]
            members = [m for m in members if m[0].raid is not RaidLevel.RAID0]
            old.close()  # its file's lock and fd: the PD is opened anew (a failed PD is never read)
            try:
                fresh = PhysicalDisk.open(
                    pd_id, old.path, size=old.size, chunklet_size=old.chunklet_size, create=False,
                    allow_tiny=True, data_offset=HEADER_AREA,
                )  # fmt: skip
            except (InvalidArgument, MediumError, OSError) as exc:
                raise Conflict(f"PD {pd_id} cannot be restored: {exc}") from None
            problem = self._headers().identity_problems([fresh]).get(fresh)
            if problem is not None:
                fresh.close()
                raise Conflict(f"PD {pd_id} cannot be restored: {problem}")
            self._attach_pd(fresh)
            # In the engine's PDs from now on, so that every flush fsyncs what reaches it; the
            # store still says failed until the end (a restart serves it failed, never stale),
            # and the chunklet allocator keeps the failed one (no new LD is put on it meanwhile).
            self._pds[pd_id] = fresh
            log.warning(
                "restoring PD %d: resynchronising %d member(s) from the others",
                pd_id,
                len(members),
                extra={"event": "pd-restore", "pd": pd_id},
            )
            for ld, row, col in members:
                target = Chunklet(fresh, ld.rows[row][col].index)
                if not await self._rebuild_member(ld, row, col, target, lambda n: None):
                    raise Conflict(f"PD {pd_id} could not be restored: resynchronising LD {ld.id} failed")
            for ld, row, col in sole:
                ld.reinstate_member(row, col, Chunklet(fresh, ld.rows[row][col].index))
            self._chunklets.pds[pd_id] = fresh
            old.remove_failure_listener(self._failures.listener)
            await self._meta.call(self._store.set_pd_health, pd_id, PDHealth.NORMAL.value)
            self._failures.record()  # the headers' failure record no longer names it
            self._alerts.clear(AlertKind.PD_FAILED, f"pd:{pd_id}")
            self._refresh_ld_alerts()
            log.warning("PD %d restored", pd_id, extra={"event": "pd-restored", "pd": pd_id})
            return fresh

    # --- replace ----------------------------------------------------------------------
    async def replace_pd(self, old: PhysicalDisk, new: PhysicalDisk) -> None:
        """Rebuild every LD member of the failed PD ``old`` onto free chunklets of ``new`` (added
        with pd add), then remove ``old``.  Everything is checked before anything is copied,
        with the rules the LDs' rebuild applies to each member (``replacement_problem``); a copy
        that fails stops it (members done so far stay on the new PD)."""
        async with self.lock:
            if old is new:
                raise InvalidArgument(f"PD {old.id} cannot replace itself")
            if not old.failed:
                raise Conflict(
                    f"PD {old.id} is in service: fail it first (pd fail {old.id}), then replace it"
                )
            members = self._refuse_unrebuildable(old, "replaced")
            for ld, row, _ in members:
                problem = ld.replacement_problem(row, new)
                if problem is not None:
                    raise problem
            if self._chunklets.free_count(new.id) < len(members):
                raise Conflict(
                    f"PD {new.id} has {self._chunklets.free_count(new.id)} free chunklet(s); PD {old.id}"
                    f" holds {len(members)}"
                )
            others = set(self._pds) - {new.id}
            for ld, row, col in members:
                if not await self._rebuild_onto_spare(ld, row, col, others, lambda n: None):
                    self._refresh_ld_alerts()
                    raise Conflict(f"replacing PD {old.id}: rebuilding LD {ld.id} onto PD {new.id} failed")
            self._refresh_ld_alerts()
            await self._remove_pd(old.id)
            log.warning(
                "PD %d replaced by PD %d",
                old.id,
                new.id,
                extra={"event": "pd-replaced", "pd": old.id, "new_pd": new.id},
            )
