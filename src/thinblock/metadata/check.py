"""The store check that does not depend on the backend: every rule of the brief, run on what
any ``MetadataStore`` loads (rows and one array of the whole map), after the backend's own
checks (``backend_problems``: SQLite's integrity_check, values of the wrong type).

It never repairs; it names each problem plainly.  The map rules run with numpy on the whole
map at once, so they do not rely on the backend's own indexes: a damaged index must not hide
a region assigned twice.

Shared regions: an LD region may be mapped by several volumes -- a volume and its snapshots and
clones share it until one side writes -- but only by volumes of one tree (``VVRow.family``) and
only at one volume offset (a snapshot shares region r of its volume as its own region r).  Any
other second mapping is damage: a flipped bit that made a row point at another volume's data.
The reference counts the pool keeps in memory are checked against the rows by
``check_space_map``."""

from __future__ import annotations

import numpy as np

from ..errors import MetadataCorrupt
from ..model import AlertKind, AlertState, PDHealth, Severity, SnapshotLimitPolicy
from . import mapcheck
from .store import LDRow, MetadataStore, Reservation, VVRow

# Values the engine interprets; anything else in the store is damage.
RAID_LEVELS = (0, 1, 5)
_PD_HEALTH = {h.value for h in PDHealth}
_SEVERITIES = {s.value for s in Severity}
_ALERT_KINDS = {k.value for k in AlertKind}
_ALERT_STATES = {s.value for s in AlertState}
_SAMPLE = 20  # problems of one kind named at most
_VV_KINDS = ("volume", "snapshot", "clone")
_SNAPSHOT_POLICIES = {p.value for p in SnapshotLimitPolicy}


def _is_power_of_two(n: object) -> bool:
    return isinstance(n, int) and n > 0 and n & (n - 1) == 0


def check_store(store: MetadataStore) -> list[str]:
    """Problems found (empty when sound)."""
    try:
        problems = store.backend_problems()
        if problems:
            return problems
        return _check_rows(store) + _check_map(store)
    except MetadataCorrupt as exc:  # a row the backend cannot even read back
        return [str(exc)]


def _check_rows(store: MetadataStore) -> list[str]:
    """Every row reads back through the calls the engine loads with, and every value the engine
    interprets is one it can use; chunklets used once, inside their PD, rows on distinct PDs."""
    problems: list[str] = []
    pds = store.load_pds()
    pools = store.load_pools()
    lds = store.load_lds()
    vvs = store.load_vvs()
    alerts = store.load_alerts()
    for key in ("schema_version", "clean"):
        store.get_meta(key)
    pd_by_id = {pd.id: pd for pd in pds}
    pool_by_id = {pool.id: pool for pool in pools}
    for pd in pds:
        if not _is_power_of_two(pd.chunklet_size) or pd.chunklet_size < 4096:
            problems.append(f"PD {pd.id} has a chunklet size of {pd.chunklet_size} bytes")
        elif pd.size < pd.chunklet_size:
            problems.append(f"PD {pd.id} is {pd.size} bytes, smaller than one chunklet")
        if pd.health not in _PD_HEALTH:
            problems.append(f"PD {pd.id} has health {pd.health!r}")
    for pool in pools:
        if pool.raid not in RAID_LEVELS or not _is_power_of_two(pool.region_size):
            problems.append(f"pool '{pool.name}' has RAID {pool.raid} and region size {pool.region_size}")
    users: dict[tuple[int, int], int] = {}
    for ld in lds:
        ld_pool = pool_by_id.get(ld.pool_id)
        if ld_pool is None:
            problems.append(f"LD {ld.id} belongs to pool {ld.pool_id}, which does not exist")
        elif (ld.raid, ld.set_size, ld.step, ld.region_size) != (
            ld_pool.raid,
            ld_pool.set_size,
            ld_pool.step,
            ld_pool.region_size,
        ):
            # An LD is made with its pool's policy, which never changes: a difference is damage
            # (read with the wrong RAID level or step, the LD would return another place's bytes).
            problems.append(
                f"LD {ld.id} has a RAID level, set size, step or region size other than its pool '{ld_pool.name}'"
            )
        if not ld.chunklets:
            problems.append(f"LD {ld.id} has no chunklets")
            continue
        for pd_id, chunklet in ld.chunklets.values():
            users[(pd_id, chunklet)] = users.get((pd_id, chunklet), 0) + 1
            on_pd = pd_by_id.get(pd_id)
            if on_pd is None or chunklet < 0 or chunklet >= on_pd.size // max(on_pd.chunklet_size, 1):
                problems.append(f"LD {ld.id} uses chunklet {chunklet} of PD {pd_id}, which does not exist")
        if ld.raid not in RAID_LEVELS or not _is_power_of_two(ld.region_size) or ld.set_size < 1:
            problems.append(
                f"LD {ld.id} has RAID {ld.raid}, set size {ld.set_size}, region size {ld.region_size}"
            )
            continue
        rows = 1 + max(r for r, _ in ld.chunklets)
        if set(ld.chunklets) != {(r, c) for r in range(rows) for c in range(ld.set_size)}:
            problems.append(f"LD {ld.id} does not have {ld.set_size} chunklets in each of its {rows} rows")
        for r in range(rows):
            on = [ld.chunklets[(r, c)][0] for c in range(ld.set_size) if (r, c) in ld.chunklets]
            if len(set(on)) != len(on):
                problems.append(f"LD {ld.id} row {r} has two chunklets on one PD")
        sizes = {pd_by_id[pd_id].chunklet_size for pd_id, _ in ld.chunklets.values() if pd_id in pd_by_id}
        if len(sizes) > 1:
            problems.append(f"LD {ld.id} has chunklets of different sizes")
    for (pd_id, chunklet), n in users.items():
        if n > 1:
            problems.append(f"chunklet {chunklet} of PD {pd_id} is used {n} times")
    vv_by_id = {vv.id: vv for vv in vvs}
    for vv in vvs:
        if vv.pool_id not in pool_by_id:
            problems.append(f"VV '{vv.name}' belongs to pool {vv.pool_id}, which does not exist")
        if vv.snap_limit_policy not in _SNAPSHOT_POLICIES:
            problems.append(f"VV '{vv.name}' has snapshot limit policy {vv.snap_limit_policy!r}")
        if vv.kind not in _VV_KINDS:
            # read as a volume, a snapshot would be writable in place under its tree's shared regions
            problems.append(f"VV '{vv.name}' is of kind {vv.kind!r}")
        parent = vv_by_id.get(vv.parent_id) if vv.parent_id is not None else None
        if vv.parent_id is not None and (parent is None or parent.family != vv.family):
            # a deleted parent is cleared from its children's rows in the same transaction
            problems.append(f"VV '{vv.name}' names VV {vv.parent_id} as its parent, which is not of its tree")
    for alert in alerts:
        if (
            alert.severity not in _SEVERITIES
            or alert.kind not in _ALERT_KINDS
            or alert.state not in _ALERT_STATES
        ):
            problems.append(
                f"alert {alert.id} has severity {alert.severity!r}, kind {alert.kind!r}, state {alert.state!r}"
            )
    return problems


def _dupes(a: np.ndarray, b: np.ndarray) -> list[tuple[int, int]]:
    if len(a) < 2:
        return []
    order = np.lexsort((b, a))
    a2, b2 = a[order], b[order]
    same = (a2[1:] == a2[:-1]) & (b2[1:] == b2[:-1])
    return [(int(x), int(y)) for x, y in zip(a2[1:][same][:_SAMPLE], b2[1:][same][:_SAMPLE], strict=True)]


def _check_map(store: MetadataStore) -> list[str]:
    """Each VV region mapped once, each LD region assigned at most once, every entry inside an
    existing LD of the VV's pool and inside the VV, counters equal to the map, each VV's map
    check equal to the sum of its rows' terms (a row's address changed behind the store's back:
    metadata/mapcheck.py)."""
    problems: list[str] = []
    m = store.map_array()
    vv_id, vv_region, ld_id = m[:, 0], m[:, 1], m[:, 2]
    lds = {ld.id: ld for ld in store.load_lds()}
    vvs = {vv.id: vv for vv in store.load_vvs()}
    vv_counted, ld_counted = store.region_counters()
    for vv_key, region in _dupes(vv_id, vv_region):
        problems.append(f"VV {vv_key} region {region} is mapped more than once")
    problems += _check_sharing(m, store.load_vvs())
    problems += _check_reservations(m, store.load_reservations(), lds, vvs)
    known_ld = np.isin(ld_id, np.fromiter(lds, dtype=np.int64, count=len(lds)))
    for row in m[~known_ld][:_SAMPLE]:
        problems.append(f"VV {row[0]} region {row[1]} points at LD {row[2]}, which does not exist")
    known_vv = np.isin(vv_id, np.fromiter(vvs, dtype=np.int64, count=len(vvs)))
    for row in m[~known_vv][:_SAMPLE]:
        problems.append(f"map entry for region {row[1]} of VV {row[0]}, which does not exist")
    ok = known_ld & known_vv
    if ok.any():
        mm = m[ok]
        # Lookups by id through searchsorted over the sorted ids (a handful of LDs and VVs).
        ld_keys = np.array(sorted(lds), dtype=np.int64)
        ld_pool = np.array([lds[k].pool_id for k in ld_keys], dtype=np.int64)
        ld_nreg = np.array([lds[k].regions for k in ld_keys], dtype=np.int64)
        ld_rsize = np.array([lds[k].region_size for k in ld_keys], dtype=np.int64)
        vv_keys = np.array(sorted(vvs), dtype=np.int64)
        vv_pool = np.array([vvs[k].pool_id for k in vv_keys], dtype=np.int64)
        vv_size = np.array([vvs[k].size for k in vv_keys], dtype=np.int64)
        li = np.searchsorted(ld_keys, mm[:, 2])
        vi = np.searchsorted(vv_keys, mm[:, 0])
        outside = (mm[:, 3] < 0) | (mm[:, 3] >= ld_nreg[li])
        for row in mm[outside][:_SAMPLE]:
            problems.append(f"VV {row[0]} region {row[1]} points at region {row[3]} outside LD {row[2]}")
        for row in mm[ld_pool[li] != vv_pool[vi]][:_SAMPLE]:
            problems.append(f"VV {row[0]} region {row[1]} points at LD {row[2]} of another pool")
        past = (mm[:, 1] < 0) | (mm[:, 1] * ld_rsize[li] >= vv_size[vi])
        for row, size in zip(mm[past][:_SAMPLE], vv_size[vi][past][:_SAMPLE], strict=True):
            problems.append(f"VV {row[0]} maps region {row[1]}, past its size {size}")
    vv_counts = dict(zip(*np.unique(vv_id, return_counts=True), strict=True)) if len(m) else {}
    for k, vv in vvs.items():
        counted, actual = vv_counted.get(k, 0), int(vv_counts.get(k, 0))
        if counted != actual:
            problems.append(
                f"VV '{vv.name}' records {counted} assigned regions but its map holds {actual}"
                " (region map rows lost or added)"
            )
    checks, sums = store.map_checks(), mapcheck.sums_by_vv(m)
    for k, vv in vvs.items():
        kept, actual = checks.get(k, 0), sums.get(k, 0)
        if kept != actual:
            problems.append(
                f"VV '{vv.name}' has map check {kept} but its map rows add up to {actual} (a map row's"
                " region or LD address changed behind the store's back: a flipped bit?)"
            )
    ld_counts = dict(zip(*np.unique(ld_id, return_counts=True), strict=True)) if len(m) else {}
    for k in lds:
        counted, actual = ld_counted.get(k, 0), int(ld_counts.get(k, 0))
        if counted != actual:
            problems.append(f"LD {k} records {counted} used regions but the maps assign {actual}")
    return problems


def _check_reservations(
    m: np.ndarray, reservations: list[Reservation], lds: dict[int, LDRow], vvs: dict[int, VVRow]
) -> list[str]:
    """Copy-on-write reservations are references too (the space map holds a reserved region once
    until its switch): each names a region inside an existing LD of its volume's pool, and no map
    row holds that region -- the next open zeroes every reserved region, so one also mapped would
    lose that mapping's data.  Every reservation is checked (a crash can leave many)."""
    if not reservations:
        return []
    problems: list[str] = []
    r = np.array(reservations, dtype=np.int64).reshape(-1, 4)
    for vv_key, vv_region, r_ld, r_region in r.tolist():
        ld = lds.get(r_ld)
        vv = vvs.get(vv_key)
        if ld is None or not 0 <= r_region < ld.regions:
            problems.append(
                f"LD {r_ld} region {r_region} is reserved for a copy on write but is not a region of an existing LD"
            )
        elif vv is None or vv.pool_id != ld.pool_id or not 0 <= vv_region * ld.region_size < vv.size:
            problems.append(
                f"LD {r_ld} region {r_region} is reserved for region {vv_region} of VV {vv_key},"
                " which is not a region of a volume of its pool"
            )
        if len(problems) >= _SAMPLE:
            return problems
    mapped = (m[:, 2] << 32) | m[:, 3]
    reserved = (r[:, 2] << 32) | r[:, 3]
    for packed in reserved[np.isin(reserved, mapped)][:_SAMPLE].tolist():
        problems.append(
            f"LD {packed >> 32} region {packed & 0xFFFFFFFF} is reserved for a copy on write and also mapped"
        )
    return problems


def _check_sharing(m: np.ndarray, vvs: list[VVRow]) -> list[str]:
    """Every LD region mapped more than once is mapped by volumes of one tree at one offset."""
    if len(m) < 2:
        return []
    family = {vv.id: vv.family for vv in vvs}
    order = np.lexsort((m[:, 3], m[:, 2]))
    s = m[order]
    same = (s[1:, 2] == s[:-1, 2]) & (s[1:, 3] == s[:-1, 3])
    if not same.any():
        return []
    problems: list[str] = []
    for i in np.flatnonzero(same):
        a, b = s[i], s[i + 1]
        fa, fb = family.get(int(a[0])), family.get(int(b[0]))
        if a[1] != b[1] or fa is None or fa != fb:
            problems.append(
                f"LD {b[2]} region {b[3]} is assigned more than once: to VV {a[0]} region {a[1]} and"
                f" VV {b[0]} region {b[1]}, which do not share a snapshot tree at that offset"
            )
            if len(problems) >= _SAMPLE:
                break
    return problems


def check_space_map(store: MetadataStore, refcounts: dict[int, np.ndarray]) -> list[str]:
    """The pool's reference counts (``SpaceMap.refcounts``: ld_id -> count per region) against
    the store: every LD region is held exactly as many times as map rows and copy-on-write
    reservations name it.  Empty when they agree."""
    m = store.map_array()
    reservations = store.load_reservations()
    expected: dict[int, np.ndarray] = {
        ld: np.zeros(len(refs), dtype=np.int64) for ld, refs in refcounts.items()
    }
    problems: list[str] = []
    rows = np.concatenate(
        [m[:, 2:4], np.array([(r[2], r[3]) for r in reservations], dtype=np.int64).reshape(-1, 2)]
    )
    for ld in np.unique(rows[:, 0]):
        counts = expected.get(int(ld))
        indexes = rows[rows[:, 0] == ld, 1]
        if counts is None or (indexes >= len(counts)).any() or (indexes < 0).any():
            problems.append(f"the store maps regions of LD {ld}, which no pool holds (or past its end)")
            continue
        np.add.at(counts, indexes, 1)
    for ld, refs in refcounts.items():
        wrong = np.flatnonzero(refs.astype(np.int64) != expected[ld])
        for index in wrong[:_SAMPLE]:
            problems.append(
                f"LD {ld} region {index} has {refs[index]} reference(s) in the space map but"
                f" {expected[ld][index]} mapping(s) and reservation(s) in the store"
            )
    return problems


def expected_snapshot_space(store: MetadataStore) -> dict[int, int]:
    """Volume id -> the regions only its snapshots map (its snapshot space, volume/snapspace.py),
    counted from the map rows: an LD region is volume V's when every row naming it is a row of a
    snapshot whose parent is V.  (A snapshot whose volume was deleted names no parent: nobody's.)"""
    m = store.map_array()
    if not len(m):
        return {}
    parent = {v.id: v.parent_id for v in store.load_vvs() if v.kind == "snapshot" and v.parent_id is not None}
    owners = np.array([parent.get(int(vv_id), -1) for vv_id in m[:, 0]], dtype=np.int64)  # -1: not a snapshot
    packed = (m[:, 2] << 32) | m[:, 3]
    order = np.argsort(packed, kind="stable")
    packed, owners = packed[order], owners[order]
    starts = np.flatnonzero(np.r_[True, packed[1:] != packed[:-1]])
    low, high = np.minimum.reduceat(owners, starts), np.maximum.reduceat(owners, starts)
    owned = low[(low == high) & (low >= 0)]
    values, counts = np.unique(owned, return_counts=True)
    return dict(zip(values.tolist(), counts.tolist(), strict=True))


def check_snapshot_space(store: MetadataStore, counters: dict[int, int]) -> list[str]:
    """The pool's snapshot space counters (volume id -> regions, for every volume that is not a
    snapshot) against a count from the store's rows.  Empty when they agree."""
    expected = expected_snapshot_space(store)
    return [
        f"VV {vv_id} counts {regions} region(s) of snapshot space, its snapshots alone map"
        f" {expected.get(vv_id, 0)}"
        for vv_id, regions in sorted(counters.items())
        if regions != expected.get(vv_id, 0)
    ]
