"""Drill: a node pair on PostgreSQL, where the owner's lease in the store decides who owns its
volumes (issue 12, points 4 and 5).

Each node has its own data directory (PDs) and its own database in one throwaway PostgreSQL
cluster; n2 may take n1 over (``partner_metadata``: n1's database).  n1 owns a write-back volume
served on the pair's service address and mirrors its cache to n2.

* SIGSTOP of the owner past its lease: n2 takes the lease (epoch + 1, compare-and-set), refuses
  n1's mirror link, replays the copies it holds, and serves the volume once n1 lets the service
  address go.  SIGCONT of n1: it finds its lease lost and fenced (fence.py): not one byte of its
  PDs changes and not one region-map row is written with its old epoch after the takeover,
  although it had dirty data to destage; a write sent to it while it was stopped fails, and its
  NBD server stops.  Every write it acknowledged reads back on n2.
* kill -9 of the owner and an immediate restart, before its lease expired: the restarted owner
  must not serve without the writes its partner holds (it did before: same holder, same epoch,
  the lease taken back at once, the partner never got to replay).  It refuses to start and gives
  its lease up; the partner takes over; every acknowledged write reads back.
* kill -9 of the owner at a random moment of a write-back load with a FLUSH every 64 writes,
  answered on the two copies (2 rounds; 20 with ``-m long``): every acknowledged write reads
  back after the takeover; the time from the kill to the first read served by the partner.
* the old owner started again after the takeover rejoins as partner; the new owner's writes are
  mirrored to it again; kill -9 of the new owner: the old one takes it over, opens its own
  engine once its lease is back, and every acknowledged write of both volumes reads back.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import psycopg
import pytest

from tests.drills.harness import (
    BLOCK,
    Figures,
    Standard,
    add_pds,
    block_data,
    setup_pool,
    setup_volume,
    wait_until,
)
from tests.drills.nbd_client import NBDClient
from tests.drills.test_node_pair import (
    BLOCKS,
    SERVICE_HOST,
    TAG,
    ReconnectingWriter,
    mirror_alerts,
    read_back,
)
from tests.support.daemon import Daemon
from tests.support.ports import free_port
from tests.support.postgres import PostgresCluster, fresh_database
from thinblock.units import MiB

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("node-pair")]

PARTNER_TIMEOUT = 0.5
LEASE_TTL = 3.0
FENCE_MARGIN = 1.0


def pg_node_config(
    name: str,
    listen: int,
    partner: int,
    *,
    takeover: str = "",
    lease_ttl: float = LEASE_TTL,
    destage_delay: float = 60.0,
) -> str:
    return (
        "[node]\n"
        f'name = "{name}"\n'
        f'mirror_listen = "127.0.0.1:{listen}"\n'
        f'partner = "127.0.0.1:{partner}"\n'
        f"partner_timeout = {PARTNER_TIMEOUT}\n"
        f"lease_ttl = {lease_ttl}\n"
        f"fence_margin = {FENCE_MARGIN}\n"
        f"{takeover}"
        "[engine]\n"
        # By default writes stay in n1's cache (and n2's copies) for the whole drill: a fenced n1
        # would have something to destage.
        f"destage_delay = {destage_delay}\n"
    )


def start_pair_taking_each_other_over(
    make_daemon: Callable[..., Daemon],
    urls: tuple[str, str],
    base: Path,
    tag: str,
    *,
    n2_destage_delay: float | None = None,
) -> tuple[Daemon, Daemon, int, int]:
    """n1 and n2, each on its own database, each configured to take the other over (the other's
    data directory, store and service address), started and in sync, each with a 64 MiB
    write-back volume of its own on RAID 1 (n1 "wb", n2 "wb2").  Both serve NBD on
    SERVICE_HOST, the address a takeover binds.  Returns (n1, n2, n1's service port, n2's)."""
    url1, url2 = urls
    p1, p2 = free_port(), free_port()
    s1, s2 = free_port(SERVICE_HOST), free_port(SERVICE_HOST)
    dir1, dir2 = base / f"n1-{tag}" / "data", base / f"n2-{tag}" / "data"

    def takeover_of(data: Path, service: int, url: str) -> str:
        return f'partner_data = "{data}"\npartner_service = "{SERVICE_HOST}:{service}"\npartner_metadata = "{url}"\n'

    n2_options = {} if n2_destage_delay is None else {"destage_delay": n2_destage_delay}
    n1 = make_daemon(
        f"n1-{tag}",
        config=pg_node_config("n1", p1, p2, takeover=takeover_of(dir2, s2, url2)),
        args=("--metadata", url1, "--nbd", f"{SERVICE_HOST}:{s1}"),
    ).start()
    n2 = make_daemon(
        f"n2-{tag}",
        config=pg_node_config("n2", p2, p1, takeover=takeover_of(dir1, s1, url1), **n2_options),
        args=("--metadata", url2, "--nbd", f"{SERVICE_HOST}:{s2}"),
    ).start()
    assert (n1.data_dir, n2.data_dir) == (dir1, dir2)
    wait_until(lambda: n1.events("mirror-in-sync") and n2.events("mirror-in-sync"), "the pair in sync")
    for daemon, volume in ((n1, "wb"), (n2, "wb2")):
        add_pds(daemon, Standard(count=2, size=64 * MiB), daemon.workdir)
        setup_pool(daemon, "p", 1)
        setup_volume(daemon, volume, "p", 64 * MiB, cache="writeback")
    return n1, n2, s1, s2


@pytest.fixture
def two_databases(postgres_cluster: PostgresCluster) -> Iterator[tuple[str, str]]:
    with ExitStack() as stack:
        yield (
            stack.enter_context(fresh_database(postgres_cluster)),
            stack.enter_context(fresh_database(postgres_cluster)),
        )


def start_pg_pair(
    make_daemon: Callable[..., Daemon],
    urls: tuple[str, str],
    tag: str,
    lease_ttl: float = LEASE_TTL,
    destage_delay: float = 60.0,
) -> tuple[Daemon, Daemon, int]:
    url1, url2 = urls
    p1, p2, service = free_port(), free_port(), free_port(SERVICE_HOST)
    n1 = make_daemon(
        f"n1-{tag}",
        config=pg_node_config("n1", p1, p2, lease_ttl=lease_ttl, destage_delay=destage_delay),
        args=("--metadata", url1, "--nbd", f"{SERVICE_HOST}:{service}"),
    ).start()
    takeover = (
        f'partner_data = "{n1.data_dir}"\npartner_service = "{SERVICE_HOST}:{service}"\n'
        f'partner_metadata = "{url1}"\n'
    )
    n2 = make_daemon(
        f"n2-{tag}",
        config=pg_node_config("n2", p2, p1, takeover=takeover, lease_ttl=lease_ttl),
        args=("--metadata", url2),
    ).start()
    wait_until(lambda: n1.events("mirror-in-sync") and n2.events("mirror-in-sync"), "the pair in sync")
    add_pds(n1, Standard(count=2, size=64 * MiB), n1.workdir)
    setup_pool(n1, "p", 1)
    setup_volume(n1, "wb", "p", 64 * MiB, cache="writeback")
    return n1, n2, service


def lease_row(url: str, name: str) -> tuple[str, int]:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT holder, epoch FROM leases WHERE name = %s", (name,)).fetchone()
    assert row is not None, name
    return str(row[0]), int(row[1])


def map_rows_by_epoch(url: str) -> dict[int | None, int]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT epoch, COUNT(*) FROM vv_map GROUP BY epoch").fetchall()
    return {epoch: int(n) for epoch, n in rows}


def pd_digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("pd*.img"))}


async def write_blocks(service: int, count: int, first_seq: int = 1) -> dict[int, int]:
    """``count`` acknowledged 4 KiB writes through the service address; block -> last sequence."""
    acked: dict[int, int] = {}
    async with await NBDClient.connect(SERVICE_HOST, service, "wb") as client:
        for seq in range(first_seq, first_seq + count):
            block = (seq * 7919) % BLOCKS
            await client.write(block * BLOCK, block_data(TAG, block, seq))
            acked[block] = seq
    return acked


async def lost_blocks(service: int, acked: dict[int, int]) -> list[int]:
    async with await NBDClient.connect(SERVICE_HOST, service, "wb", timeout=30) as client:
        data = await client.read_all(0, BLOCKS * BLOCK)
    return [
        b for b, seq in acked.items() if bytes(data[b * BLOCK : (b + 1) * BLOCK]) != block_data(TAG, b, seq)
    ]


async def one_sigstop_round(
    make_daemon: Callable[..., Daemon], two_databases: tuple[str, str], tag: str
) -> dict[str, float]:
    url1 = two_databases[0]
    n1, n2, service = start_pg_pair(make_daemon, two_databases, tag)
    _, old_epoch = lease_row(url1, "node:n1")
    acked = await write_blocks(service, 600)
    held = await NBDClient.connect(SERVICE_HOST, service, "wb")  # n1's client through it all
    dirty = n1.api_ok("GET", "/volumes/wb")["dirty_bytes"]
    assert dirty > 0, "nothing dirty in n1's cache: the drill would not exercise the fence"
    rows_before = map_rows_by_epoch(url1)
    assert rows_before.get(old_epoch, 0) > 0, rows_before

    os.kill(n1.pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        # A write sent while n1 is stopped: it waits in n1's socket.
        in_flight = asyncio.ensure_future(held.write(0, block_data(TAG, 0, 10**6)))
        await asyncio.to_thread(
            wait_until, lambda: n2.events("takeover-replayed"), "n2 took n1's lease and replayed", 60
        )
        stop_to_replayed = time.monotonic() - stopped_at  # as the test saw it (log polling included)
        (replayed,) = [json.loads(line) for line in n2.events("takeover-replayed")]
        holder, epoch = lease_row(url1, "node:n1")
        assert epoch == old_epoch + 1 and holder.startswith("takeover by n2"), (holder, epoch)
        assert replayed["epoch"] == epoch and replayed["replayed"] > 0, replayed
        rows_at_takeover = map_rows_by_epoch(url1)
        digests_at_takeover = pd_digests(n1.workdir)
    finally:
        os.kill(n1.pid, signal.SIGCONT)

    # The old owner runs again: its client's write fails, it stops serving, the address moves.
    with pytest.raises(Exception) as refused:
        await asyncio.wait_for(in_flight, 60)
    await asyncio.to_thread(wait_until, lambda: n1.events("fenced"), "n1 fenced and its NBD stopped", 60)
    await asyncio.to_thread(wait_until, lambda: n2.events("takeover-done"), "n2 serving the address", 60)
    await asyncio.sleep(2 * PARTNER_TIMEOUT + 1.0)  # n1's degrade flush and destager retries ran
    assert pd_digests(n1.workdir) == digests_at_takeover, "the fenced old owner wrote to its PDs"
    rows_after = map_rows_by_epoch(url1)
    assert rows_after.get(old_epoch, 0) == rows_at_takeover.get(old_epoch, 0) == rows_before[old_epoch], (
        rows_before,
        rows_at_takeover,
        rows_after,
    )
    assert any(a["kind"] == "lease-lost" for a in n1.alerts()), n1.log_tail()
    held.abort()

    lost = await lost_blocks(service, acked)
    assert lost == [], f"{len(lost)} acknowledged writes lost after the takeover (blocks {lost[:5]})"
    print(
        f"node-pair SIGSTOP-owner drill: {len(acked)} blocks checked, lost 0, replayed"
        f" {replayed['replayed']}; SIGSTOP to copies replayed {stop_to_replayed:.2f} s (lease {LEASE_TTL} s),"
        f" of which lease taken to replayed {replayed['seconds']} s; old epoch {old_epoch} rows after the takeover: +0; fenced write:"
        f" {type(refused.value).__name__}"
    )
    assert n2.stop() == 0
    n1.stop()
    return {
        "checked": float(len(acked)),
        "replayed": float(replayed["replayed"]),
        "takeover_s": replayed["seconds"],
        "stop_to_replayed_s": stop_to_replayed,
    }


async def test_owner_stopped_past_its_lease_is_taken_over_and_writes_nothing_after(
    make_daemon: Callable[..., Daemon], two_databases: tuple[str, str]
) -> None:
    await one_sigstop_round(make_daemon, two_databases, "stop")


@pytest.mark.long
@pytest.mark.timeout(1800)
async def test_owner_stopped_past_its_lease_long(
    make_daemon: Callable[..., Daemon], postgres_cluster: PostgresCluster
) -> None:
    rounds = []
    for r in range(5):
        with ExitStack() as stack:
            urls = (
                stack.enter_context(fresh_database(postgres_cluster)),
                stack.enter_context(fresh_database(postgres_cluster)),
            )
            rounds.append(await one_sigstop_round(make_daemon, urls, f"stop{r}"))
    takeover = sorted(r["takeover_s"] for r in rounds)
    silent = sorted(r["stop_to_replayed_s"] for r in rounds)
    print(
        f"node-pair SIGSTOP-owner drill: {len(rounds)} rounds, {sum(int(r['checked']) for r in rounds)} blocks"
        f" checked, lost 0, replayed {sum(int(r['replayed']) for r in rounds)} writes; SIGSTOP to copies"
        f" replayed: median {silent[len(silent) // 2]:.2f} s, max {silent[-1]:.2f} s (lease {LEASE_TTL} s);"
        f" lease taken to replayed: median {takeover[len(takeover) // 2]:.2f} s, max {takeover[-1]:.2f} s"
    )


async def test_owner_restarted_before_the_partner_took_over_does_not_serve_stale_data(
    make_daemon: Callable[..., Daemon], two_databases: tuple[str, str]
) -> None:
    # A lease of 30 s: the restarted owner is back long before it could expire.
    n1, n2, service = start_pg_pair(make_daemon, two_databases, "restart", lease_ttl=30.0)
    acked = await write_blocks(service, 600)
    assert n1.api_ok("GET", "/volumes/wb")["dirty_bytes"] > 0
    n1.kill()
    # At once: its lease has not expired, and it is the same holder (host and data directory).
    rc, _records = await asyncio.to_thread(n1.start_expecting_failure)
    if rc == 0:  # it serves: what does it serve?
        lost = await lost_blocks(service, acked)
        raise AssertionError(
            f"the restarted owner serves without the writes its partner holds: {len(lost)} of"
            f" {len(acked)} acknowledged blocks lost"
        )
    assert "partner must replay" in n1.log_text(), n1.log_tail()
    await asyncio.to_thread(wait_until, lambda: n2.events("takeover-done"), "n2 took n1 over", 60)
    (done,) = [json.loads(line) for line in n2.events("takeover-done")]
    assert done["replayed"] > 0, done
    lost = await lost_blocks(service, acked)
    assert lost == [], f"{len(lost)} acknowledged writes lost (blocks {lost[:5]})"
    assert n2.stop() == 0


# --- kill -9 of the owner under write-back load, on PostgreSQL ------------------------------------
KILL_DESTAGE_DELAY = 0.5  # some regions destaged and dropped by the partner, some held at the kill
FLUSH_EVERY = 64


async def first_read_after(service: int, since: float, stop: asyncio.Event) -> float:
    """Seconds from ``since`` until a read through the service address is answered (by whoever
    serves it: after a kill -9 of the owner, the partner that took it over)."""
    while not stop.is_set():
        try:
            async with await NBDClient.connect(SERVICE_HOST, service, "wb", timeout=2.0) as client:
                await asyncio.wait_for(client.read(0, BLOCK), 5.0)
                return time.monotonic() - since
        except Exception:  # refused, reset, or the old owner's half-dead socket: not served yet
            await asyncio.sleep(0.02)
    raise AssertionError("no read was answered")


async def one_kill_round(
    make_daemon: Callable[..., Daemon], urls: tuple[str, str], tag: str, rng: random.Random
) -> dict[str, float]:
    """kill -9 of n1 at a random moment of a write-back load with a FLUSH every FLUSH_EVERY writes
    (answered on the two copies: n1's cache and n2's mirror); n2 takes n1's lease once it expired,
    replays and serves.  Every acknowledged write reads back, the flushed ones included."""
    n1, n2, service = start_pg_pair(make_daemon, urls, tag, destage_delay=KILL_DESTAGE_DELAY)
    writer = ReconnectingWriter(service, "wb", flush_every=FLUSH_EVERY)
    task = asyncio.create_task(writer.run())
    stop_probe = asyncio.Event()
    try:
        await writer.writes_after(0, 2 * FLUSH_EVERY)
        (pair,) = n1.api_ok("GET", "/nodes")
        assert pair["mirror"] == "in-sync" and pair["flush_covered"], pair
        await writer.writes_after(writer.seq, rng.randint(0, 1500))
        await asyncio.sleep(rng.uniform(0.0, 0.3))  # a random moment: mid-write, mid-flush, mid-destage
        flushes_before = writer.flushes
        flushed_before = dict(writer.flushed)
        n1.kill()
        killed_at = time.monotonic()
        probe = asyncio.ensure_future(first_read_after(service, killed_at, stop_probe))
        first_read_s = await asyncio.wait_for(probe, 120)
        await writer.writes_after(writer.seq, 100)  # the writer goes on with the new owner
    finally:
        stop_probe.set()
        writer.stop.set()
        await task
    done = [json.loads(line) for line in n2.events("takeover-done")]
    assert len(done) == 1, n2.log_tail()
    assert flushes_before > 0 and flushed_before, "no FLUSH was acknowledged before the kill"
    lost = await read_back(service, writer)
    assert lost == [], f"{len(lost)} acknowledged writes lost after the takeover (blocks {lost[:5]})"
    holder, _ = lease_row(urls[0], "node:n1")
    assert holder.startswith("takeover by n2"), holder
    assert n2.stop() == 0
    return {
        "checked": float(len(writer.acked)),
        "acks": float(writer.acks),
        "flushed_checked": float(len(flushed_before)),
        "flushes": float(flushes_before),
        "replayed": float(done[0]["replayed"]),
        "first_read_s": first_read_s,
        "takeover_s": float(done[0]["seconds"]),
    }


async def run_kill_rounds(make_daemon: Callable[..., Daemon], cluster: PostgresCluster, rounds: int) -> None:
    rng = random.Random(int(os.environ.get("THINBLOCK_DRILL_SEED", "12")))
    results = []
    for r in range(rounds):
        with ExitStack() as stack:
            urls = (
                stack.enter_context(fresh_database(cluster)),
                stack.enter_context(fresh_database(cluster)),
            )
            results.append(await one_kill_round(make_daemon, urls, f"kill{r}", rng))
        print(f"round {r}: {results[-1]}", flush=True)
    first = sorted(r["first_read_s"] for r in results)
    print(
        f"node-pair kill -9 drill on PostgreSQL: {rounds} rounds, {sum(int(r['acks']) for r in results)}"
        f" writes acknowledged, {sum(int(r['checked']) for r in results)} blocks checked against the last"
        " acknowledged write of each"
        f" ({sum(int(r['flushed_checked']) for r in results)} of them covered by a FLUSH answered on"
        f" the two copies, {sum(int(r['flushes']) for r in results)} FLUSHes), lost 0, replayed"
        f" {sum(int(r['replayed']) for r in results)} writes; kill -9 to the first read served by the"
        f" partner: median {first[len(first) // 2]:.2f} s, max {first[-1]:.2f} s (lease {LEASE_TTL} s)"
    )
    Figures(
        "node-pair-kill9-postgresql",
        rounds=rounds,
        bytes_verified=sum(int(r["checked"]) for r in results) * BLOCK,
        faults=rounds,
        notes={
            "acknowledged_writes": sum(int(r["acks"]) for r in results),
            "blocks_checked": sum(int(r["checked"]) for r in results),
            "first_read_median_s": round(first[len(first) // 2], 2),
            "first_read_max_s": round(first[-1], 2),
            "lease_ttl_s": LEASE_TTL,
        },
    ).report()


async def test_owner_killed_under_load_partner_takes_over_nothing_lost(
    make_daemon: Callable[..., Daemon], postgres_cluster: PostgresCluster
) -> None:
    await run_kill_rounds(make_daemon, postgres_cluster, 2)


@pytest.mark.long
@pytest.mark.timeout(3600)
async def test_owner_killed_under_load_partner_takes_over_nothing_lost_long(
    make_daemon: Callable[..., Daemon], postgres_cluster: PostgresCluster
) -> None:
    await run_kill_rounds(make_daemon, postgres_cluster, 20)


# --- the old owner rejoins as partner ----------------------------------------------------------------
async def write_export(port: int, export: str, tag: int, count: int, first_seq: int) -> dict[int, int]:
    """``count`` acknowledged 4 KiB writes to ``export`` on SERVICE_HOST:port; block -> sequence."""
    acked: dict[int, int] = {}
    async with await NBDClient.connect(SERVICE_HOST, port, export, timeout=30) as client:
        for seq in range(first_seq, first_seq + count):
            block = (seq * 7919) % BLOCKS
            await client.write(block * BLOCK, block_data(tag, block, seq))
            acked[block] = seq
    return acked


async def lost_in_export(port: int, export: str, tag: int, acked: dict[int, int]) -> list[int]:
    async with await NBDClient.connect(SERVICE_HOST, port, export, timeout=30) as client:
        data = await client.read_all(0, BLOCKS * BLOCK)
    return [
        b for b, seq in acked.items() if bytes(data[b * BLOCK : (b + 1) * BLOCK]) != block_data(tag, b, seq)
    ]


async def test_old_owner_rejoins_as_partner_and_takes_over_when_the_new_owner_dies(
    make_daemon: Callable[..., Daemon], two_databases: tuple[str, str], tmp_path: Path
) -> None:
    """Both nodes own a write-back volume and may take the other over.  kill -9 n1: n2 takes it
    over.  n1 started again finds its lease held by n2's takeover: it rejoins as n2's partner
    (partner only: it owns nothing while n2 serves its volume) and n2's own write-back volume is
    mirrored to it again (n2 in sync, its writes acknowledged from the cache).  kill -9 n2: n1
    takes n2 over (replaying the copies it held since it rejoined), opens its own engine once its
    lease is free again, and every acknowledged byte of both volumes reads back."""
    n1, n2, s1, s2 = start_pair_taking_each_other_over(make_daemon, two_databases, tmp_path, "rj")
    acked1 = await write_export(s1, "wb", 1, 300, 1)
    acked2 = await write_export(s2, "wb2", 2, 300, 1)

    n1.kill()
    await asyncio.to_thread(wait_until, lambda: n2.events("takeover-done"), "n2 took n1 over", 60)
    acked1 |= await write_export(s1, "wb", 1, 200, 1000)  # n1's volume, served by n2 now

    # n1 again: its lease is held by n2's takeover.  It rejoins as n2's partner.
    n1.spawn()
    await asyncio.to_thread(wait_until, lambda: n1.events("rejoin-partner"), "n1 rejoined as partner", 60)
    assert n1.running and not n1.events("ready"), n1.log_tail()

    def n2_in_sync() -> bool:
        (pair,) = n2.api_ok("GET", "/nodes")
        return bool(pair["mirror"] == "in-sync")

    await asyncio.to_thread(wait_until, n2_in_sync, "n2 mirrored to the rejoined n1", 60)
    # Partner only, its API answers status, nodes and health (and 503 for the rest).
    await asyncio.to_thread(wait_until, lambda: n1.events("api-partner-only"), "n1's partner-only API", 30)
    (api_line,) = [json.loads(line) for line in n1.events("api-partner-only")]
    n1.api_url = str(api_line["api"]).removesuffix("/api/v1")
    status = n1.api_ok("GET", "/status")
    assert status["role"] == "partner-only" and status["served_by"].startswith("takeover by n2"), status
    assert status["pair"]["holding_for"] == "n2" and status["pair"]["mirror"] == "partner-only", status
    (row,) = n1.api_ok("GET", "/nodes")
    assert row["node"] == "n1" and row["volumes"] == 0 and row["lease_epoch"] >= 2, row
    assert n1.api_ok("GET", "/health") == {"node": "n1", "state": "partner-only", "mirror": "partner-only"}
    refused = n1.cli("vv", "list")
    assert refused.code != 0 and "rejoined as partner only" in refused.err, refused
    shown = n1.cli("status")
    assert shown.code == 0 and "partner only" in shown.out, shown
    # Stopped while partner only (no engine): a clean stop; started again, it rejoins again.
    assert n1.stop() == 0, n1.log_tail()
    await asyncio.to_thread(wait_until, lambda: not n2_in_sync(), "n2 degraded without n1", 60)
    n1.spawn()
    await asyncio.to_thread(wait_until, lambda: n1.events("rejoin-partner"), "n1 rejoined again", 60)
    await asyncio.to_thread(wait_until, n2_in_sync, "n2 mirrored to n1 again", 60)
    (pair,) = n2.api_ok("GET", "/nodes")
    assert pair["partner_node"] == "n1" and pair["taken_over"], pair
    acked2 |= await write_export(s2, "wb2", 2, 300, 1000)
    # Acknowledged from n2's cache (destage delay 60 s): write-back again, so on two copies.
    assert n2.api_ok("GET", "/volumes/wb2")["dirty_bytes"] > 0
    acked1 |= await write_export(s1, "wb", 1, 100, 2000)  # n1's volume on n2, mirrored to n1

    n2.kill()
    await asyncio.to_thread(wait_until, lambda: n1.events("takeover-done"), "n1 took n2 over", 60)
    (done,) = [json.loads(line) for line in n1.events("takeover-done")]
    assert done["replayed"] > 0, done  # n2's writes since n1 rejoined, from n1's copies
    await asyncio.to_thread(n1.wait_ready, 120)  # its own lease free again: its engine opened
    assert n1.events("rejoin-owner"), n1.log_tail()

    lost1 = await lost_in_export(s1, "wb", 1, acked1)
    lost2 = await lost_in_export(s2, "wb2", 2, acked2)
    assert (lost1, lost2) == ([], []), f"lost: n1's volume {len(lost1)} blocks, n2's {len(lost2)} blocks"
    assert n1.stop() == 0


# --- the volumes a takeover serves, mirrored to the rejoined old owner ----------------------------
def labelled_metric(daemon: Daemon, name: str, node: str) -> float:
    """``name{node="NODE"}`` in the daemon's /metrics."""
    with urllib.request.urlopen(f"{daemon.api_url}/metrics", timeout=30) as response:
        text = response.read().decode()
    prefix = f'{name}{{node="{node}"}} '
    values = [float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix)]
    assert len(values) == 1, f"{name} of {node}: {values}"
    return values[0]


async def one_rejoin_round(
    make_daemon: Callable[..., Daemon], urls: tuple[str, str], workdir: Path, tag: str, rng: random.Random
) -> dict[str, float]:
    """kill -9 n1: n2 takes it over.  n1 started again rejoins as partner, and n2 mirrors to it
    both its own volume and n1's, which it serves: n1's is written back again once n1 is in sync
    (node list, metrics, the alert cleared).  kill -9 n2 at a random moment of a write-back load
    on n1's volume (a FLUSH every FLUSH_EVERY writes, answered on the two copies): n1 takes n2
    over, opens its own engine once its lease is free, replays the copies of its volume n2 sent
    it, and every acknowledged write of both volumes reads back."""
    n1, n2, s1, s2 = start_pair_taking_each_other_over(
        make_daemon, urls, workdir, tag, n2_destage_delay=KILL_DESTAGE_DELAY
    )
    acked2 = await write_export(s2, "wb2", 2, 200, 1)

    n1.kill()
    await asyncio.to_thread(wait_until, lambda: n2.events("takeover-done"), "n2 took n1 over", 60)
    (pair,) = n2.api_ok("GET", "/nodes")
    # n1 is gone: its volumes, served by n2, are written through, and n2 says so.
    assert pair["taken_over_mirror"] in ("degraded", "syncing"), pair
    await asyncio.to_thread(
        wait_until,
        lambda: any(a["object"] == "node:n1" for a in mirror_alerts(n2)),
        "n2's alert: n1's volumes are not mirrored",
        30,
    )

    n1.spawn()
    await asyncio.to_thread(wait_until, lambda: n1.events("rejoin-partner"), "n1 rejoined as partner", 60)

    def both_in_sync() -> bool:
        (pair,) = n2.api_ok("GET", "/nodes")
        return bool(pair["mirror"] == "in-sync" and pair["taken_over_mirror"] == "in-sync")

    await asyncio.to_thread(wait_until, both_in_sync, "n2 mirrors its own and n1's volumes to n1", 60)
    assert labelled_metric(n2, "thinblock_mirror_in_sync", "n1") == 1.0
    assert labelled_metric(n2, "thinblock_mirror_degraded_volumes", "n1") == 0.0
    assert not any(a["object"] == "node:n1" for a in mirror_alerts(n2)), mirror_alerts(n2)

    writer = ReconnectingWriter(s1, "wb", flush_every=FLUSH_EVERY)
    task = asyncio.create_task(writer.run())
    stop_probe = asyncio.Event()
    try:
        await writer.writes_after(0, 2 * FLUSH_EVERY)
        # Written back on n2 again: n1 holds copies of its own volume (its partner-only API)
        (pair,) = n2.api_ok("GET", "/nodes")
        assert pair["taken_over_mirror"] == "in-sync", pair
        await asyncio.to_thread(
            wait_until, lambda: n1.events("api-partner-only"), "n1's partner-only API", 30
        )
        (api_line,) = [json.loads(line) for line in n1.events("api-partner-only")]
        n1.api_url = str(api_line["api"]).removesuffix("/api/v1")
        (row,) = n1.api_ok("GET", "/nodes")
        assert row["own_held_writes"] > 0, row
        acked2 |= await write_export(s2, "wb2", 2, 100, 1000)
        await writer.writes_after(writer.seq, rng.randint(0, 1500))
        await asyncio.sleep(rng.uniform(0.0, 0.3))
        flushes_before = writer.flushes
        n2.kill()
        killed_at = time.monotonic()
        first_read_s = await asyncio.wait_for(first_read_after(s1, killed_at, stop_probe), 120)
        await writer.writes_after(writer.seq, 100)  # the writer goes on with n1
    finally:
        stop_probe.set()
        writer.stop.set()
        await task
    await asyncio.to_thread(wait_until, lambda: n1.events("takeover-done"), "n1 took n2 over", 60)
    await asyncio.to_thread(n1.wait_ready, 120)
    (replayed,) = [json.loads(line) for line in n1.events("rejoin-replayed")]
    assert flushes_before > 0, "no FLUSH was acknowledged before the kill"
    lost1 = await read_back(s1, writer)
    lost2 = await lost_in_export(s2, "wb2", 2, acked2)
    assert (lost1, lost2) == ([], []), f"lost: n1's volume {len(lost1)} blocks, n2's {len(lost2)} blocks"
    assert n1.stop() == 0, n1.log_tail()
    return {
        "acks": float(writer.acks),
        "checked": float(len(writer.acked) + len(acked2)),
        "replayed": float(replayed["replayed"]),
        "first_read_s": first_read_s,
    }


async def run_rejoin_rounds(
    make_daemon: Callable[..., Daemon], cluster: PostgresCluster, workdir: Path, rounds: int
) -> None:
    rng = random.Random(int(os.environ.get("THINBLOCK_DRILL_SEED", "12")))
    results = []
    for r in range(rounds):
        with ExitStack() as stack:
            urls = (
                stack.enter_context(fresh_database(cluster)),
                stack.enter_context(fresh_database(cluster)),
            )
            results.append(await one_rejoin_round(make_daemon, urls, workdir, f"rj{r}", rng))
        print(f"round {r}: {results[-1]}", flush=True)
    first = sorted(r["first_read_s"] for r in results)
    print(
        f"node-pair rejoin drill on PostgreSQL: {rounds} rounds, {sum(int(r['acks']) for r in results)}"
        f" writes acknowledged on the old owner's volume (served by the new owner and mirrored to the"
        f" rejoined old owner, then after the kill by the old owner), {sum(int(r['checked']) for r in results)} blocks checked, lost 0,"
        f" {sum(int(r['replayed']) for r in results)} copies replayed by the old owner; kill -9 of the"
        f" new owner to the first read served by the old owner: median {first[len(first) // 2]:.2f} s,"
        f" max {first[-1]:.2f} s (lease {LEASE_TTL} s)"
    )
    Figures(
        "node-pair-rejoin-kill9-postgresql",
        rounds=rounds,
        bytes_verified=sum(int(r["checked"]) for r in results) * BLOCK,
        faults=2 * rounds,
        notes={
            "acknowledged_writes": sum(int(r["acks"]) for r in results),
            "replayed_by_old_owner": sum(int(r["replayed"]) for r in results),
            "first_read_median_s": round(first[len(first) // 2], 2),
            "first_read_max_s": round(first[-1], 2),
        },
    ).report()


async def test_taken_over_volumes_mirrored_to_the_rejoined_owner_nothing_lost(
    make_daemon: Callable[..., Daemon], postgres_cluster: PostgresCluster, tmp_path: Path
) -> None:
    await run_rejoin_rounds(make_daemon, postgres_cluster, tmp_path, 1)


@pytest.mark.long
@pytest.mark.timeout(3600)
async def test_taken_over_volumes_mirrored_to_the_rejoined_owner_nothing_lost_long(
    make_daemon: Callable[..., Daemon], postgres_cluster: PostgresCluster, tmp_path: Path
) -> None:
    await run_rejoin_rounds(make_daemon, postgres_cluster, tmp_path, 10)


# --- failback: the new owner hands the old owner's volumes back -----------------------------------
async def test_failback_hands_the_taken_over_volumes_back_without_a_copy(
    make_daemon: Callable[..., Daemon], two_databases: tuple[str, str], tmp_path: Path
) -> None:
    """kill -9 n1: n2 takes it over.  ``node failback`` is refused while n1 is not back.  n1
    started again rejoins and is brought in sync with its own volume (served by n2).  qemu-io,
    connected to the service address with ``reconnect-delay``, writes two patterns to it on n2,
    then ``thinblock node failback`` on n2: n2 stops serving it, flushes, stops mirroring it and
    lets n1's lease go; n1 opens its engine and serves it; qemu-io reconnects, writes a third
    pattern and reads all three back.  Nothing was copied: n1's PDs and store are the ones n2's
    takeover wrote.  Afterwards each node mirrors its own volume to the other again."""
    qemu_io = shutil.which("qemu-io")
    if qemu_io is None:
        pytest.skip("qemu-io is not installed (make deps installs qemu-utils)")
    n1, n2, s1, s2 = start_pair_taking_each_other_over(make_daemon, two_databases, tmp_path, "fb")
    acked1 = await write_export(s1, "wb", 1, 200, 1)
    acked2 = await write_export(s2, "wb2", 2, 200, 1)

    n1.kill()
    await asyncio.to_thread(wait_until, lambda: n2.events("takeover-done"), "n2 took n1 over", 60)
    refused = n2.cli("node", "failback")
    assert refused.code != 0 and "not in sync" in refused.err, refused
    n1.spawn()
    await asyncio.to_thread(wait_until, lambda: n1.events("rejoin-partner"), "n1 rejoined as partner", 60)

    def taken_over_in_sync() -> bool:
        (pair,) = n2.api_ok("GET", "/nodes")
        return bool(pair["taken_over_mirror"] == "in-sync")

    await asyncio.to_thread(wait_until, taken_over_in_sync, "n1's volume on n2 mirrored to n1", 60)
    acked1 |= await write_export(s1, "wb", 1, 200, 1000)  # on n2, written back and mirrored to n1

    image = (
        f"driver=raw,file.driver=nbd,file.server.type=inet,file.server.host={SERVICE_HOST},"
        f"file.server.port={s1},file.export=wb,file.reconnect-delay=30"
    )
    base = 32 * MiB  # beyond the blocks the NBD writes above touch
    commands = [f"write -P 0x11 {base} 1M", f"write -P 0x22 {base + MiB} 1M", "sleep 6000"]
    commands += [f"write -P 0x33 {base + 2 * MiB} 1M"]
    commands += [
        f"read -P 0x11 {base} 1M",
        f"read -P 0x22 {base + MiB} 1M",
        f"read -P 0x33 {base + 2 * MiB} 1M",
    ]
    argv = [qemu_io, "-t", "writeback", "--image-opts", image, *[arg for c in commands for arg in ("-c", c)]]
    await asyncio.to_thread(wait_until, lambda: n1.events("api-partner-only"), "n1's partner-only API", 30)
    (api_line,) = [json.loads(line) for line in n1.events("api-partner-only")]
    n1.api_url = str(api_line["api"]).removesuffix("/api/v1")

    def own_held() -> int:
        (row,) = n1.api_ok("GET", "/nodes")
        return int(row["own_held_bytes"])

    held_before = own_held()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # qemu-io sleeps after its first two writes: once n2 mirrored both to n1 (n2's destage
        # delay is 60 s: held there until the failback's flush), hand the volume back.
        await asyncio.to_thread(
            wait_until, lambda: own_held() >= held_before + 2 * MiB, "qemu-io's writes mirrored to n1", 60
        )
        handed = n2.cli_json("node", "failback")
        assert handed == {"volumes": ["wb"]}, handed
        await asyncio.to_thread(n1.wait_ready, 120)
        out, _ = await asyncio.to_thread(proc.communicate, timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert "Pattern verification failed" not in out and out.count("read 1048576/1048576 bytes") == 3, out
    assert n1.events("rejoin-owner") and n2.events("failback-done"), n2.log_tail()
    assert not n1.events("rejoin-replayed"), "handed back in sync and flushed: nothing to replay"
    (pair,) = n2.api_ok("GET", "/nodes")
    assert not pair["taken_over"] and pair["taken_over_mirror"] is None, pair
    # Both nodes serve their own volume and mirror it to the other again.

    def both_mirrored() -> bool:
        rows = [d.api_ok("GET", "/nodes?local=true")[0] for d in (n1, n2)]
        return all(r["mirror"] == "in-sync" for r in rows)

    await asyncio.to_thread(wait_until, both_mirrored, "n1 and n2 mirrored to each other again", 60)
    assert not [a for a in mirror_alerts(n2) if a["object"] == "node:n1"], mirror_alerts(n2)
    lost1 = await lost_in_export(s1, "wb", 1, acked1)
    lost2 = await lost_in_export(s2, "wb2", 2, acked2)
    assert (lost1, lost2) == ([], []), f"lost: n1's volume {len(lost1)} blocks, n2's {len(lost2)} blocks"
    assert n1.stop() == 0, n1.log_tail()
    assert n2.stop() == 0, n2.log_tail()
