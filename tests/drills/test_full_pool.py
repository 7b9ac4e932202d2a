"""Drill 3: full pools.

Writes run into each of the three walls a thin volume can hit:

1. the free chunklets of every PD (two small PDs, a RAID 1 pool that grows until nothing is left);
2. a VV's allocation limit (``vv create --alloc-limit``);
3. a pool's growth limit (``pool create --growth-limit``), with two volumes sharing it.

Each time: the host gets NBD_ENOSPC for writes that need a new region, and for those only
(rewrites of regions it holds still succeed); every byte written earlier reads back; the alert of
that wall (``pool-out-of-chunklets``, ``vv-allocation-limit``, ``pool-growth-limit``) is recorded
once, however many writes were refused; the server stays up and other volumes keep working; and
after the administrator adds PDs (``pd add``) or raises the limit (``vv set``, ``pool set``), the
very writes that were refused succeed.  qemu-io, a client we did not write, sees the same ENOSPC.

Short variant (CI): each wall once, one writer.  Long variant: each wall crossed several times,
by several connections racing for the last regions; exactly the capacity is handed out, never a
region twice, and each crossing raises its alert once.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
from collections.abc import Callable
from typing import Any

import pytest

from tests.drills.harness import (
    BLOCK,
    Figures,
    MiB,
    Standard,
    add_pds,
    duplicate_ld_regions,
    run_data,
    setup_volume,
)
from tests.drills.nbd_client import NBD_ENOSPC, NBDClient, NBDError
from tests.support.daemon import LOOPBACK, Daemon

REGION = 64 * 1024
PER_REGION = REGION // BLOCK


class Writer:
    """Whole-region writes of one volume with what each region should now hold."""

    def __init__(self, daemon: Daemon, volume: str, tag: int) -> None:
        self.daemon = daemon
        self.volume = volume
        self.tag = tag
        self.image: dict[int, int] = {}  # region -> write seq
        self.seq = 0
        self.refused = 0

    async def write(self, client: NBDClient, region: int) -> bool:
        """True when written, False on ENOSPC (anything else fails the drill)."""
        self.seq += 1
        seq = self.seq
        try:
            await client.write(region * REGION, run_data(self.tag, region * PER_REGION, PER_REGION, seq))
        except NBDError as exc:
            assert exc.errno == NBD_ENOSPC, f"{self.volume} region {region}: {exc}"
            self.refused += 1
            return False
        self.image[region] = seq
        return True

    async def verify(self, client: NBDClient, regions: int) -> int:
        """Every region: its last write, or zeros if never written.  Bytes checked."""
        data = await client.read_all(0, regions * REGION)
        for region in range(regions):
            seq = self.image.get(region)
            expected = (
                bytes(REGION) if seq is None else run_data(self.tag, region * PER_REGION, PER_REGION, seq)
            )
            got = data[region * REGION : (region + 1) * REGION]
            assert got == expected, f"{self.volume} region {region} does not read back (expected write {seq})"
        return len(data)


def _count(daemon: Daemon, kind: str, obj: str) -> int:
    return sum(1 for a in daemon.alerts() if a["kind"] == kind and a["object"] == obj)


def _qemu_io_write(daemon: Daemon, volume: str, offset: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-io", "-f", "raw", "-c", f"write -P 0x5a {offset} 64k", daemon.uri(volume)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


async def _race(writer: Writer, clients: list[NBDClient], regions: list[int]) -> tuple[int, int]:
    """Write ``regions`` from all ``clients`` at once (each region once); (written, refused)."""
    queue = list(regions)
    written = refused = 0

    async def run(client: NBDClient) -> None:
        nonlocal written, refused
        while queue:
            region = queue.pop()
            if await writer.write(client, region):
                written += 1
            else:
                refused += 1

    await asyncio.gather(*(run(c) for c in clients))
    return written, refused


async def full_pool_drill(
    make_daemon: Callable[..., Daemon], *, crossings: int, connections: int, seed: int
) -> Figures:
    rng = random.Random(seed)
    figures = Figures("3-full-pool")
    daemon = make_daemon("full")
    daemon.start()
    work = daemon.workdir
    conns: list[NBDClient] = []

    async def connect(volume: str, n: int) -> list[NBDClient]:
        made = [await NBDClient.connect(LOOPBACK, daemon.nbd_port, volume) for _ in range(n)]
        conns.extend(made)
        return made

    try:
        # --- 1. the free chunklets of every PD ---
        add_pds(daemon, Standard(count=2, size=4 * MiB), work)  # RAID 1 over them: 4 MiB, 64 regions
        daemon.cli_subprocess_json(
            "pool", "create", "all", "--raid", "1", "--region-size", "64K", "--growth-increment", "2MiB"
        )
        setup_volume(daemon, "f1", "all", 64 * MiB)
        f1 = Writer(daemon, "f1", 1)
        clients = await connect("f1", connections)
        capacity = 64
        next_region = 0
        pds = 2
        for crossing in range(crossings):
            want = list(range(next_region, next_region + capacity + 8 + rng.randrange(8)))
            rng.shuffle(want)
            written, refused = await _race(f1, clients, want)
            assert written == capacity and refused == len(want) - capacity, (crossing, written, refused)
            # rewrites of regions it holds still succeed
            held = sorted(f1.image)
            for region in rng.sample(held, 4):
                assert await f1.write(clients[0], region)
            figures.bytes_verified += await f1.verify(clients[0], max(want) + 1)
            assert _count(daemon, "pool-out-of-chunklets", "pool:all") == crossing + 1
            figures.faults += refused
            # two more PDs (RAID 1 needs two with free chunklets): the refused writes now succeed
            add_pds(daemon, Standard(count=2, size=4 * MiB), work, first=pds)
            pds += 2
            again = [r for r in want if r not in f1.image]
            written, refused = await _race(f1, clients, again)
            assert (written, refused) == (len(again), 0)
            next_region = max(want) + 1
            capacity = 64 - len(again)  # what the two new PDs have left
            figures.bytes_verified += await f1.verify(clients[0], next_region)
            figures.rounds += 1
        assert daemon.running

        # Room for the other walls: PDs with chunklets to spare.
        add_pds(daemon, Standard(count=4, size=256 * MiB), work, first=pds)

        # --- 2. a VV's allocation limit ---
        daemon.cli_subprocess_json(
            "pool", "create", "p", "--raid", "1", "--region-size", "64K", "--growth-increment", "4MiB"
        )
        daemon.cli_subprocess_json(
            "vv", "create", "limited", "--pool", "p", "--size", "64MiB", "--alloc-limit", "1MiB"
        )
        setup_volume(daemon, "bystander", "p", 16 * MiB)
        limited = Writer(daemon, "limited", 2)
        bystander = Writer(daemon, "bystander", 3)
        clients = await connect("limited", connections)
        (other,) = await connect("bystander", 1)
        limit_regions = 16
        held_regions: list[int] = []
        free_regions = list(range(1024))
        rng.shuffle(free_regions)
        for crossing in range(crossings):
            want = [
                free_regions.pop() for _ in range(limit_regions - len(held_regions) + 6 + rng.randrange(6))
            ]
            written, refused = await _race(limited, clients, want)
            assert written == limit_regions - len(held_regions), (crossing, written, refused)
            held_regions = sorted(limited.image)
            assert len(held_regions) == limit_regions
            for region in rng.sample(held_regions, 4):
                assert await limited.write(clients[0], region), "a rewrite of a held region was refused"
            # a client we did not write sees the same
            refused_region = next(r for r in want if r not in limited.image)
            result = _qemu_io_write(daemon, "limited", refused_region * REGION)
            assert "No space left on device" in result.stdout + result.stderr, result
            # the server and the other volumes carry on
            assert await bystander.write(other, crossing)
            figures.bytes_verified += await limited.verify(clients[0], 1024)
            figures.bytes_verified += await bystander.verify(other, crossing + 1)
            vv = daemon.cli_subprocess_json("vv", "show", "limited")
            assert vv["regions_allocated"] == limit_regions, vv
            assert _count(daemon, "vv-allocation-limit", "vv:limited") == crossing + 1
            figures.faults += refused + 1
            # the administrator raises the limit: the same writes succeed
            limit_regions += 16
            daemon.cli_subprocess_json(
                "vv", "set", "limited", "--alloc-limit", f"{limit_regions * REGION // 1024}K"
            )
            again = [r for r in want if r not in limited.image]
            written, refused = await _race(limited, clients, again)
            assert (written, refused) == (len(again), 0)
            held_regions = sorted(limited.image)
            figures.bytes_verified += await limited.verify(clients[0], 1024)
            figures.rounds += 1

        # --- 3. a pool's growth limit, two volumes sharing it ---
        daemon.cli_subprocess_json(
            "pool", "create", "capped", "--raid", "1", "--region-size", "64K",
            "--growth-increment", "2MiB", "--growth-limit", "4MiB",
        )  # fmt: skip
        setup_volume(daemon, "c1", "capped", 32 * MiB)
        setup_volume(daemon, "c2", "capped", 32 * MiB)
        writers = [Writer(daemon, "c1", 4), Writer(daemon, "c2", 5)]
        groups = [await connect("c1", connections), await connect("c2", connections)]
        growth_limit = 4 * MiB
        used = 0
        next_regions = [0, 0]
        for crossing in range(crossings):
            capacity = growth_limit // REGION - used
            wants = []
            for i in range(2):
                n = capacity // 2 + 4 + rng.randrange(4)
                wants.append(list(range(next_regions[i], next_regions[i] + n)))
                next_regions[i] += n
            results = await asyncio.gather(
                *(_race(w, g, want) for w, g, want in zip(writers, groups, wants, strict=True))
            )
            written = sum(r[0] for r in results)
            refused = sum(r[1] for r in results)
            assert written == capacity, (crossing, results, capacity)
            used += written
            for w, g in zip(writers, groups, strict=True):
                for region in rng.sample(sorted(w.image), 2):
                    assert await w.write(g[0], region)
                figures.bytes_verified += await w.verify(g[0], max(next_regions))
            pool = daemon.cli_subprocess_json("pool", "show", "capped")
            assert pool["capacity"] == growth_limit and pool["used"] == used * REGION, pool
            assert _count(daemon, "pool-growth-limit", "pool:capped") == crossing + 1
            figures.faults += refused
            growth_limit += 4 * MiB
            daemon.cli_subprocess_json("pool", "set", "capped", "--growth-limit", f"{growth_limit // MiB}MiB")
            agains = [[r for r in want if r not in w.image] for w, want in zip(writers, wants, strict=True)]
            results = await asyncio.gather(
                *(_race(w, g, a) for w, g, a in zip(writers, groups, agains, strict=True))
            )
            assert all(r == (len(a), 0) for r, a in zip(results, agains, strict=True)), results
            used += sum(len(a) for a in agains)
            for w, g in zip(writers, groups, strict=True):
                figures.bytes_verified += await w.verify(g[0], max(next_regions))
            figures.rounds += 1

        # --- the server stayed up, and its store is sound ---
        status: dict[str, Any] = daemon.api_get("/status")
        assert status["volumes"] == 5
        assert duplicate_ld_regions(daemon.data_dir) == []
    finally:
        for client in conns:
            await client.close()
    assert daemon.stop() == 0
    figures.notes["enospc_answers"] = figures.faults
    figures.report()
    return figures


async def test_full_pool_short(make_daemon: Callable[..., Daemon]) -> None:
    figures = await full_pool_drill(make_daemon, crossings=1, connections=1, seed=3)
    assert figures.rounds == 3 and figures.data_lost == 0


@pytest.mark.long
@pytest.mark.timeout(3600)
async def test_full_pool_long(make_daemon: Callable[..., Daemon]) -> None:
    figures = await full_pool_drill(make_daemon, crossings=5, connections=4, seed=33)
    assert figures.rounds == 15 and figures.data_lost == 0
