"""Zero-copy Data-In (iscsi/server.py, the socket queue of thinblock.sendqueue that NBD uses too):
READs of SENDFILE_MIN bytes or more that lie in PD files as they are (VirtualVolume.read_spans)
go out as Data-In headers and sendfile(2) of the spans; everything else (write-back data over
the region, a read across regions, small reads, DataDigest) takes the copy path.  Every test
reads the bytes back and checks which path ran (``ISCSIServer.sendfile_bytes``)."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.iscsi.client import RawInitiator
from thinblock.engine import Engine, EngineOptions
from thinblock.iscsi.server import ISCSIServer
from thinblock.model import CacheMode
from thinblock.sendqueue import SENDFILE_MIN

MiB = 1 << 20
REGION = 1 * MiB
VOLUME = 16 * MiB
BLOCK = 512


def digest(data: bytes | bytearray) -> str:
    """Compared instead of the bytes: a failing comparison of megabytes is unreadable."""
    return hashlib.sha256(data).hexdigest()


def pattern(n: int, seed: int) -> bytes:
    block = bytes((i * 31 + seed) & 0xFF for i in range(4096))
    return (block * (n // 4096 + 1))[:n]


@pytest.fixture(params=[0, 1], ids=["raid0", "raid1"])
async def served(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[Engine, ISCSIServer]]:
    # destage_delay: write-back data stays in the cache for the test's duration.
    engine = await Engine.open(tmp_path / "engine", EngineOptions(pd_check_interval=0, destage_delay=3600.0))
    try:
        for index in range(2):
            await engine.add_pd(tmp_path / "engine" / f"pd{index}.img", size=64 * MiB, chunklet_size=8 * MiB)
        # RAID 0 with a 64 KiB step: a 1 MiB read is 16 spans alternating between the PDs.
        await engine.create_pool("p", raid=request.param, set_size=2, region_size=REGION, step=64 * 1024)
        await engine.create_vv("wt", pool="p", size=VOLUME, cache_mode=CacheMode.WRITETHROUGH)
        await engine.create_vv("wb", pool="p", size=VOLUME, cache_mode=CacheMode.WRITEBACK)
        server = ISCSIServer(engine, node_name="zc")
        await server.start("127.0.0.1", 0)
        try:
            yield engine, server
        finally:
            await server.stop()
    finally:
        await engine.close()


async def _login(server: ISCSIServer, vv: str, *, digests: bool = False) -> RawInitiator:
    return await RawInitiator.connect(
        server.port or 0, server.target_name(vv), "iqn.2026-12.test:zc", digests=digests
    )


async def test_reads_inside_a_clean_region_go_out_with_sendfile(served: tuple[Engine, ISCSIServer]) -> None:
    _engine, server = served
    host = await _login(server, "wt")
    try:
        data = pattern(4 * MiB, 1)
        assert (await host.write16(0, data)).status == 0
        before = server.sendfile_bytes
        reads = [
            (0, MiB),  # one region, 4 Data-In PDUs of 256 KiB
            (32 * 1024 + BLOCK, 512 * 1024),  # unaligned: PDUs end inside stripe units (split spans)
            (3 * MiB + MiB // 2, MiB // 2),  # the last half of a region
            (MiB - 4096, 64 * 1024),  # across two regions: the copy path
            (2 * MiB, SENDFILE_MIN - BLOCK),  # below SENDFILE_MIN: the copy path
        ]
        for offset, length in reads:
            got = await host.read16(offset // BLOCK, length // BLOCK)
            assert got.status == 0
            assert digest(got.data) == digest(data[offset : offset + length]), (offset, length)
        assert server.sendfile_bytes - before == MiB + 512 * 1024 + MiB // 2
        # Never written: the zero LD, the copy path (holes read zeros).
        unwritten = await host.read16(8 * MiB // BLOCK, MiB // BLOCK)
        assert unwritten.status == 0 and unwritten.data == bytes(MiB)
        assert server.sendfile_bytes - before == MiB + 512 * 1024 + MiB // 2
    finally:
        await host.close()


async def test_write_back_data_over_the_region_takes_the_copy_path(
    served: tuple[Engine, ISCSIServer],
) -> None:
    _engine, server = served
    host = await _login(server, "wb")
    try:
        # 4 KiB writes stay in the write-back cache (only large writes go around it).
        small = pattern(4096, 2)
        assert (await host.write16(0, small)).status == 0
        before = server.sendfile_bytes
        got = await host.read16(0, MiB // BLOCK)
        assert got.status == 0 and got.data[:4096] == small and got.data[4096:] == bytes(MiB - 4096)
        assert server.sendfile_bytes == before
    finally:
        await host.close()


async def test_data_digest_needs_the_bytes_so_no_sendfile(served: tuple[Engine, ISCSIServer]) -> None:
    _engine, server = served
    host = await _login(server, "wt", digests=True)
    try:
        assert host.header_digest and host.data_digest
        data = pattern(MiB, 3)
        assert (await host.write16(0, data)).status == 0
        before = server.sendfile_bytes
        got = await host.read16(0, MiB // BLOCK)  # the client checks every digest
        assert got.status == 0 and digest(got.data) == digest(data)
        assert server.sendfile_bytes == before
    finally:
        await host.close()


async def test_many_reads_in_flight_stay_in_order(served: tuple[Engine, ISCSIServer]) -> None:
    """Sixteen 1 MiB reads and small commands sent at once: the zero-copy answers and the
    buffered ones share the socket through the queue without overtaking each other."""
    _engine, server = served
    host = await _login(server, "wt")
    try:
        data = pattern(4 * MiB, 4)
        assert (await host.write16(0, data)).status == 0
        before = server.sendfile_bytes
        expected: dict[int, bytes] = {}
        session = host.session
        for i in range(16):
            offset = (i % 4) * MiB
            length = MiB if i % 2 == 0 else 4096
            itt = session.next_itt()
            cdb = (
                bytes([0x88, 0])
                + (offset // BLOCK).to_bytes(8, "big")
                + (length // BLOCK).to_bytes(4, "big")
                + bytes(2)
            )
            host.send_command(cdb, cmdsn=session.next_cmdsn(), itt=itt, read=length)
            expected[itt] = data[offset : offset + length]
        while expected:
            itt, outcome = await host.outcome()
            assert outcome.status == 0
            assert digest(outcome.data) == digest(expected.pop(itt)), itt
        assert server.sendfile_bytes - before == 8 * MiB
    finally:
        await host.close()
