"""The engine API: the one entry point every front end (NBD, REST API, CLI via the API,
tests) drives.  It owns the metadata store, the PDs, the pools and their LDs, the VVs
and their caches, and the alert bus.

Threading: every method is called from the event loop thread.  Management methods that
do slow work (zeroing regions on delete, fsync, rebuild) are coroutines and push that
work to threads; listings are plain methods.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .blockdev import Volume
from .model import (
    Alert,
    CacheMode,
    CheckReport,
    LDInfo,
    PDInfo,
    PoolInfo,
    RebuildProgress,
    VVInfo,
    VVStats,
)
from .units import GiB, Limit, MiB

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


class Engine:
    @classmethod
    async def open(cls, data_dir: str | Path, options: EngineOptions | None = None) -> Engine:
        """Open (or create) the store in ``data_dir``, check it (MetadataCorrupt on failure),
        open PDs, rebuild in-memory maps, start background work (destage)."""
        raise NotImplementedError

    @staticmethod
    def check(data_dir: str | Path) -> CheckReport:
        """Check a store without opening it for service (``thinblock check``)."""
        raise NotImplementedError

    async def close(self) -> None:
        """Destage and flush everything, stop background work, mark the store clean."""
        raise NotImplementedError

    async def flush_all(self) -> None:
        raise NotImplementedError

    # --- physical disks -------------------------------------------------------------
    async def add_pd(
        self, path: str | Path, size: int | None = None, chunklet_size: int = DEFAULT_CHUNKLET
    ) -> PDInfo:
        """Add a file (created sparse at ``size`` if missing) or an existing file/block device."""
        raise NotImplementedError

    def list_pds(self) -> list[PDInfo]:
        raise NotImplementedError

    def get_pd(self, pd_id: int) -> PDInfo:
        raise NotImplementedError

    async def fail_pd(self, pd_id: int) -> PDInfo:
        """Mark a PD failed (drills); its LDs go degraded or failed and alerts fire."""
        raise NotImplementedError

    async def remove_pd(self, pd_id: int) -> None:
        """Only when none of its chunklets is used (Conflict otherwise)."""
        raise NotImplementedError

    # --- pools ----------------------------------------------------------------------
    async def create_pool(
        self,
        name: str,
        *,
        raid: int,
        set_size: int | None = None,
        step: int = DEFAULT_STEP,
        region_size: int = DEFAULT_REGION,
        growth_increment: int = DEFAULT_GROWTH_INCREMENT,
        growth_warning: int | None = None,
        growth_limit: int | None = None,
    ) -> PoolInfo:
        """set_size defaults: RAID 0 -> 2, RAID 1 -> 2, RAID 5 -> 4."""
        raise NotImplementedError

    def list_pools(self) -> list[PoolInfo]:
        raise NotImplementedError

    def get_pool(self, name: str) -> PoolInfo:
        raise NotImplementedError

    async def set_pool(
        self,
        name: str,
        *,
        growth_increment: Any = UNSET,
        growth_warning: Any = UNSET,
        growth_limit: Any = UNSET,
    ) -> PoolInfo:
        """Pass None to remove a warning or limit."""
        raise NotImplementedError

    async def compact_pool(self, name: str) -> int:
        """Release LDs whose regions are all free back to free chunklets; returns how many."""
        raise NotImplementedError

    async def delete_pool(self, name: str) -> None:
        """Only when it has no VVs (Conflict otherwise); its LDs are released."""
        raise NotImplementedError

    # --- logical disks --------------------------------------------------------------
    def list_lds(self, pool: str | None = None) -> list[LDInfo]:
        raise NotImplementedError

    def get_ld(self, ld_id: int) -> LDInfo:
        raise NotImplementedError

    async def rebuild(self, progress: Callable[[RebuildProgress], None] | None = None) -> RebuildProgress:
        """Rebuild every degraded LD onto spare chunklets of healthy PDs."""
        raise NotImplementedError

    def rebuild_status(self) -> RebuildProgress:
        raise NotImplementedError

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
    ) -> VVInfo:
        raise NotImplementedError

    def list_vvs(self) -> list[VVInfo]:
        raise NotImplementedError

    def get_vv(self, name: str) -> VVInfo:
        raise NotImplementedError

    def vv_stats(self, name: str) -> VVStats:
        raise NotImplementedError

    async def set_vv(
        self, name: str, *, alloc_warning: Any = UNSET, alloc_limit: Any = UNSET, cache_mode: Any = UNSET
    ) -> VVInfo:
        raise NotImplementedError

    async def grow_vv(self, name: str, size: int) -> VVInfo:
        """Grow only; shrinking raises InvalidArgument."""
        raise NotImplementedError

    async def delete_vv(self, name: str) -> None:
        """Every LD region it holds goes back to its pool, zeroed."""
        raise NotImplementedError

    def volume(self, name: str) -> Volume:
        """The I/O handle of a VV (the same object for every caller)."""
        raise NotImplementedError

    # VolumeProvider, for the NBD server
    def export_names(self) -> list[str]:
        raise NotImplementedError

    def open_volume(self, name: str) -> Volume:
        raise NotImplementedError

    # --- alerts ---------------------------------------------------------------------
    def list_alerts(self, include_cleared: bool = False) -> list[Alert]:
        """Open alerts (new, acknowledged); with include_cleared, all of them."""
        raise NotImplementedError

    def ack_alert(self, alert_id: int) -> Alert:
        raise NotImplementedError

    def subscribe(self, callback: Callable[[Alert], None]) -> Callable[[], None]:
        """Call ``callback`` (on the loop thread) for every alert raised; returns an unsubscribe."""
        raise NotImplementedError

    # --- node -----------------------------------------------------------------------
    def cache_dirty_bytes(self) -> int:
        raise NotImplementedError
