"""kill -9 while a snapshot's store transaction copies a volume's map (``add_vv_sharing``, the
statements of metadata/sql.py), on every backend: afterwards the store holds either no snapshot
or a whole one -- every row of the volume's map copied, its VV counter and the LD counters equal
to the rows (``check_store``) -- and one the child acknowledged is always there.

The child is killed by a timer thread at a fraction of the time one snapshot of the same volume
took in it just before (the driver's call releases the GIL while the database works), so the kill
lands before, inside and after the transaction's commit across the parameters."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

from tests.support.stores import StoreBackend
from thinblock.metadata.check import check_store
from thinblock.metadata.store import LDRow, PoolRow, VVRow

MiB = 1 << 20
REGIONS = 20_000
LD_REGIONS = 16_384  # two LDs: the counts per LD are told apart

CHILD = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    from thinblock.metadata import open_store
    from thinblock.metadata.store import VVRow

    url, vv, pool, fraction = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    counts = {int(k): int(n) for k, n in (p.split(":") for p in sys.argv[5].split(","))}
    store = open_store(url, create=False)

    def snapshot(name: str) -> int:
        row = VVRow(0, name, pool, 1 << 40, None, None, None, None, "writethrough", 1.0,
                    kind="snapshot", parent_id=vv, family_id=vv)
        return store.add_vv_sharing(row, vv, counts)

    start = time.perf_counter()
    snapshot("timed")
    took = time.perf_counter() - start
    threading.Timer(fraction * took, os.kill, (os.getpid(), signal.SIGKILL)).start()
    snapshot("killed")
    print("acknowledged", flush=True)
    time.sleep(60)  # the timer kills it even after the commit
    """
)


@pytest.mark.parametrize("fraction", [0.1, 0.7, 1.5])
def test_kill_9_during_a_snapshot_leaves_none_or_a_whole_one(backend: StoreBackend, fraction: float) -> None:
    store = backend.open()
    try:
        pd = store.add_pd("/dev/a", 1 << 40, 256 * MiB)
        pool = store.add_pool(PoolRow(0, "p", 0, 1, 4096, 4096, 64 * MiB, None, None))
        lds = [store.add_ld(LDRow(0, pool, 0, 1, 4096, 4096, LD_REGIONS, {(0, 0): (pd, i)})) for i in (0, 1)]
        vv = store.add_vv(VVRow(0, "v", pool, 1 << 40, None, None, None, None, "writethrough", 1.0))
        # LD regions in a scattered order, as random writes leave them.
        places = [(lds[0], (r * 7919) % LD_REGIONS) for r in range(LD_REGIONS)]
        places += [(lds[1], r) for r in range(REGIONS - LD_REGIONS)]
        store.assign_many([(vv, r, ld, ld_region) for r, (ld, ld_region) in enumerate(places)])
    finally:
        store.close()
    counts = f"{lds[0]}:{LD_REGIONS},{lds[1]}:{REGIONS - LD_REGIONS}"

    child = subprocess.run(
        [sys.executable, "-c", CHILD, backend.url, str(vv), str(pool), str(fraction), counts],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == -signal.SIGKILL, (child.returncode, child.stdout, child.stderr)

    store = backend.open(create=False)
    try:
        assert check_store(store) == []
        names = {row.name: row.id for row in store.load_vvs()}
        assert "timed" in names
        if "acknowledged" in child.stdout:
            assert "killed" in names, "an acknowledged snapshot was lost"
        vv_counters, ld_counters = store.region_counters()
        snapshots = [names[n] for n in ("timed", "killed") if n in names]
        rows = store.map_array()
        source = sorted(map(tuple, rows[rows[:, 0] == vv][:, 1:].tolist()))
        for snap in snapshots:
            assert vv_counters[snap] == REGIONS
            assert sorted(map(tuple, rows[rows[:, 0] == snap][:, 1:].tolist())) == source
        assert ld_counters == {
            lds[0]: LD_REGIONS * (1 + len(snapshots)),
            lds[1]: (REGIONS - LD_REGIONS) * (1 + len(snapshots)),
        }
    finally:
        store.close()
