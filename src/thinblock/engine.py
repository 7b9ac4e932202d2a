"""The engine API: the one entry point every front end (NBD, REST API, CLI via the API,
tests) drives.  It owns the metadata store, the PDs, the pools and their LDs, the VVs
and their caches, and the alert bus.

Threading: every method is called from the event loop thread.  Management methods that
do slow work (zeroing regions on delete, fsync, rebuild) are coroutines and push that
work to threads; listings are plain methods.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import names
from .alerts import AlertBus
from .blockdev import Volume
from .cache.writeback import WriteBackCache
from .datalock import lock_data_dir, share_data_dir
from .diskrepair import DiskRepair
from .errors import (
    AlreadyExists,
    Conflict,
    InvalidArgument,
    LeaseLost,
    MediumError,
    MetadataCorrupt,
    MetadataStoreFull,
    NotFound,
    ThinblockError,
)
from .failures import FailureRecorder
from .fence import WriteFence
from .limits import check_pool_growth, check_snapshot_limits, check_vv_limits
from .logical.journal import FILENAME as JOURNAL_FILE
from .logical.journal import StripeJournal
from .logical.raid import Chunklet, LogicalDisk, RaidLevel, validate_policy
from .metadata import open_store, redact_url
from .metadata.check import check_store
from .metadata.lease import (
    DEFAULT_FENCE_MARGIN,
    DEFAULT_TTL,
    LeaseKeeper,
    ServingGate,
    default_node_name,
    holder_name,
    take_node_lease,
)
from .metadata.reserve import FILENAME as RESERVE_FILE
from .metadata.reserve import StoreReserve
from .metadata.sqlite import SQLiteStore
from .metadata.store import MetadataStore, PoolRow, VVRow
from .metadata.writer import MetadataWriter
from .model import (
    Alert,
    AlertKind,
    CacheMode,
    CheckReport,
    ChunkletRef,
    LDHealth,
    LDInfo,
    PDHealth,
    PDInfo,
    PoolInfo,
    RebuildProgress,
    Severity,
    SnapshotLimitPolicy,
    VVInfo,
    VVStats,
)
from .pdheaders import PDHeaders, offline_problems
from .pdwatch import PDWatch
from .physical.admission import vet_pd_path
from .physical.header import HEADER_AREA
from .physical.pd import PhysicalDisk
from .physical.workers import IOWorkers
from .pool.chunklets import ChunkletAllocator
from .pool.pool import Pool
from .recovery import recover_after_unclean_stop, replay_raid5_journal
from .sessions import SessionRegistry, describe_clients
from .units import GiB, KiB, Limit, MiB, format_size
from .volume import snapspace
from .volume.cow import recover_reservations
from .volume.snapshots import Snapshots
from .volume.vv import VirtualVolume

log = logging.getLogger("thinblock.engine")

DEFAULT_CHUNKLET = 256 * MiB
DEFAULT_REGION = 1 * MiB
DEFAULT_GROWTH_INCREMENT = 1 * GiB
DEFAULT_STEP = 128 * 1024


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()  # "leave this setting as it is" in set_pool / set_vv


@dataclass(frozen=True, slots=True)
class EngineOptions:
    max_dirty_bytes: int = 256 * MiB  # write-back cache: writers wait beyond this
    destage_delay: float = 0.05  # seconds dirty data may sit before destage starts
    default_cache_mode: CacheMode = CacheMode.WRITETHROUGH
    allow_tiny_chunklets: bool = False  # chunklets below 1 MiB (tests and drills only)
    # Write-through writes of at least offload_min_bytes (per region) go to io_threads I/O
    # threads instead of the event loop (physical/workers.py); io_threads 0: all inline.
    io_threads: int = 4
    offload_min_bytes: int = 128 * KiB
    # Seconds between checks of every PD's file and header (truncated, replaced, another PD's);
    # 0: none (tests that want none).  Each check costs a few microseconds per PD.
    pd_check_interval: float = 5.0
    # The node's name in its metadata store (None: the host name) and its lease's time to live:
    # two daemons with one store and one node name cannot both serve (metadata/lease.py).
    node_name: str | None = None
    lease_ttl: float = DEFAULT_TTL
    # A node of a pair (fence.py): stop writing PDs and the store this many seconds before the
    # lease could expire (None: no fence, a single daemon).  ``lease_holder``: who takes the
    # lease (None: this host and data directory; a takeover names itself, so it gets epoch + 1).
    # ``lock_files`` False: no flock on the data directory and PDs (a takeover of a paused
    # partner, which still holds them; the lease fences the two instead).
    fence_margin: float | None = None
    lease_holder: str | None = None
    lock_files: bool = True
    # Where regular-file PDs may lie besides the data directory (physical/admission.py); None:
    # anywhere (tests, embedding).  The daemon always sets it (engine.pd_allowed_roots).
    pd_allowed_roots: tuple[Path, ...] | None = None
    # PDs opened for direct I/O as well (PhysicalDisk.enable_direct_io): aligned reads and writes
    # bypass the host's page cache, as with real disks one wants the cache's memory for oneself.
    pd_direct_io: bool = False


DEFAULT_SET_SIZE = {0: 2, 1: 2, 5: 4}
MAX_VV_SIZE = 1 << 60  # 1 EiB: far past "at least 64 TiB", still exact in every map structure


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class Engine:
    """See the module docstring.  Build with ``await Engine.open(data_dir)``."""

    def __init__(
        self, data_dir: Path, store: MetadataStore, options: EngineOptions, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.data_dir = data_dir
        self.options = options
        self.store = store
        # Every change to the store while serving goes through the writer (metadata/writer.py):
        # the data path never waits on a store round trip of its own.
        self.meta = MetadataWriter(
            store, loop, on_trouble=self._metadata_trouble, on_recovered=self._metadata_recovered
        )
        self.alerts = AlertBus(store, self.meta)  # rows queued on the writer, never awaited
        # Room on the store's file system for the store generation's bump while it is full
        # (metadata/reserve.py); SQLite only.
        self.store_reserve = StoreReserve(data_dir / RESERVE_FILE) if isinstance(store, SQLiteStore) else None
        self.chunklets = ChunkletAllocator()
        self.pds: dict[int, PhysicalDisk] = {}
        self.lds: dict[int, LogicalDisk] = {}
        self.ld_pool: dict[int, Pool] = {}
        self.pools: dict[str, Pool] = {}
        self.vvs: dict[str, VirtualVolume] = {}
        # Clients doing I/O on volumes; front ends register their connections here.
        self.sessions = SessionRegistry()
        self.cache = WriteBackCache(max_dirty=options.max_dirty_bytes, destage_delay=options.destage_delay)
        self.snapshots = Snapshots(
            vvs=lambda: self.vvs,
            make_vv=self._make_vv,
            cache=self.cache,
            meta=self.meta,
            alerts=self.alerts,
            delete_forced=lambda name: self._delete_vv(name, force=True),
        )
        # Degraded RAID 5 writes log here first (logical/journal.py); the file is made on first use.
        self.journal = StripeJournal(data_dir / JOURNAL_FILE)
        self.io = IOWorkers(options.io_threads) if options.io_threads > 0 else None
        self.started = time.time()
        self._loop: asyncio.AbstractEventLoop | None = loop
        self._flush_lock = asyncio.Lock()
        self._flush_requested = 0
        self._flush_done = 0
        # (last ticket, why): the latest flush round that lost data, and the tickets it must fail
        self._flush_failure: tuple[int, str] | None = None
        self._closed = False
        self._lock_fd: int | None = None  # holds the data directory's lock (Engine.open)
        # The data directory's id, store generation and failure-event record (pdheaders.py);
        # set by _load before any PD is used.
        self.headers = PDHeaders("", 0)
        self.failures = FailureRecorder(
            store=store,
            alerts=self.alerts,
            pds=self.pds,
            lds=self.lds,
            refresh_ld_alerts=self._refresh_ld_alerts,
        )
        # Rebuild, restore and replace of PDs (diskrepair.py); its lock also keeps a pool's
        # compaction from moving chunklets under a rebuild.
        self.repair = DiskRepair(
            pds=self.pds,
            lds=self.lds,
            ld_pool=self.ld_pool,
            chunklets=self.chunklets,
            store=store,
            meta=self.meta,
            alerts=self.alerts,
            failures=self.failures,
            headers=lambda: self.headers,
            attach_pd=self._attach_pd,
            refresh_ld_alerts=self._refresh_ld_alerts,
            remove_pd=self.remove_pd,
        )
        # The PDs' identity checked every pd_check_interval, their hosts' full file systems
        # alerted (pdwatch.py).
        self.pd_watch = PDWatch(
            pds=self.pds,
            headers=lambda: self.headers,
            alerts=self.alerts,
            loop=loop,
            interval=options.pd_check_interval,
        )
        self.node_name = options.node_name or ""
        self.lease: LeaseKeeper | None = None  # the node's lease in the store (Engine.open)
        self.fence: WriteFence | None = None  # a node of a pair: writes only under its lease
        # Asked by every volume request: closed once the lease is lost (or, with a shared store,
        # not renewed in time), so that no request is answered by a daemon that may no longer
        # own its volumes (metadata/lease.py).
        self.gate = ServingGate()

    # --- life cycle -------------------------------------------------------------------
    @classmethod
    async def open(
        cls, data_dir: str | Path, options: EngineOptions | None = None, *, metadata: str | None = None
    ) -> Engine:
        """Open (or create) the store named by ``metadata`` (a URL; None: SQLite in ``data_dir``),
        check it (MetadataCorrupt on failure), open PDs, rebuild in-memory maps, start background
        work (destage)."""
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        options = options or EngineOptions()
        lock_fd = lock_data_dir(data_dir) if options.lock_files else None
        try:
            store = open_store(metadata, data_dir)
        except BaseException:
            _unlock(lock_fd)
            raise
        problems = check_store(store)
        if problems:
            store.close()
            _unlock(lock_fd)
            raise MetadataCorrupt(
                f"metadata store {store.url} failed its check, refusing to start "
                f"({len(problems)} problem(s)): " + "; ".join(problems[:10])
            )
        node = options.node_name or default_node_name()
        asked = time.monotonic()
        try:
            lease = take_node_lease(
                store, node, options.lease_holder or holder_name(data_dir), options.lease_ttl
            )
        except BaseException:
            store.close()
            _unlock(lock_fd)
            raise
        engine = cls(data_dir, store, options, asyncio.get_running_loop())
        engine._lock_fd = lock_fd
        engine._loop = engine.failures.loop = asyncio.get_running_loop()
        engine.node_name = node
        if options.fence_margin is not None:
            engine.fence = WriteFence(f"the lease node:{node}")
            engine.cache.fence = engine.meta.fence = engine.fence
        engine.lease = LeaseKeeper(
            engine.meta,
            lease,
            options.lease_ttl,
            on_lost=engine._lease_lost,
            fence=engine.fence,
            margin=options.fence_margin or DEFAULT_FENCE_MARGIN,
            gate=engine.gate,
        )
        engine.lease.granted(asked)
        try:
            await engine._load()
        except BaseException:
            engine._close_files()
            raise
        engine.cache.start()
        engine.pd_watch.start()
        # Loading a big store can outlast the gate's deadline (0.8 of the lease, counted from its
        # acquisition): renewed once now, so that serving starts with a whole lease ahead.
        await engine.lease.renew_once()
        engine.lease.start()
        return engine

    @staticmethod
    def check(data_dir: str | Path | None, metadata: str | None = None) -> CheckReport:
        """Check a store without opening it for service (``thinblock check``).  A data directory a
        running daemon holds is not checked: its store changes under the check."""
        try:
            lock_fd = share_data_dir(Path(data_dir)) if data_dir is not None else None
        except Conflict as exc:
            return CheckReport(False, [f"{exc}: stop it before checking its store offline"], {})
        try:
            return Engine._check_store(data_dir, metadata)
        finally:
            if lock_fd is not None:
                os.close(lock_fd)

    @staticmethod
    def _check_store(data_dir: str | Path | None, metadata: str | None) -> CheckReport:
        try:
            store = open_store(metadata, data_dir, create=False)
        except (MetadataCorrupt, InvalidArgument) as exc:
            return CheckReport(False, [str(exc)], {})
        except ThinblockError as exc:
            return CheckReport(False, [f"metadata store {redact_url(metadata or '')}: {exc}"], {})
        try:
            problems = check_store(store)
            counts: dict[str, int] = {}
            if not problems:
                counts = store.counts()
                for row in store.load_pds():
                    if not os.path.exists(row.path):
                        problems.append(f"PD {row.id} at {row.path} is missing")
                problems += offline_problems(store)
            return CheckReport(not problems, problems, counts)
        finally:
            store.close()

    async def _load(self) -> None:
        store = self.store
        pd_rows = store.load_pds()
        self.headers = self.failures.headers = PDHeaders.load(store, has_pds=bool(pd_rows))
        if self.store_reserve is not None:
            self.store_reserve.ensure()
        # The generation read is what PD headers may carry from now on: durable first (after a
        # kill -9 the WAL may hold commits the page cache has not written back).
        store.sync()
        for row in pd_rows:
            pd = self._open_pd(row.id, row.path, row.size, row.chunklet_size)
            if row.health == PDHealth.FAILED.value and not pd.failed:
                pd.fail("marked failed before the restart")
        self._check_pd_headers()
        for prow in store.load_pools():
            pool = self._make_pool(prow)
        pools_by_id = {p.id: p for p in self.pools.values()}
        for lrow in store.load_lds():
            pool = pools_by_id[lrow.pool_id]
            n_rows = 1 + max(r for r, _ in lrow.chunklets)
            rows = [
                [
                    Chunklet(self.pds[lrow.chunklets[(r, c)][0]], lrow.chunklets[(r, c)][1])
                    for c in range(lrow.set_size)
                ]
                for r in range(n_rows)
            ]
            for r in rows:
                for ch in r:
                    self.chunklets.mark_used(ch.pd.id, ch.index)
            ld = LogicalDisk(lrow.id, RaidLevel(lrow.raid), lrow.set_size, lrow.step, rows)
            ld.journal = self.journal
            self.lds[ld.id] = ld
            self.ld_pool[ld.id] = pool
            pool.attach_ld(ld, lrow.regions)
        vvs_by_id: dict[int, VirtualVolume] = {}
        for vrow in store.load_vvs():
            vv = self._make_vv(vrow, pools_by_id[vrow.pool_id])
            vvs_by_id[vv.row.id] = vv
        # The region maps, from one array of the whole map (the check just read it): a million
        # regions load in about a second, vectorised per VV and per LD.
        self._load_maps(store.map_array(), vvs_by_id)
        store.forget_map_array()  # the maps and pool bitmaps hold it now
        recover_reservations(store, self.pools.values())  # copies on write a crash interrupted
        for pd in self.pds.values():
            if pd.failed:  # recorded already or not: the store and the headers say so, alerts are raised
                self.failures.unrecorded.setdefault(pd.id, pd.failure_reason or "failed")
        self.failures.activate()
        # Before the unclean-start pass: its scrub writes degraded rows too (through the journal).
        await replay_raid5_journal(self.journal, self.lds)
        if store.get_meta("clean") == "0":
            await recover_after_unclean_stop(self.pools.values())
        store.set_meta("clean", "0")
        self.headers.start_counting(store)

    def _check_pd_headers(self) -> None:
        """Every PD's header against the store (pdheaders.py), before anything is read or written:
        a store older than the PDs refuses to start; a PD that is not what the store says, or
        that the freshest failure record names, is failed."""
        findings = self.headers.verify_at_open(self.pds.values())
        self.headers.refuse_if_store_behind(findings)
        for pd_id, why in findings.wrong.items():
            self.pds[pd_id].fail(f"refused at open: {why}")
        for pd_id, why in findings.stale.items():
            pd = self.pds.get(pd_id)
            if pd is not None and not pd.failed:
                pd.fail(f"stale: {why}")

    def _load_maps(self, rows: np.ndarray, vvs_by_id: dict[int, VirtualVolume]) -> None:
        if not len(rows):
            return
        packed_all = (rows[:, 2] << 32) | rows[:, 3]
        for vv_id in np.unique(rows[:, 0]):
            sel = rows[:, 0] == vv_id
            vv = vvs_by_id[int(vv_id)]
            vv.map.load(rows[sel, 1], packed_all[sel])
        for ld_id in np.unique(rows[:, 2]):
            indexes = rows[rows[:, 2] == ld_id, 3]
            self.ld_pool[int(ld_id)].load_references(int(ld_id), indexes)
        # Snapshot space (volume/snapspace.py): which references are snapshots', then the counters.
        for vv in vvs_by_id.values():
            if vv.snapshot_of is not None:
                vv.pool.space.load_snapshot_holders(vv.map.packed_array(), vv.snapshot_of)
        for pool in self.pools.values():
            pool.space.recount_snapshot_space()
            pool.space.changed.clear()
        for vv in vvs_by_id.values():
            snapspace.check_alerts(vv)

    def _open_pd(self, pd_id: int, path: str, size: int, chunklet_size: int) -> PhysicalDisk:
        try:
            pd = PhysicalDisk.open(
                pd_id,
                path,
                size=size,
                chunklet_size=chunklet_size,
                create=False,
                allow_tiny=True,
                data_offset=HEADER_AREA,
                lock=self.options.lock_files,
            )
        except InvalidArgument as exc:
            # A PD that vanished is a failed disk, not a reason to refuse to serve the others.
            pd = PhysicalDisk(pd_id, path, -1, size, chunklet_size, False, data_offset=HEADER_AREA)
            pd.fail(f"cannot open: {exc}")
        self._register_pd(pd)
        return pd

    def _register_pd(self, pd: PhysicalDisk, zeroed: bool = False) -> None:
        self.pds[pd.id] = pd
        self._attach_pd(pd)
        self.chunklets.add_pd(pd, zeroed=zeroed)

    def _attach_pd(self, pd: PhysicalDisk) -> None:
        """Ready a PD the engine opened (at start, added, or opened anew by a restore): under
        the node's write fence, direct I/O as configured, its failures recorded, its host's
        full file system alerted."""
        pd.fence = self.fence
        if self.options.pd_direct_io:
            pd.enable_direct_io()
        pd.add_failure_listener(self.failures.listener)
        pd.on_no_space = self.pd_watch.no_space

    def _make_pool(self, row: PoolRow) -> Pool:
        pool = Pool(row, meta=self.meta, alerts=self.alerts, chunklets=self.chunklets, ld_registry=self.lds)
        pool.on_ld_created = self._ld_created
        pool.on_snapshot_space = self._snapshot_space_changed
        self.pools[row.name] = pool
        return pool

    def _make_vv(self, row: VVRow, pool: Pool) -> VirtualVolume:
        vv = VirtualVolume(
            row,
            pool,
            meta=self.meta,
            alerts=self.alerts,
            lds=self.lds,
            cache=self.cache,
            flush_node=self.flush_all,
            io=self.io,
            offload_min=self.options.offload_min_bytes,
            # Around the cache only where the PDs' page cache takes the write as fast as the
            # cache would: with direct I/O the cache is what makes write-back fast.
            writeback_bypass_min=None if self.options.pd_direct_io else self.options.offload_min_bytes,
            serving=self.gate,
        )
        vv.tree = self.snapshots
        vv.invalidate_oldest = self.snapshots.invalidate_oldest
        self.vvs[row.name] = vv
        pool.vv_count += 1
        return vv

    def _snapshot_space_changed(self, vv_ids: list[int]) -> None:
        """The pool's snapshot space counters moved: those volumes' warning and limit alerts."""
        wanted = set(vv_ids)
        for vv in self.vvs.values():
            if vv.row.id in wanted and not vv.deleted:
                snapspace.check_alerts(vv)

    def _metadata_trouble(self, exc: Exception) -> None:
        """The store refused a write (full, unreachable, lease lost): say so once, as an alert."""
        if isinstance(exc, LeaseLost) and self.lease is not None:
            self.lease.check_soon()  # expired and taken back, or lost: the keeper decides now
        if isinstance(exc, MetadataStoreFull):
            kind, why = AlertKind.METADATA_STORE_FULL, "is full"
        else:
            kind, why = AlertKind.METADATA_UNAVAILABLE, "refuses writes"
        self.alerts.condition(
            kind,
            "metadata",
            Severity.CRITICAL,
            f"metadata store {self.store.url} {why}: writes that need a new region fail until it"
            f" accepts writes again ({exc})",
        )

    def _metadata_recovered(self) -> None:
        if self.store_reserve is not None:
            self.store_reserve.ensure()  # released while the store was full: room again
        was_away = self.alerts.is_open(AlertKind.METADATA_UNAVAILABLE, "metadata")
        self.alerts.clear(AlertKind.METADATA_STORE_FULL, "metadata")
        self.alerts.clear(AlertKind.METADATA_UNAVAILABLE, "metadata")
        if was_away:
            self.alerts.event(
                AlertKind.METADATA_RECONNECTED,
                "metadata",
                Severity.INFO,
                f"metadata store {self.store.url} accepts writes again: new regions are assigned again",
            )

    def _lease_lost(self, message: str) -> None:
        """The lease is gone to another holder: the gate is closed (every request of every
        volume fails with EIO from now on, never a stale success); say so, and disconnect the
        front ends' clients, so that they notice now and look for the volume's new owner."""
        self.alerts.condition(AlertKind.LEASE_LOST, f"node:{self.node_name}", Severity.CRITICAL, message)
        sessions = self.sessions.all()
        log.error(
            "lease lost: this daemon stopped serving its %d volume(s); disconnecting %d client(s)",
            len(self.vvs),
            len(sessions),
            extra={"event": "serving-stopped", "volumes": len(self.vvs), "clients": len(sessions)},
        )
        for session in sessions:
            session.disconnect()

    def _ld_created(self, ld: LogicalDisk, pool: Pool) -> None:
        ld.journal = self.journal
        self.ld_pool[ld.id] = pool

    async def close(self) -> None:
        """Destage and flush everything, stop background work, mark the store clean."""
        if self._closed:
            return
        await self.cache.stop()
        # Writes still with the I/O threads (their requests were abandoned: a connection
        # dropped at shutdown) land before the files close.  The pool's write_landed callback
        # (releasing regions given back meanwhile) is queued with the LD's own when a write
        # completes, so it has run by the time offload_drained returns.
        for ld in list(self.lds.values()):
            await ld.offload_drained()
        if self.io is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.io.shutdown)
        try:
            await self.flush_all()
            if self.cache.errors:  # acknowledged writes lost by their destage, never reported
                raise MediumError("; ".join(e for lost in self.cache.errors.values() for e in lost))
        except MediumError as exc:
            log.error("final flush failed: %s", exc)
        else:
            try:
                await self.meta.call(self.store.set_meta, "clean", "1")
                await asyncio.get_running_loop().run_in_executor(None, self.store.sync)
            except ThinblockError as exc:  # the store full or gone: the next start is an unclean one
                # Every write is durable (the flush succeeded); only the mark is missing, so the
                # next start re-checks redundancy as after a crash (safe, slower): not a failed stop.
                log.error(
                    "could not mark the metadata store clean (%s): all data is flushed; the next start"
                    " will check free regions and RAID redundancy as after a crash",
                    exc,
                    extra={"event": "clean-mark-not-written"},
                )
        self.pd_watch.stop()
        if self.lease is not None:
            await self.lease.stop(release=True)  # after the last write it fences
        await self.meta.close()
        self._closed = True
        self._close_files()

    def _close_files(self) -> None:
        self.failures.close()
        for pd in self.pds.values():
            try:
                pd.close()
            except OSError:
                pass
        self.store.close()
        self.journal.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the data directory's lock
            self._lock_fd = None

    async def flush_all(self) -> None:
        """Every write acknowledged before this call becomes durable: destage the cache, fsync
        every PD, make the store's commits durable.  Concurrent callers share fsync rounds: a
        round that *started* after a caller asked covers that caller."""
        self._flush_requested += 1
        ticket = self._flush_requested
        async with self._flush_lock:
            if self._flush_done < ticket:
                target = self._flush_requested
                # A destage that fails is reported by its volume's next FLUSH (VV.flush), not here:
                # this round may be the node's own (a pair's destage report, a move, a takeover).
                await self.cache.destage_all()
                pending = {pool: pool.take_pending() for pool in self.pools.values()}
                try:
                    pds = [pd for pd in self.pds.values() if not pd.failed]
                    journal_mark = self.journal.mark()  # records before it are covered by this round
                    # The store generation moves with metadata (pdheaders.py): a store that later
                    # loses this flush's commits is then found older than the PD headers.  Bumped
                    # in _sync_all, off the loop: with a remote store the bump is a round trip.
                    failures = await asyncio.get_running_loop().run_in_executor(
                        None, _sync_all, pds, self.store, self.headers, self.store_reserve
                    )
                except BaseException:
                    for pool, batch in pending.items():
                        pool.return_pending(batch)  # not known to be durably zero
                    raise
                for pool, batch in pending.items():
                    pool.free_pending(batch)
                if not failures:
                    self.journal.retire(journal_mark)
                if self.store_reserve is not None and not self.store_reserve.in_place:
                    self.store_reserve.ensure()  # released by a bump: made again once there is room
                self._flush_done = target
                if failures:
                    # The lost write may have been acknowledged before any flush asked for so far
                    # (waiting ones included, which this round covers or the next one runs for):
                    # every one of them fails, not only the caller that ran this round.
                    self._flush_failure = (self._flush_requested, "; ".join(failures))
        failure = self._flush_failure
        if failure is not None and ticket <= failure[0]:
            raise MediumError("flush could not make every write durable: " + failure[1])

    # --- PD failure (recorded by failures.py) -----------------------------------------------
    def _refresh_ld_alerts(self) -> None:
        for ld in self.lds.values():  # first, so that an alert that cannot be stored stops nothing
            slots = self.ld_pool[ld.id].slots.get(ld.id)
            if slots is not None:
                slots.lost = ld.health == LDHealth.FAILED
        for ld in self.lds.values():
            health = ld.health
            obj = f"ld:{ld.id}"
            if health == LDHealth.FAILED:
                self.alerts.condition(
                    AlertKind.LD_FAILED,
                    obj,
                    Severity.CRITICAL,
                    f"LD {ld.id} (RAID {int(ld.raid)}) lost data: too many failed PDs; its lost regions answer EIO",
                )
            elif health in (LDHealth.DEGRADED, LDHealth.REBUILDING):
                self.alerts.condition(
                    AlertKind.LD_DEGRADED,
                    obj,
                    Severity.WARNING,
                    f"LD {ld.id} (RAID {int(ld.raid)}) is degraded: a member PD failed; run a rebuild",
                )
            else:
                self.alerts.clear(AlertKind.LD_DEGRADED, obj)
                self.alerts.clear(AlertKind.LD_FAILED, obj)

    # --- physical disks -------------------------------------------------------------
    async def add_pd(
        self,
        path: str | Path,
        size: int | None = None,
        chunklet_size: int = DEFAULT_CHUNKLET,
        *,
        force: bool = False,
        confirm: str | None = None,
    ) -> PDInfo:
        """Add a file (created sparse at ``size`` if missing), an empty file or a block device;
        whatever could hurt the host is refused first (physical/admission.py).  ``force`` and
        ``confirm`` (the device path, typed) take a block device holding a signature."""
        if "\0" in os.fspath(path):
            raise InvalidArgument("a PD path must not contain a NUL byte")
        admitted = vet_pd_path(
            os.path.abspath(os.fspath(path)),
            data_dir=self.data_dir,
            data_dir_id=self.headers.data_dir_id or None,
            allowed_roots=self.options.pd_allowed_roots,
            force=force,
            confirm=confirm,
        )
        path = admitted.path
        if admitted.empty_file:
            if size is None:
                raise InvalidArgument(f"{path} is empty; give a size to use it as a PD")
            os.truncate(path, HEADER_AREA + size)
        if any(pd.path == path for pd in self.pds.values()):
            raise AlreadyExists(
                f"{path} is already PD {next(p.id for p in self.pds.values() if p.path == path)}"
            )
        try:
            pd = PhysicalDisk.open(
                0,
                path,
                size=size,
                chunklet_size=chunklet_size,
                create=True,
                allow_tiny=self.options.allow_tiny_chunklets,
                data_offset=HEADER_AREA,
            )
            pd.fence = self.fence  # before its header is written (_register_pd attaches the rest)
        except InvalidArgument:
            raise
        except (OSError, ValueError) as exc:
            raise InvalidArgument(f"cannot use {path} as a PD: {exc}") from None

        try:
            pd_id = await self.meta.call(self.store.add_pd, path, pd.size, pd.chunklet_size)
        except BaseException:
            pd.close()
            raise
        pd.id = pd_id
        try:
            # Its header, durably, before any chunklet of it is used (physical/header.py).
            pd.write_header(self.headers.header_for(pd))
        except MediumError as exc:
            pd.close()
            await self.meta.call(self.store.remove_pd, pd_id)
            raise InvalidArgument(f"cannot use {path} as a PD: its header cannot be written: {exc}") from None
        self._register_pd(pd, zeroed=pd.created)
        # New chunklets may let a pool that ran out grow again.
        for pool in self.pools.values():
            self.alerts.clear(AlertKind.POOL_OUT_OF_CHUNKLETS, pool.object_name)
        log.info(
            "pd added",
            extra={
                "event": "pd-added",
                "pd": pd_id,
                "path": path,
                "size": pd.size,
                "chunklets": pd.chunklet_count,
            },
        )
        return self.get_pd(pd_id)

    def _pd(self, pd_id: int) -> PhysicalDisk:
        try:
            return self.pds[int(pd_id)]
        except (KeyError, ValueError):
            raise NotFound(f"PD {pd_id} not found") from None

    def _pd_info(self, pd: PhysicalDisk) -> PDInfo:
        used = self.chunklets.used_count(pd.id)
        return PDInfo(
            pd.id,
            pd.path,
            pd.size,
            pd.chunklet_size,
            pd.chunklet_count,
            used,
            pd.chunklet_count - used,
            pd.health,
        )

    def list_pds(self) -> list[PDInfo]:
        return [self._pd_info(pd) for pd in self.pds.values()]

    def get_pd(self, pd_id: int) -> PDInfo:
        return self._pd_info(self._pd(pd_id))

    async def fail_pd(self, pd_id: int) -> PDInfo:
        """Mark a PD failed (drills); its LDs go degraded or failed and alerts fire."""
        pd = self._pd(pd_id)
        if not pd.failed:
            pd.fail("failed by the administrator")
        return self._pd_info(pd)

    async def remove_pd(self, pd_id: int) -> None:
        """Only when none of its chunklets is used (Conflict otherwise)."""
        pd = self._pd(pd_id)
        used = self.chunklets.used_count(pd.id)
        if used:
            raise Conflict(f"PD {pd.id} still holds {used} chunklet(s) of LDs; rebuild or release them first")
        self.chunklets.remove_pd(pd.id)
        del self.pds[pd.id]
        pd.remove_failure_listener(self.failures.listener)
        pd.close()
        await self.meta.call(self.store.remove_pd, pd.id)
        self.alerts.clear_object(f"pd:{pd.id}")
        self.failures.record()  # the failure record in the headers no longer names it

    # --- pools ----------------------------------------------------------------------
    async def create_pool(
        self,
        name: str,
        *,
        raid: int,
        set_size: int | None = None,
        step: int = DEFAULT_STEP,
        region_size: int = DEFAULT_REGION,
        growth_increment: int | None = None,
        growth_warning: int | None = None,
        growth_limit: int | None = None,
    ) -> PoolInfo:
        """set_size defaults: RAID 0 -> 2, RAID 1 -> 2, RAID 5 -> 4.  growth_increment defaults
        to 1 GiB, or to the growth limit when that is smaller."""
        if growth_increment is None:
            growth_increment = DEFAULT_GROWTH_INCREMENT
            if growth_limit is not None and 0 < growth_limit < growth_increment:
                growth_increment = growth_limit
        names.POOL.check(name)
        if name in self.pools:
            raise AlreadyExists(f"pool '{name}' already exists")
        if raid not in DEFAULT_SET_SIZE:
            raise InvalidArgument(f"RAID level must be 0, 1 or 5, not {raid}")
        if set_size is None:
            set_size = DEFAULT_SET_SIZE[raid]
        validate_policy(RaidLevel(raid), set_size, step)
        if not _is_power_of_two(region_size) or region_size < 4096:
            raise InvalidArgument(f"region size must be a power of two of at least 4 KiB, not {region_size}")
        if growth_increment <= 0:
            raise InvalidArgument(f"growth increment must be positive, not {growth_increment}")
        for what, value in (("growth warning", growth_warning), ("growth limit", growth_limit)):
            if value is not None and value <= 0:
                raise InvalidArgument(f"{what} must be positive, not {value}")
        check_pool_growth(
            name, increment=growth_increment, warning=growth_warning, limit=growth_limit, capacity=0
        )
        usable_pds = [
            pd for pd in self.pds.values() if not pd.failed and self.chunklets.free_count(pd.id) > 0
        ]
        if set_size > len(usable_pds):
            raise InvalidArgument(
                f"a RAID {raid} set of {set_size} needs {set_size} PDs with free chunklets;"
                f" there are {len(usable_pds)}"
            )
        row = PoolRow(
            0, name, raid, set_size, step, region_size, growth_increment, growth_warning, growth_limit
        )
        row.id = await self.meta.call(self.store.add_pool, row)
        pool = self._make_pool(row)
        log.info(
            "pool created",
            extra={
                "event": "pool-created",
                "pool": name,
                "raid": raid,
                "set_size": set_size,
                "region_size": region_size,
            },
        )
        return self._pool_info(pool)

    def _pool(self, name: str) -> Pool:
        try:
            return self.pools[name]
        except (KeyError, TypeError):
            raise NotFound(f"pool '{name}' not found") from None

    def _pool_info(self, pool: Pool) -> PoolInfo:
        r = pool.row
        capacity = pool.capacity
        used = pool.used_regions * r.region_size
        return PoolInfo(
            r.name,
            r.raid,
            r.set_size,
            r.step,
            r.region_size,
            capacity,
            used,
            capacity - used,
            r.growth_increment,
            r.growth_warning,
            r.growth_limit,
            len(pool.slots),
            pool.vv_count,
            pool.state(),
        )

    def list_pools(self) -> list[PoolInfo]:
        return [self._pool_info(p) for p in self.pools.values()]

    def get_pool(self, name: str) -> PoolInfo:
        return self._pool_info(self._pool(name))

    async def set_pool(
        self,
        name: str,
        *,
        growth_increment: Any = UNSET,
        growth_warning: Any = UNSET,
        growth_limit: Any = UNSET,
    ) -> PoolInfo:
        """Pass None to remove a warning or limit."""
        pool = self._pool(name)
        row = pool.row
        new = replace(row)
        if growth_increment is not UNSET:
            if not isinstance(growth_increment, int) or growth_increment <= 0:
                raise InvalidArgument(f"growth increment must be positive, not {growth_increment}")
            new.growth_increment = growth_increment
        for field, value in (("growth_warning", growth_warning), ("growth_limit", growth_limit)):
            if value is UNSET:
                continue
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise InvalidArgument(f"{field.replace('_', ' ')} must be positive or none, not {value}")
            setattr(new, field, value)
        check_pool_growth(
            name,
            increment=new.growth_increment,
            warning=new.growth_warning,
            limit=new.growth_limit,
            capacity=pool.capacity,
        )
        await self.meta.call(self.store.update_pool, new)
        pool.row = new
        pool.settings_changed()
        return self._pool_info(pool)

    async def compact_pool(self, name: str) -> int:
        """Release LDs whose regions are all free back to free chunklets; returns how many."""
        pool = self._pool(name)
        # Not while a rebuild runs: it works through a list of LDs taken when it started and
        # would go on rebuilding an LD released meanwhile (releasing its chunklets twice).
        async with self.repair.lock:
            await pool.sync_pending()  # regions awaiting fsync count as free once it is done
            released = 0
            for ld_id in pool.releasable_lds():
                ld = pool.detach_ld(ld_id)
                await self.meta.call(self.store.delete_ld, ld_id)
                del self.lds[ld_id]
                self.ld_pool.pop(ld_id, None)
                for chunk_row in ld.rows:
                    for ch in chunk_row:
                        self.chunklets.release(ch.pd.id, ch.index)
                self.alerts.clear_object(f"ld:{ld_id}")
                self.alerts.event(
                    AlertKind.LD_RELEASED,
                    f"ld:{ld_id}",
                    Severity.INFO,
                    f"pool '{name}' released LD {ld_id} ({format_size(ld.size)}) back to free chunklets",
                )
                released += 1
            pool.settings_changed()
            return released

    async def delete_pool(self, name: str) -> None:
        """Only when it has no VVs (Conflict otherwise); its LDs are released."""
        pool = self._pool(name)
        if pool.vv_count:
            raise Conflict(f"pool '{name}' still has {pool.vv_count} volume(s); delete them first")
        await self.compact_pool(name)
        assert not pool.slots
        await self.meta.call(self.store.delete_pool, pool.id)
        del self.pools[name]
        self.alerts.clear_object(pool.object_name)

    # --- logical disks --------------------------------------------------------------
    def _ld_info(self, ld: LogicalDisk) -> LDInfo:
        pool = self.ld_pool[ld.id]
        slots = pool.slots[ld.id]
        refs = [
            ChunkletRef(ch.pd.id, ch.index, ch.pd.chunklet_offset(ch.index), r, c)
            for r, chunk_row in enumerate(ld.rows)
            for c, ch in enumerate(chunk_row)
        ]
        return LDInfo(
            ld.id,
            pool.name,
            int(ld.raid),
            ld.set_size,
            ld.step,
            ld.size,
            pool.region_size,
            slots.regions,
            # held regions only (a shared one once): released ones awaiting their fsync are in no map
            slots.space.held,
            ld.health,
            refs,
        )

    def list_lds(self, pool: str | None = None) -> list[LDInfo]:
        if pool is not None:
            self._pool(pool)
        return [
            self._ld_info(ld) for ld in self.lds.values() if pool is None or self.ld_pool[ld.id].name == pool
        ]

    def get_ld(self, ld_id: int) -> LDInfo:
        try:
            return self._ld_info(self.lds[int(ld_id)])
        except (KeyError, ValueError):
            raise NotFound(f"LD {ld_id} not found") from None

    async def rebuild(self, progress: Callable[[RebuildProgress], None] | None = None) -> RebuildProgress:
        """Rebuild every degraded LD onto spare chunklets of healthy PDs (diskrepair.py)."""
        return await self.repair.rebuild(progress)

    def rebuild_status(self) -> RebuildProgress:
        return self.repair.progress

    async def restore_pd(self, pd_id: int) -> PDInfo:
        """A failed PD that turned out healthy, back in service, resynchronised from the others
        first (diskrepair.py ``DiskRepair.restore_pd``)."""
        return self._pd_info(await self.repair.restore_pd(self._pd(pd_id)))

    async def replace_pd(self, old_id: int, new_id: int) -> PDInfo:
        """Rebuild every LD member of the failed PD ``old_id`` onto ``new_id``, then remove
        ``old_id`` (diskrepair.py ``DiskRepair.replace_pd``)."""
        new = self._pd(new_id)
        await self.repair.replace_pd(self._pd(old_id), new)
        return self._pd_info(new)

    # --- virtual volumes ------------------------------------------------------------
    async def create_vv(
        self,
        name: str,
        *,
        pool: str,
        size: int,
        alloc_warning: Limit | None = None,
        alloc_limit: Limit | None = None,
        cache_mode: CacheMode | None = None,
        snapshot_warning: Limit | None = None,
        snapshot_limit: Limit | None = None,
        snapshot_limit_policy: str | None = None,
    ) -> VVInfo:
        names.VOLUME.check(name)
        if name in self.vvs:
            raise AlreadyExists(f"volume '{name}' already exists")
        p = self._pool(pool)
        self._check_vv_size(size)
        mode = CacheMode(cache_mode) if cache_mode is not None else self.options.default_cache_mode
        row = VVRow(0, name, p.id, size, None, None, None, None, mode.value, time.time())
        _apply_limit(row, "alloc_warning", alloc_warning)
        _apply_limit(row, "alloc_limit", alloc_limit)
        check_vv_limits(name, size=size, region_size=p.region_size, warning=alloc_warning, limit=alloc_limit)
        _apply_snapshot_limits(row, snapshot_warning, snapshot_limit, snapshot_limit_policy)
        row.id = await self.meta.call(self.store.add_vv, row)
        self._make_vv(row, p)
        log.info(
            "vv created",
            extra={"event": "vv-created", "vv": name, "pool": pool, "size": size, "cache": mode.value},
        )
        return self.get_vv(name)

    @staticmethod
    def _check_vv_size(size: object) -> int:
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise InvalidArgument(f"volume size must be a positive number of bytes, not {size!r}")
        if size % 512:
            raise InvalidArgument(f"volume size must be a multiple of 512 bytes, not {size}")
        if size > MAX_VV_SIZE:
            raise InvalidArgument(
                f"volume size {format_size(size)} is past the maximum {format_size(MAX_VV_SIZE)}"
            )
        return size

    def _vv(self, name: str) -> VirtualVolume:
        try:
            return self.vvs[name]
        except (KeyError, TypeError):
            raise NotFound(f"volume '{name}' not found") from None

    def _vv_info(self, vv: VirtualVolume) -> VVInfo:
        r = vv.row
        warning, limit = vv.alloc_warning, vv.alloc_limit
        return VVInfo(
            r.name,
            vv.pool.name,
            r.size,
            vv.region_size,
            vv.allocated,
            vv.map.count,
            None if warning is None else warning.resolve(r.size),
            None if limit is None else limit.resolve(r.size),
            None if warning is None else str(warning),
            None if limit is None else str(limit),
            vv.cache_mode,
            self.cache.dirty_by_owner.get(r.id, 0),
            r.created,
            r.kind,
            self.snapshots.parent_of(vv),
            self.snapshots.children_of(vv),
            *self.snapshots.space_of(vv),
            *snapspace.info(vv),  # type: ignore[arg-type]  # the fields after those, in order
        )

    def list_vvs(self) -> list[VVInfo]:
        return [self._vv_info(v) for v in self.vvs.values()]

    def get_vv(self, name: str) -> VVInfo:
        return self._vv_info(self._vv(name))

    def vv_stats(self, name: str) -> VVStats:
        v = self._vv(name)
        return VVStats(v.reads, v.writes, v.read_bytes, v.write_bytes, v.trims, v.zeroes, v.flushes, v.errors)

    async def set_vv(
        self,
        name: str,
        *,
        alloc_warning: Any = UNSET,
        alloc_limit: Any = UNSET,
        cache_mode: Any = UNSET,
        snapshot_warning: Any = UNSET,
        snapshot_limit: Any = UNSET,
        snapshot_limit_policy: Any = UNSET,
    ) -> VVInfo:
        vv = self._vv(name)
        row = replace(vv.row)
        snapshot_settings = (snapshot_warning, snapshot_limit, snapshot_limit_policy)
        if any(value is not UNSET for value in snapshot_settings):
            if vv.read_only:
                raise InvalidArgument(
                    f"'{name}' is a snapshot: snapshot space is a volume's (set it on the volume it was taken of)"
                )
            _apply_snapshot_limits(
                row,
                *(
                    getattr(vv, f) if v is UNSET else v
                    for f, v in zip(_SNAPSHOT_FIELDS, snapshot_settings, strict=True)
                ),
            )
        if alloc_warning is not UNSET:
            _apply_limit(row, "alloc_warning", alloc_warning)
        if alloc_limit is not UNSET:
            _apply_limit(row, "alloc_limit", alloc_limit)
        new_mode = None
        if cache_mode is not UNSET:
            try:
                new_mode = CacheMode(cache_mode)
            except ValueError:
                raise InvalidArgument(
                    f"cache mode must be writeback or writethrough, not {cache_mode!r}"
                ) from None
            row.cache_mode = new_mode.value
        check_vv_limits(
            name,
            size=row.size,
            region_size=vv.region_size,
            warning=row.limit("alloc_warning"),
            limit=row.limit("alloc_limit"),
        )
        await self.meta.call(self.store.update_vv, row)
        vv.row = row
        if new_mode is not None:
            vv.set_cache_mode(new_mode)
        vv.check_thresholds_after_release()
        if vv.map.count:
            vv._check_after_assign()
        snapspace.check_alerts(vv)
        return self._vv_info(vv)

    async def grow_vv(self, name: str, size: int) -> VVInfo:
        """Grow only; shrinking raises InvalidArgument."""
        vv = self._vv(name)
        self._check_vv_size(size)
        if vv.read_only:
            raise InvalidArgument(
                f"'{name}' is a snapshot: it keeps the size it was taken at (clone it to grow)"
            )
        if size < vv.row.size:
            raise InvalidArgument(
                f"volume '{name}' is {format_size(vv.row.size)}; it can grow, not shrink to {format_size(size)}"
            )
        row = replace(vv.row)
        row.size = size
        await self.meta.call(self.store.update_vv, row)
        vv.row = row
        vv.check_thresholds_after_release()
        return self._vv_info(vv)

    async def rename_vv(self, name: str, new_name: str) -> VVInfo:
        """The volume under a new name; its data, limits and connected clients stay with it.
        Connected clients go on with the same volume (a connection chose its volume once, at
        negotiation or login); new connections must use the new name; the old name is free."""
        vv = self._vv(name)
        names.VOLUME.check(new_name)
        if new_name in self.vvs:
            raise AlreadyExists(f"volume '{new_name}' already exists")
        await self.meta.call(self.store.rename_vv, vv.row.id, new_name)
        self.alerts.clear_object(vv.object_name)  # raised again below under the new name
        vv.row = replace(vv.row, name=new_name)
        self.vvs = {new_name if key == name else key: v for key, v in self.vvs.items()}
        self.sessions.rename(name, new_name)
        vv.check_thresholds_after_release()
        if vv.map.count:
            vv._check_after_assign()
        log.info("vv renamed", extra={"event": "vv-renamed", "vv": new_name, "old_name": name})
        return self._vv_info(vv)

    async def snapshot_vv(self, name: str, snapshot: str) -> VVInfo:
        """A read-only snapshot of volume ``name``, instant (volume/snapshots.py)."""
        names.VOLUME.check(snapshot)
        self._vv(name)
        return self._vv_info(await self.snapshots.snapshot(name, snapshot))

    async def clone_vv(self, snapshot: str, name: str) -> VVInfo:
        """A writable clone of ``snapshot``, instant."""
        names.VOLUME.check(name)
        self._vv(snapshot)
        return self._vv_info(await self.snapshots.clone(snapshot, name))

    async def revert_vv(self, name: str, snapshot: str, *, force: bool = False) -> VVInfo:
        """Volume ``name`` becomes snapshot ``snapshot``'s content, atomically (volume/snapshots.py).
        Refused while clients are connected unless ``force``: their caches would hold data the
        volume no longer has."""
        clients = self.sessions.of(name)
        if clients and not force:
            raise Conflict(
                f"volume '{name}' is in use by {describe_clients(clients)}: reverting it under them would"
                " leave their caches holding data it no longer has; disconnect them or use --force"
            )
        return self._vv_info(await self.snapshots.revert(name, snapshot))

    def diff_vv(self, a: str, b: str) -> list[tuple[int, int]]:
        """Byte ranges where volumes ``a`` and ``b`` of one tree may differ."""
        return self.snapshots.diff(a, b)

    async def delete_vv(self, name: str, *, force: bool = False) -> None:
        """Every LD region it holds goes back to its pool, zeroed -- a region its snapshots or
        clones share stays theirs.  A volume with connected clients is refused (Conflict)
        unless ``force``: then it is marked deleted first (their requests fail with VolumeGone
        from then on, never read zeros) and they are disconnected."""
        async with self.snapshots.lock:
            await self._delete_vv(name, force=force)

    async def _delete_vv(self, name: str, *, force: bool) -> None:
        vv = self._vv(name)
        clients = self.sessions.of(name)
        if clients and not force:
            them = "it" if len(clients) == 1 else "them"
            raise Conflict(
                f"volume '{name}' is in use by {describe_clients(clients)}; disconnect {them} or use --force"
            )
        vv.deleted = True
        for session in clients:
            log.warning(
                "vv delete forced: disconnecting a client",
                extra={"event": "vv-delete-disconnect", "vv": name, "peer": session.peer},
            )
            session.disconnect()
        await vv.settle_assignments()
        await vv.unmap_regions(0, (vv.row.size + vv.region_size - 1) // vv.region_size)
        await self.meta.call(self.store.delete_vv, vv.row.id)
        del self.vvs[name]
        self.snapshots.forget(vv)
        vv.pool.vv_count -= 1
        self.alerts.clear_object(vv.object_name)
        log.info("vv deleted", extra={"event": "vv-deleted", "vv": name})

    def volume(self, name: str) -> Volume:
        """The I/O handle of a VV (the same object for every caller)."""
        return self._vv(name)

    # VolumeProvider, for the NBD server
    def export_names(self) -> list[str]:
        return list(self.vvs)

    def open_volume(self, name: str) -> Volume:
        return self._vv(name)

    # --- alerts ---------------------------------------------------------------------
    def list_alerts(self, include_cleared: bool = False) -> list[Alert]:
        """Open alerts (new, acknowledged); with include_cleared, all of them."""
        return self.alerts.list(include_cleared)

    def get_alert(self, alert_id: int) -> Alert:
        return self.alerts.get(alert_id)

    def ack_alert(self, alert_id: int) -> Alert:
        return self.alerts.ack(alert_id)

    def subscribe(self, callback: Callable[[Alert], None]) -> Callable[[], None]:
        """Call ``callback`` (on the loop thread) for every alert raised; returns an unsubscribe."""
        return self.alerts.subscribe(callback)

    # --- node -----------------------------------------------------------------------
    def cache_dirty_bytes(self) -> int:
        return self.cache.dirty_bytes


def _apply_limit(row: VVRow, field: str, value: Limit | None) -> None:
    if value is not None and not isinstance(value, Limit):
        raise InvalidArgument(f"{field.replace('_', ' ')} must be a Limit (bytes or percent), not {value!r}")
    setattr(row, f"{field}_bytes", None if value is None else value.bytes)
    setattr(row, f"{field}_pct", None if value is None else value.percent)


_SNAPSHOT_FIELDS = ("snapshot_warning", "snapshot_limit", "snapshot_limit_policy")


def _apply_snapshot_limits(row: VVRow, warning: Limit | None, limit: Limit | None, policy: object) -> None:
    """The snapshot space warning, limit and policy into ``row``, checked (volume/snapspace.py)."""
    _apply_limit(row, "snap_warning", warning)
    _apply_limit(row, "snap_limit", limit)
    try:
        row.snap_limit_policy = SnapshotLimitPolicy(str(policy) if policy is not None else "fail").value
    except ValueError:
        raise InvalidArgument(
            f"snapshot limit policy must be fail or invalidate-oldest, not {policy!r}"
        ) from None
    check_snapshot_limits(row.name, size=row.size, warning=warning, limit=limit)


def _sync_all(
    pds: list[PhysicalDisk], store: MetadataStore, headers: PDHeaders, reserve: StoreReserve | None = None
) -> list[str]:
    """Blocking, on the flush's thread: bump the store generation when the store changed since
    the last bump (a round trip with a remote store: never on the loop), fsync every PD, then the
    store (data before the metadata that points at it), then, when the flush bumped the
    generation, the PD headers (after the store: a header must never be ahead of the durable
    store).  A header write syncs only its 4 KiB.  ``reserve``: room for the bump on a full store's
    file system (metadata/reserve.py)."""
    generation = headers.bump_if_changed(store, reserve)
    failures = []
    for pd in pds:
        try:
            pd.fsync()
        except MediumError as exc:
            failures.append(str(exc))
    store.sync()
    if generation is not None:
        # A PD whose header cannot be written fails (its data was fsynced: nothing is lost).
        headers.publish(generation, pds)
    return failures


def _unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)
