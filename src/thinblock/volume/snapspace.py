"""Snapshot space, watched and capped (3PAR's snapshot space warning and limit, -snp_aw/-snp_al).

A volume's **snapshot space** is the LD regions its snapshots hold and nothing else does: no
volume, no clone, no snapshot of another volume -- exactly what deleting all of its snapshots
would free.  A snapshot costs nothing when it is taken (it shares every region); the space grows
by one region each time the volume's copy on write leaves the old region to its snapshots alone
(or a trim of the volume, or a clone letting go of a region it shared with them), and shrinks
when snapshots are deleted.  The pool keeps it as a counter per volume (``pool/spacemap.py``),
so reading it costs nothing and the write path never scans.

Each volume (or clone) may have a snapshot space **warning** and **limit**, bytes or a percentage
of its size, like the allocation ones; the alerts ``vv-snapshot-space-warning`` (at or past the
warning) and ``vv-snapshot-space-limit`` (the next region would pass the limit) are raised once
per crossing and cleared when the space is back under.  A write of the volume whose copy on write
would take the space past the limit meets the volume's **policy**:

* ``fail``: the snapshots stay, the write fails with OutOfSpace (ENOSPC over NBD; over iSCSI the
  DATA PROTECT / SPACE ALLOCATION FAILED WRITE PROTECT answer the allocation limit gives) having
  changed nothing;
* ``invalidate-oldest``: the volume's oldest snapshot is deleted (its clients disconnected, as by
  a forced delete; its clones keep their data), an event alert ``vv-snapshot-invalidated`` names
  it, and the write goes on -- into the region in place when no snapshot holds it any more, or
  through a copy once the space is under the limit (more snapshots go while it is not).

Only the volume's own writes are held to its limit: a clone's write, or a snapshot deleted, that
leaves regions to the volume's snapshots moves the counter (and raises the alerts) without
refusing anything, and the volume's next copy on write meets the policy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NoReturn

from ..errors import OutOfSpace
from ..model import AlertKind, Severity, SnapshotLimitPolicy
from ..units import format_size

if TYPE_CHECKING:
    from .vv import VirtualVolume


def adds_space(vv: VirtualVolume, region: int, packed: int) -> bool:
    """Whether a copy on write of VV region ``region`` (mapped to the shared ``packed``) that
    ``vv`` starts now would leave ``packed`` to its snapshots alone -- asked only of a volume
    with a snapshot limit (nothing else needs to know), and False when a copy of the region is
    under way already (the write waits for it)."""
    if vv.row.snap_limit_bytes is None and vv.row.snap_limit_pct is None:
        return False
    return region not in vv._allocating and vv.pool.space.would_own_after_unref(packed, vv.row.id)


def needs_room(vv: VirtualVolume) -> bool:
    """Whether one more region of snapshot space would pass ``vv``'s limit (counting the copies of
    this volume already under way that will add to it)."""
    limit = vv.snapshot_limit
    if limit is None:
        return False
    regions = vv.pool.space.snapshot_regions(vv.row.id) + vv.cow_to_snapshots + 1
    return regions * vv.region_size > limit.resolve(vv.row.size)


def check_whole_write(vv: VirtualVolume, offset: int, length: int) -> None:
    """The ``fail`` policy is all or none for a write of several regions, as the allocation limit
    is: when the copies on write it needs would take the snapshot space past the limit, it fails
    before any of them is made (a write refused half-way would have changed its first regions).
    Nothing to do without a limit or with ``invalidate-oldest`` (which deletes snapshots as it
    goes and then lets the write on)."""
    limit = vv.snapshot_limit
    if limit is None or vv.snapshot_limit_policy != SnapshotLimitPolicy.FAIL:
        return
    space, vv_id, get = vv.pool.space, vv.row.id, vv.map.get
    first, last = offset // vv.region_size, (offset + length - 1) // vv.region_size
    needed = 0
    for region in range(first, last + 1):
        packed = get(region)
        if packed >= 0 and vv.pool.shared(packed) and adds_space(vv, region, packed):
            needed += 1
    if not needed:
        return
    regions = space.snapshot_regions(vv_id) + vv.cow_to_snapshots + needed
    if regions * vv.region_size > limit.resolve(vv.row.size):
        _refuse(vv, f" (the write needs {needed} copies on write; none was made)")


async def make_room(vv: VirtualVolume) -> None:
    """The limit's policy, for a copy on write that needs room (``needs_room``): OutOfSpace, or
    the oldest snapshot deleted (the caller then looks at the region again)."""
    invalidate = vv.invalidate_oldest
    invalidating = (
        vv.snapshot_limit_policy == SnapshotLimitPolicy.INVALIDATE_OLDEST and invalidate is not None
    )
    if invalidating and invalidate is not None and await invalidate(vv) is not None:
        return  # a snapshot fewer (or room made meanwhile): the caller looks at the region again
    _refuse(vv, "")


def _refuse(vv: VirtualVolume, detail: str) -> NoReturn:
    """OutOfSpace for a write the limit refuses (policy fail, or no snapshot left to delete)."""
    limit = vv.snapshot_limit
    assert limit is not None
    message = (
        f"VV '{vv.row.name}' reached its snapshot space limit of {limit} ({format_size(vv.snapshot_space)}"
        f" held only by its snapshots): a write that needs a copy on write was refused{detail}; delete a"
        " snapshot or raise the limit (thinblock vv set --snapshot-limit)"
    )
    vv._alerts.condition(AlertKind.VV_SNAPSHOT_SPACE_LIMIT, vv.object_name, Severity.CRITICAL, message)
    raise OutOfSpace(message, AlertKind.VV_SNAPSHOT_SPACE_LIMIT.value)


def check_alerts(vv: VirtualVolume) -> None:
    """Raise or clear the volume's snapshot space warning and limit conditions (edge-triggered:
    the alert bus raises a condition once, until it is cleared)."""
    used = vv.snapshot_space
    name, obj, size = vv.row.name, vv.object_name, vv.row.size
    warning = vv.snapshot_warning
    if warning is not None and used >= warning.resolve(size):
        vv._alerts.condition(
            AlertKind.VV_SNAPSHOT_SPACE_WARNING,
            obj,
            Severity.WARNING,
            f"VV '{name}' has {format_size(used)} held only by its snapshots, at or past its snapshot"
            f" space warning of {warning}",
        )
    else:
        vv._alerts.clear(AlertKind.VV_SNAPSHOT_SPACE_WARNING, obj)
    limit = vv.snapshot_limit
    if limit is not None and used + vv.region_size > limit.resolve(size):
        vv._alerts.condition(
            AlertKind.VV_SNAPSHOT_SPACE_LIMIT,
            obj,
            Severity.CRITICAL,
            f"VV '{name}' reached its snapshot space limit of {limit} ({format_size(used)} held only by"
            f" its snapshots): the next copy on write will {_policy_text(vv)}",
        )
    else:
        vv._alerts.clear(AlertKind.VV_SNAPSHOT_SPACE_LIMIT, obj)


def info(vv: VirtualVolume) -> tuple[int, int | None, int | None, str | None, str | None, str]:
    """The listing's fields (``model.VVInfo``): space, warning and limit in bytes and as given,
    policy."""
    warning, limit, size = vv.snapshot_warning, vv.snapshot_limit, vv.row.size
    return (
        vv.snapshot_space,
        None if warning is None else warning.resolve(size),
        None if limit is None else limit.resolve(size),
        None if warning is None else str(warning),
        None if limit is None else str(limit),
        vv.snapshot_limit_policy.value,
    )


def _policy_text(vv: VirtualVolume) -> str:
    if vv.snapshot_limit_policy == SnapshotLimitPolicy.INVALIDATE_OLDEST:
        return "delete its oldest snapshot"
    return "fail"
