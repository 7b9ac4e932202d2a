"""Drill 5: tenant isolation.

Many volumes of one pool are written with patterns that name their volume, block and write (see
``harness.block_data``).  Some are deleted (write-back ones among them, with data still dirty in
the cache), parts of others are trimmed or zeroed (whole regions, partial regions, with and without
NO_HOLE).  New volumes are created in the same pool -- they get the regions just given back -- and
write a few scattered 4 KiB blocks, so that most of every region they touch was never written by
them.  Then every byte of every volume is read: each block must be exactly what that volume last
wrote there, or zeros.  A block of another volume, or a volume's own data from before a trim, fails
the drill, and is named (which volume's block it was).

Then the crash: a big volume is deleted and the server is killed with SIGKILL while the deletion is
under way (the REST API answers during a deletion, which runs in batches, so the drill polls the
volume's allocation and kills as soon as it starts falling).  After the restart: the check passes,
the half-deleted volume holds only its own data or zeros, it can be deleted, and new volumes in
the pool again read only their own data or zeros.

Then snapshot trees (issue 14): a volume is snapshotted and the snapshot cloned twice; the volume
and both clones write the same blocks, each its own pattern.  A clone never reads its sibling's
writes nor the volume's later ones, the snapshot reads the volume as it was; then the snapshot (the
clones' parent) and the volume are deleted, new volumes take the regions given back, and the clones
still read exactly their own data and what they inherited -- no promote, no flatten.

Short variant (CI): 8 volumes, 1 crash during a deletion, 1 snapshot tree.  Long variant: 32
volumes, 10 crashes, 6 trees.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from tests.drills.harness import (
    BLOCK,
    Figures,
    MiB,
    Standard,
    add_pds,
    block_data,
    decode_block,
    duplicate_ld_regions,
    run_data,
    setup_pool,
    setup_volume,
    thinblock_check,
)
from tests.drills.nbd_client import NBDClient
from tests.support.daemon import LOOPBACK, Daemon

REGION = 64 * 1024
PER_REGION = REGION // BLOCK


@dataclass
class Tenant:
    """A volume and what each of its blocks must read: a write sequence, or 0 for zeros."""

    name: str
    tag: int
    size: int
    cache: str
    image: dict[int, int] = field(default_factory=dict)
    seq: int = 0
    # Blocks it holds from the volume it was cloned from, as (that volume's tag, write), until it
    # writes or zeroes them itself.
    inherited: dict[int, tuple[int, int]] = field(default_factory=dict)

    @property
    def blocks(self) -> int:
        return self.size // BLOCK

    async def write(self, client: NBDClient, first: int, count: int) -> None:
        self.seq += 1
        await client.write(first * BLOCK, run_data(self.tag, first, count, self.seq))
        for b in range(first, first + count):
            self.image[b] = self.seq
            self.inherited.pop(b, None)

    def zeroed(self, first: int, count: int) -> None:
        for b in range(first, first + count):
            self.image.pop(b, None)
            self.inherited.pop(b, None)

    def content(self) -> dict[int, tuple[int, int]]:
        """What each block holds, as (tag, write): what a snapshot or clone made now inherits."""
        return {**self.inherited, **{b: (self.tag, seq) for b, seq in self.image.items()}}

    async def verify(self, client: NBDClient, tags: dict[int, str]) -> tuple[int, list[str]]:
        """Read everything; (bytes checked, problems).  ``tags`` names the other volumes' tags."""
        data = await client.read_all(0, self.size)
        problems = []
        content = self.content()
        for b in range(self.blocks):
            got = data[b * BLOCK : (b + 1) * BLOCK]
            held = content.get(b)
            expected = bytes(BLOCK) if held is None else block_data(held[0], b, held[1])
            seq = None if held is None else held[1]
            if got != expected:
                found = decode_block(got)
                if found.kind == "pattern" and held is not None and found.tag != held[0]:
                    what = f"DATA OF ANOTHER VOLUME ({tags.get(found.tag, found.tag)} block {found.block})"
                elif found.kind == "pattern":
                    what = f"its own write {found.seq} of block {found.block}"
                else:
                    what = found.kind
                problems.append(
                    f"{self.name} block {b}: expected {'zeros' if seq is None else f'write {seq}'}, found {what}"
                )
        return len(data), problems


async def _verify_all(daemon: Daemon, tenants: list[Tenant], figures: Figures, when: str) -> None:
    tags = {t.tag: t.name for t in tenants}
    problems: list[str] = []
    for tenant in tenants:
        async with await NBDClient.connect(LOOPBACK, daemon.nbd_port, tenant.name) as client:
            checked, found = await tenant.verify(client, tags)
        figures.bytes_verified += checked
        problems += found
    figures.data_lost += len(problems)
    assert not problems, f"{when}: {len(problems)} blocks wrong; first: " + "; ".join(problems[:8])


async def _scribble(tenant: Tenant, client: NBDClient, rng: random.Random) -> None:
    """A few scattered 4 KiB blocks and one whole region: most of each touched region stays unwritten."""
    for _ in range(6):
        await tenant.write(client, rng.randrange(tenant.blocks), 1)
    region = rng.randrange(tenant.size // REGION)
    await tenant.write(client, region * PER_REGION, PER_REGION)


async def _reclaim(tenant: Tenant, client: NBDClient, rng: random.Random) -> None:
    """Trim and zero parts of a volume, as a file system discarding freed blocks does."""
    regions = tenant.size // REGION
    r = rng.randrange(regions - 3)
    await client.trim(r * REGION, 2 * REGION)  # whole regions: back to the zero LD
    tenant.zeroed(r * PER_REGION, 2 * PER_REGION)
    first = rng.randrange(tenant.blocks - 40)
    await client.trim(first * BLOCK, 21 * BLOCK)  # partial regions, across a boundary
    tenant.zeroed(first, 21)
    first = rng.randrange(tenant.blocks - 40)
    await client.write_zeroes(first * BLOCK, 19 * BLOCK, no_hole=True)
    tenant.zeroed(first, 19)
    first = rng.randrange(tenant.blocks - 40)
    await client.write_zeroes(first * BLOCK, 33 * BLOCK)
    tenant.zeroed(first, 33)


def _delete_in_background(daemon: Daemon, name: str) -> threading.Thread:
    def run() -> None:
        try:
            daemon.api_request("DELETE", f"/volumes/{name}", timeout=120)
        except OSError:
            pass  # the server was killed under it: expected

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _kill_during_deletion(daemon: Daemon, name: str, delay: float) -> None:
    """DELETE the volume, and SIGKILL the server ``delay`` seconds later."""
    thread = _delete_in_background(daemon, name)
    time.sleep(delay)
    daemon.kill()
    thread.join(timeout=30)


async def _snapshot_tree(
    daemon: Daemon,
    figures: Figures,
    rng: random.Random,
    new_tenant: Callable[[str, int, str], Tenant],
    name: str,
) -> list[Tenant]:
    """A volume, its snapshot, two clones of the snapshot writing the same blocks as each other
    and as the volume; checked; then the snapshot and the volume deleted and their regions reused.
    Returns the clones (still alive, to be checked again with everything else)."""
    base = new_tenant(name, 2 * MiB, "writeback")
    async with await NBDClient.connect(LOOPBACK, daemon.nbd_port, base.name) as client:
        for first in range(0, base.blocks, 64):
            await base.write(client, first, 64)
        await client.flush()
    daemon.cli_subprocess_json("vv", "snapshot", base.name, f"{name}-s")
    snap = Tenant(f"{name}-s", base.tag, base.size, base.cache, inherited=base.content())
    clones = []
    for c in range(2):
        clone_name = f"{name}-c{c}"
        daemon.cli_subprocess_json("vv", "clone", snap.name, clone_name)
        clones.append(_clone_tenant(clone_name, 1000 + 10 * base.tag + c, snap))
    # The same blocks written by the volume and by both clones, each with its own tag.
    blocks = sorted(rng.sample(range(base.blocks), 24))
    for tenant in (base, *clones):
        async with await NBDClient.connect(LOOPBACK, daemon.nbd_port, tenant.name) as client:
            for b in blocks:
                await tenant.write(client, b, 1)
            await tenant.write(client, rng.randrange(base.size // REGION) * PER_REGION, PER_REGION)
            await client.trim(blocks[0] * BLOCK, BLOCK)  # a partial trim: zeros in the copy only
            tenant.zeroed(blocks[0], 1)
            await client.flush()
    await _verify_all(daemon, [base, snap, *clones], figures, f"{name}: siblings' writes")
    # The clones' parent and the tree's volume go; the clones keep their data.
    daemon.cli_subprocess_json("vv", "delete", snap.name)
    daemon.cli_subprocess_json("vv", "delete", base.name)
    shown = daemon.cli_subprocess_json("vv", "show", clones[0].name)
    assert shown["parent"] is None and shown["kind"] == "clone", shown
    # New volumes take the regions the deletes gave back.
    reusers = [new_tenant(f"{name}-reuse{j}", 2 * MiB, "writethrough") for j in range(2)]
    for tenant in reusers:
        async with await NBDClient.connect(LOOPBACK, daemon.nbd_port, tenant.name) as client:
            for first in range(0, tenant.blocks, 64):
                await tenant.write(client, first, 64)
    await _verify_all(daemon, [*clones, *reusers], figures, f"{name}: parent deleted, regions reused")
    return [*clones, *reusers]


def _clone_tenant(name: str, tag: int, snap: Tenant) -> Tenant:
    """A clone of ``snap`` as a tenant of its own (``tag`` for its writes: a sibling's writes are
    told from its own), holding the snapshot's content to start with."""
    return Tenant(name, tag, snap.size, "writethrough", inherited=dict(snap.inherited))


async def isolation_drill(
    make_daemon: Callable[..., Daemon], *, volumes: int, crashes: int, seed: int, trees: int = 1
) -> Figures:
    rng = random.Random(seed)
    figures = Figures("5-isolation")
    daemon = make_daemon("tenants")
    daemon.start()
    add_pds(daemon, Standard(count=4, size=256 * MiB), daemon.workdir)
    setup_pool(daemon, "shared", 1, region=REGION, increment=4 * MiB)
    tag = 10

    def new_tenant(name: str, size: int, cache: str) -> Tenant:
        nonlocal tag
        tag += 1
        setup_volume(daemon, name, "shared", size, cache)
        return Tenant(name, tag, size, cache)

    # --- many volumes, every block written ---
    old = [new_tenant(f"old{i}", 2 * MiB, "writeback" if i % 2 else "writethrough") for i in range(volumes)]
    for tenant in old:
        async with await NBDClient.connect(LOOPBACK, daemon.nbd_port, tenant.name) as client:
            for first in range(0, tenant.blocks, 64):
                await tenant.write(client, first, 64)
            await client.flush()
    alive: list[Tenant] = []
    for i, tenant in enumerate(old):
        async with await NBDClient.connect(LOOPBACK, daemon.nbd_port, tenant.name) as client:
            if i % 3 == 0:
                # Deleted; a write-back one with fresh data still dirty in the cache.
                await tenant.write(client, 5, 40)
                continue
            if i % 3 == 1:
                await _reclaim(tenant, client, rng)
            alive.append(tenant)
    for i, tenant in enumerate(old):
        if i % 3 == 0:
            daemon.cli_subprocess_json("vv", "delete", tenant.name)
    # --- new volumes get the regions back ---
    fresh = [
        new_tenant(f"new{j}", 2 * MiB, "writeback" if j % 2 else "writethrough")
        for j in range(volumes * 2 // 3)
    ]
    for tenant in fresh:
        async with await NBDClient.connect(LOOPBACK, daemon.nbd_port, tenant.name) as client:
            await _scribble(tenant, client, rng)
    pool = daemon.cli_subprocess_json("pool", "show", "shared")
    figures.notes["pool_capacity_bytes"] = pool["capacity"]
    await _verify_all(daemon, alive + fresh, figures, "after deletes, trims and new volumes")
    figures.rounds += 1

    # --- a crash in the middle of a deletion ---
    # The kill comes ``delay`` seconds after the DELETE; the delay adapts until a kill lands while the
    # deletion is under way (too late: the volume is gone; too early: it is untouched).
    mid_deletion = 0
    delay = 0.2
    for crash in range(crashes):
        attempts = 0
        while True:
            attempts += 1
            victim = new_tenant(f"victim{crash}-{attempts}", 32 * MiB, "writethrough")
            async with await NBDClient.connect(LOOPBACK, daemon.nbd_port, victim.name) as client:
                for first in range(0, victim.blocks, 64):
                    await victim.write(client, first, 64)
                await client.flush()
            regions = victim.size // REGION
            await asyncio.to_thread(_kill_during_deletion, daemon, victim.name, delay)
            figures.faults += 1
            rc, report = thinblock_check(daemon.data_dir)
            assert rc == 0 and report["ok"], f"check after a kill during a deletion: {report}"
            daemon.start()
            assert duplicate_ld_regions(daemon.data_dir) == []
            status, doc = daemon.api_request("GET", f"/volumes/{victim.name}")
            if status == 404:
                delay /= 2  # the deletion was over: kill sooner
            else:
                assert status == 200, doc
                # What is left of it is its own data; the rest (regions given back) reads zeros.
                async with await NBDClient.connect(LOOPBACK, daemon.nbd_port, victim.name) as client:
                    data = await client.read_all(0, victim.size)
                figures.bytes_verified += len(data)
                zeros = 0
                for b in range(victim.blocks):
                    found = decode_block(data[b * BLOCK : (b + 1) * BLOCK])
                    assert found.kind == "zeros" or (found.kind, found.tag, found.block, found.seq) == (
                        "pattern",
                        victim.tag,
                        b,
                        victim.image[b],
                    ), f"half-deleted {victim.name} block {b} holds {found}"
                    zeros += found.kind == "zeros"
                daemon.cli_subprocess_json("vv", "delete", victim.name)
                if zeros or int(doc["regions_allocated"]) < regions:
                    mid_deletion += 1
                    break
                delay = delay * 2 + 0.05  # the deletion had not begun: kill later
            assert attempts < 8, f"no kill landed in the middle of a deletion in {attempts} attempts"
        # new volumes in the pool: only their own data or zeros
        for j in range(3):
            tenant = new_tenant(f"after{crash}-{j}", 2 * MiB, "writeback" if j % 2 else "writethrough")
            async with await NBDClient.connect(LOOPBACK, daemon.nbd_port, tenant.name) as client:
                await _scribble(tenant, client, rng)
            fresh.append(tenant)
        await _verify_all(daemon, alive + fresh, figures, f"after crash {crash} during a deletion")
        figures.rounds += 1

    assert mid_deletion == crashes

    # --- snapshot trees: clones isolated from each other, intact after their parent is deleted ---
    for t in range(trees):
        survivors = await _snapshot_tree(daemon, figures, rng, new_tenant, f"tree{t}")
        await _verify_all(daemon, alive + fresh + survivors, figures, f"after snapshot tree {t}")
        fresh += survivors
        figures.rounds += 1
    assert daemon.stop() == 0
    rc, report = thinblock_check(daemon.data_dir)
    assert rc == 0 and report["ok"], report
    figures.notes.update({"volumes": len(old) + len(fresh), "kills_mid_deletion": mid_deletion})
    figures.report()
    return figures


async def test_isolation_short(make_daemon: Callable[..., Daemon]) -> None:
    figures = await isolation_drill(make_daemon, volumes=8, crashes=1, seed=5)
    assert figures.data_lost == 0


@pytest.mark.long
@pytest.mark.timeout(3600)
async def test_isolation_long(make_daemon: Callable[..., Daemon]) -> None:
    figures = await isolation_drill(make_daemon, volumes=32, crashes=10, seed=55, trees=6)
    assert figures.data_lost == 0
