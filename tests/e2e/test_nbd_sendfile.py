"""Zero-copy reads (nbd/server.py, VirtualVolume.read_spans, LogicalDisk.file_spans): READs of
SENDFILE_MIN bytes or more that lie in PD files as they are go out with sendfile(2); everything
else (write-back data over the region, TLS, small reads) takes the copy path.  Every test reads
the same bytes both ways and checks which path ran (``NBDServer.sendfile_bytes``)."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import shutil
import struct
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.certs import make_pki
from tests.support.wire import request
from thinblock.engine import Engine, EngineOptions
from thinblock.model import CacheMode
from thinblock.nbd import server as server_module
from thinblock.nbd.protocol import TLSMode
from thinblock.nbd.server import SENDFILE_MIN, NBDServer
from thinblock.nbd.tls import TLSSettings, server_context

from .nbd_helpers import RawClient, run

MiB = 1 << 20
REGION = 1 * MiB
VOLUME = 16 * MiB
CMD_READ = 0


def digest(data: bytes | bytearray) -> str:
    """Compared instead of the bytes: a failing comparison of megabytes is unreadable."""
    return hashlib.sha256(data).hexdigest()


def pattern(n: int, seed: int) -> bytes:
    block = bytes((i * 31 + seed) & 0xFF for i in range(4096))
    return (block * (n // 4096 + 1))[:n]


async def make_engine(path: Path, raid: int, **options: object) -> Engine:
    engine = await Engine.open(path, EngineOptions(pd_check_interval=0, **options))  # type: ignore[arg-type]
    for index in range(2):
        await engine.add_pd(path / f"pd{index}.img", size=64 * MiB, chunklet_size=8 * MiB)
    # RAID 0 with a 64 KiB step: a 1 MiB read is 16 spans alternating between the PDs.
    await engine.create_pool("p", raid=raid, set_size=2, region_size=REGION, step=64 * 1024)
    return engine


@pytest.fixture(params=[0, 1], ids=["raid0", "raid1"])
async def served(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[Engine, NBDServer]]:
    # destage_delay: write-back data stays in the cache for the test's duration.
    engine = await make_engine(tmp_path / "engine", request.param, destage_delay=3600.0)
    await engine.create_vv("wt", pool="p", size=VOLUME, cache_mode=CacheMode.WRITETHROUGH)
    await engine.create_vv("wb", pool="p", size=VOLUME, cache_mode=CacheMode.WRITEBACK)
    sockdir = tempfile.mkdtemp(prefix="tbsf")
    server = NBDServer(engine, default_export="wt")
    await server.start("127.0.0.1", 0, unix_path=f"{sockdir}/nbd.sock")
    try:
        yield engine, server
    finally:
        await server.stop()
        await engine.close()
        shutil.rmtree(sockdir, ignore_errors=True)


async def read_reply(client: RawClient, structured: bool, length: int) -> tuple[int, bytes]:
    """One successful READ reply: (handle, data), simple or one OFFSET_DATA chunk (or holes)."""
    if not structured:
        error, handle = await client.simple_reply()
        assert error == 0
        return handle, await client.recv(length)
    data = bytearray()
    while True:
        _magic, flags, type_, handle, payload = await client.reply()
        if type_ == 1:  # OFFSET_DATA
            data += payload[8:]
        elif type_ == 2:  # OFFSET_HOLE
            data += bytes(struct.unpack(">QI", payload)[1])
        else:
            raise AssertionError(f"reply type {type_}")
        if flags & 1:  # DONE
            return handle, bytes(data)


async def read_many(
    server: NBDServer, export: str, reads: list[tuple[int, int]], *, structured: bool, unix: bool = False
) -> list[bytes]:
    """Send every read at once (replies come in any order), return their data in request order."""
    client = await RawClient.connect(server, unix=unix)
    try:
        await client.go(export, structured=structured, meta=False)
        client.send(b"".join(request(CMD_READ, i, off, n) for i, (off, n) in enumerate(reads)))
        got: dict[int, bytes] = {}
        for _ in reads:
            # Replies may come in any order, so each length is known only from its handle: read
            # the header first (simple replies) or whole chunks (structured).
            if structured:
                handle, data = await read_reply(client, True, 0)
            else:
                error, handle = await client.simple_reply()
                assert error == 0
                data = await client.recv(reads[handle][1])
            got[handle] = data
        return [got[i] for i in range(len(reads))]
    finally:
        await client.aclose()


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
async def test_sendfile_sends_the_bytes_the_copy_path_reads(
    served: tuple[Engine, NBDServer], structured: bool
) -> None:
    engine, server = served
    volume = engine.volume("wt")
    await volume.write(0, pattern(4 * MiB, 1))
    # Large reads inside a region (sendfile), mixed with small ones, reads across regions and
    # of unwritten space (copy path), all in flight together on one connection.
    reads = [(0, MiB), (100, 4096), (MiB, MiB), (MiB - 64 * 1024, 128 * 1024), (2 * MiB + 4096, 512 * 1024)]
    reads += [(3 * MiB, SENDFILE_MIN), (8 * MiB, MiB), (4096 * 7, 4096)] + [
        (k * 4096, 4096) for k in range(40)
    ]
    reads += [(0, MiB)] * 8
    before = server.sendfile_bytes
    got = await read_many(server, "wt", reads, structured=structured)
    for (offset, length), data in zip(reads, got, strict=True):
        assert digest(data) == digest(bytes(await volume.read(offset, length))), (offset, length)
    # Zero-copy: the reads inside one written region of at least SENDFILE_MIN (8 of 1 MiB at 0,
    # and 1 MiB, 512 KiB, 64 KiB); not the small ones, the one across regions, the hole.
    expected = 9 * MiB + MiB + 512 * 1024 + SENDFILE_MIN
    assert server.sendfile_bytes - before == expected


async def test_sendfile_over_the_unix_socket(served: tuple[Engine, NBDServer]) -> None:
    engine, server = served
    await engine.volume("wt").write(5 * MiB, pattern(MiB, 2))
    before = server.sendfile_bytes
    (data,) = await read_many(server, "wt", [(5 * MiB, MiB)], structured=True, unix=True)
    assert digest(data) == digest(pattern(MiB, 2))
    assert server.sendfile_bytes - before == MiB


async def test_write_back_data_over_the_region_takes_the_copy_path(served: tuple[Engine, NBDServer]) -> None:
    engine, server = served
    volume = engine.volume("wb")
    await volume.write(0, pattern(2 * MiB, 3))
    await volume.flush()
    await asyncio.wait_for(engine.cache.destage_all(), 30)  # the LDs hold it now; cache clean
    await volume.write(MiB + 8192, b"\xee" * 4096)  # dirty, in the cache only (destage_delay)
    before = server.sendfile_bytes
    first, second = await read_many(server, "wb", [(0, MiB), (MiB, MiB)], structured=True)
    assert digest(first) == digest(pattern(MiB, 3))
    expected = bytearray(pattern(2 * MiB, 3)[MiB:])
    expected[8192 : 8192 + 4096] = b"\xee" * 4096
    assert digest(second) == digest(expected)  # the cache's data laid over the LD's
    assert server.sendfile_bytes - before == MiB  # only the clean region went zero-copy


async def test_raid1_sends_from_the_surviving_mirror(tmp_path: Path) -> None:
    engine = await make_engine(tmp_path / "engine", 1)
    try:
        await engine.create_vv("v", pool="p", size=VOLUME)
        await engine.volume("v").write(0, pattern(MiB, 4))
        first = sorted(engine.pds.values(), key=lambda pd: pd.id)[0]
        first.fail("test: the first mirror is gone")
        server = NBDServer(engine, default_export="v")
        await server.start("127.0.0.1", 0)
        try:
            (data,) = await read_many(server, "v", [(0, MiB)], structured=True)
        finally:
            await server.stop()
        assert digest(data) == digest(pattern(MiB, 4))
        assert server.sendfile_bytes == MiB
    finally:
        await engine.close()


async def test_tls_connections_take_the_copy_path(tmp_path: Path) -> None:
    if shutil.which("nbdcopy") is None:
        pytest.skip("nbdcopy (libnbd-bin) is not installed")
    pki = make_pki(tmp_path / "pki")
    engine = await make_engine(tmp_path / "engine", 1)
    try:
        await engine.create_vv("v", pool="p", size=4 * MiB)
        data = pattern(4 * MiB, 5)
        await engine.volume("v").write(0, data)
        context = server_context(TLSSettings(TLSMode.REQUIRED, pki.server_cert, pki.server_key))
        server = NBDServer(engine, default_export="v", tls_mode=TLSMode.REQUIRED, tls_context=context)
        await server.start("127.0.0.1", 0)
        try:
            out = tmp_path / "copy.img"
            uri = f"nbds://127.0.0.1:{server.port}/v?tls-certificates={pki.dir}"
            (await run("nbdcopy", "--request-size=1048576", uri, str(out))).check()
            assert digest(out.read_bytes()) == digest(data)
            assert server.sendfile_bytes == 0  # every byte went through TLS
            # The same reads on a plain server of the same volume do go zero-copy (the check
            # above is not vacuous).
            plain = NBDServer(engine, default_export="v")
            await plain.start("127.0.0.1", 0)
            try:
                out.unlink()
                (
                    await run(
                        "nbdcopy", "--request-size=1048576", f"nbd://127.0.0.1:{plain.port}/v", str(out)
                    )
                ).check()
                assert digest(out.read_bytes()) == digest(data)
                assert plain.sendfile_bytes > 0
            finally:
                await plain.stop()
        finally:
            await server.stop()
    finally:
        await engine.close()


async def test_a_slow_reader_gets_every_reply_in_full(served: tuple[Engine, NBDServer]) -> None:
    """Replies larger than the socket buffer: sendfile stops part-way, the rest (and the replies
    after it) wait in the socket queue until the client reads again."""
    engine, server = served
    volume = engine.volume("wt")
    await volume.write(0, pattern(8 * MiB, 6))
    client = await RawClient.connect(server)
    try:
        await client.go("wt", structured=False, meta=False)
        reads = [(k * MiB, MiB) for k in range(8)] + [(4096, 4096)]
        client.send(b"".join(request(CMD_READ, i, off, n) for i, (off, n) in enumerate(reads)))
        await asyncio.sleep(0.3)  # the server fills the socket and queues the rest
        got: dict[int, bytes] = {}
        for _ in reads:
            error, handle = await client.simple_reply()
            assert error == 0
            got[handle] = await client.recv(reads[handle][1])
        for i, (offset, length) in enumerate(reads):
            assert digest(got[i]) == digest(pattern(8 * MiB, 6)[offset : offset + length])
    finally:
        await client.aclose()


async def test_a_sendfile_error_falls_back_to_reading_the_span(
    served: tuple[Engine, NBDServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, server = served
    await engine.volume("wt").write(0, pattern(MiB, 7))
    failures = 0

    def failing_sendfile(*args: object) -> int:
        nonlocal failures
        failures += 1
        raise OSError(errno.EIO, "test: sendfile failed")

    monkeypatch.setattr(server_module.os, "sendfile", failing_sendfile)
    (data,) = await read_many(server, "wt", [(0, MiB)], structured=True)
    assert failures >= 1
    assert digest(data) == digest(pattern(MiB, 7))  # read the PD's way and sent through the queue
    assert server.sendfile_bytes == 0


async def test_a_read_error_after_the_header_closes_the_connection(
    served: tuple[Engine, NBDServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, server = served
    await engine.volume("wt").write(0, pattern(MiB, 8))

    def failing_sendfile(*args: object) -> int:
        for pd in engine.pds.values():
            pd.inject_errors(True)  # the disks fail between the header and the data
        raise OSError(errno.EIO, "test: sendfile failed")

    monkeypatch.setattr(server_module.os, "sendfile", failing_sendfile)
    client = await RawClient.connect(server)
    try:
        await client.go("wt", structured=False, meta=False)
        client.send(request(CMD_READ, 1, 0, MiB))
        error, handle = await client.simple_reply()
        assert (error, handle) == (0, 1)  # the header promised data...
        assert await client.closed_by_server()  # ...that cannot come: the connection ends
    finally:
        await client.aclose()
        for pd in engine.pds.values():
            pd.inject_errors(False)
