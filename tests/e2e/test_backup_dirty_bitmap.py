"""Incremental backup with real clients through the ``qemu:dirty-bitmap:NAME`` metadata context.

On the export of snapshot S2, ``qemu:dirty-bitmap:S1`` names the regions where S2 differs from
snapshot S1 of its tree (volume/bitmaps.py).  The flow a backup tool runs: a full backup of S1
(qemu-img convert), writes to the volume (qemu-io), snapshot S2, the dirty ranges read with
nbdinfo --map and with qemu-img map (x-dirty-bitmap), only those ranges copied from the S2 export
onto a copy of the full backup (qemu-img convert of each range), and qemu-img compare of the
result against the S2 export.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import struct
from pathlib import Path

import pytest

from tests.support.wire import info_payload, meta_payload, option, request, u32
from thinblock.engine import Engine
from thinblock.nbd.access import AccessList, AccessRule
from thinblock.nbd.server import NBDServer

from .nbd_helpers import run
from .snapshot_fixtures import REGION, SIZE

pytestmark = pytest.mark.e2e

KiB = 1 << 10
MiB = 1 << 20


def _region_runs(regions: set[int]) -> list[tuple[int, int]]:
    """(offset, length) byte runs of a set of region numbers, merged."""
    runs: list[tuple[int, int]] = []
    for region in sorted(regions):
        if runs and runs[-1][0] + runs[-1][1] == region * REGION:
            runs[-1] = (runs[-1][0], runs[-1][1] + REGION)
        else:
            runs.append((region * REGION, REGION))
    return runs


def _nbd_opts(port: int, export: str, prefix: str = "") -> str:
    """qemu's options for an NBD export (``prefix``: "file." for the nbd layer under a raw one)."""
    opts = (
        "driver=nbd",
        "server.type=inet",
        "server.host=127.0.0.1",
        f"server.port={port}",
        f"export={export}",
    )
    return ",".join(prefix + opt for opt in opts)


async def test_an_incremental_backup_copies_only_what_the_dirty_bitmap_names(
    snapshots_served: tuple[Engine, NBDServer], tmp_path: Path
) -> None:
    engine, server = snapshots_served
    port = server.port
    base = f"nbd://127.0.0.1:{port}"
    # Half the volume written, then snapshot S1 and its full backup.
    (await run("qemu-io", "-f", "raw", "-c", f"write -P 0x11 0 {SIZE // 2}", f"{base}/v")).check()
    await engine.snapshot_vv("v", "s1")
    full = tmp_path / "full.raw"
    (await run("qemu-img", "convert", "-f", "raw", "-O", "raw", f"{base}/s1", str(full))).check()

    # Changes: a 4 KiB write, a write across three regions, a write into never-written space, a
    # trim of two whole regions (they read zeros now: dirty too).
    writes = [
        ("write -P 0x22 1M 4k", {16}),
        ("write -P 0x33 5220k 200k", {81, 82, 83, 84}),
        ("write -P 0x44 12M 64k", {192}),
        ("discard 2M 128k", {32, 33}),
    ]
    for command, _ in writes:
        (await run("qemu-io", "-f", "raw", "-c", command, f"{base}/v")).check()
    changed = set().union(*(regions for _, regions in writes))
    await engine.snapshot_vv("v", "s2")
    expected = _region_runs(changed)

    # The bitmaps the S2 export offers: every other snapshot of its tree.
    info = json.loads((await run("nbdinfo", "--json", f"{base}/s2")).check().out)
    assert sorted(info["exports"][0]["contexts"]) == ["base:allocation", "qemu:dirty-bitmap:s1"], info

    # nbdinfo --map: bit 0 is NBD_STATE_DIRTY.
    mapped = json.loads(
        (await run("nbdinfo", "--json", "--map=qemu:dirty-bitmap:s1", f"{base}/s2")).check().out
    )
    assert sum(e["length"] for e in mapped) == SIZE  # the extents cover the export
    dirty = [(e["offset"], e["length"]) for e in mapped if e["type"] & 1]
    assert dirty == expected, mapped
    assert all(e["description"] == ("dirty" if e["type"] & 1 else "clean") for e in mapped)

    # qemu's client reads the context in place of base:allocation (x-dirty-bitmap): a dirty extent
    # has bit 0 set, which it takes for NBD_STATE_HOLE, so dirty shows as "data": false.
    qmap = json.loads(
        (
            await run(
                "qemu-img",
                "map",
                "--output=json",
                "--image-opts",
                f"{_nbd_opts(port, 's2')},x-dirty-bitmap=qemu:dirty-bitmap:s1",
            )
        )
        .check()
        .out
    )
    qemu_dirty = [(e["start"], e["length"]) for e in qmap if not e["data"]]
    assert qemu_dirty == expected, qmap

    # The incremental: only the dirty ranges copied from the S2 export onto a copy of the full backup.
    incremental = tmp_path / "incremental.raw"
    shutil.copyfile(full, incremental)
    # Without it, the full backup of S1 is not S2 (the comparison can fail).
    stale = await run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(incremental), f"{base}/s2")
    assert stale.code == 1 and "Content mismatch" in stale.out, stale
    copied = 0
    for offset, length in dirty:
        source = f"driver=raw,offset={offset},size={length},{_nbd_opts(port, 's2', 'file.')}"
        target = f"driver=raw,offset={offset},size={length},file.driver=file,file.filename={incremental}"
        (
            await run("qemu-img", "convert", "-n", "--image-opts", source, "--target-image-opts", target)
        ).check()
        copied += length
    assert copied == len(changed) * REGION  # the changed regions and nothing else
    assert incremental.stat().st_size == SIZE
    (await run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(incremental), f"{base}/s2")).check()
    # And the volume itself, unchanged since S2, is what the backup holds.
    (await run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(incremental), f"{base}/v")).check()


async def test_a_client_is_offered_only_bitmaps_of_snapshots_it_may_open(
    snapshots_served: tuple[Engine, NBDServer],
) -> None:
    engine, server = snapshots_served
    base = f"nbd://127.0.0.1:{server.port}"
    (await run("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 1M", f"{base}/v")).check()
    await engine.snapshot_vv("v", "s1")
    await engine.snapshot_vv("v", "s2")
    # s1 only over the Unix socket: a TCP client learns nothing of it, not even which regions differ.
    server.access = AccessList([AccessRule("s1", "unix", "rw")])
    info = json.loads((await run("nbdinfo", "--json", f"{base}/v")).check().out)
    assert info["exports"][0]["contexts"] == ["base:allocation", "qemu:dirty-bitmap:s2"], info
    refused = await run("nbdinfo", "--map=qemu:dirty-bitmap:s1", f"{base}/s2")
    assert refused.code != 0 and "qemu:dirty-bitmap:s1" in refused.err, refused


async def _option_replies(reader: asyncio.StreamReader, option_code: int) -> list[tuple[int, bytes]]:
    """Option replies up to the final one (ACK or an error): (reply type, data)."""
    replies = []
    while True:
        magic, opt, reply, length = struct.unpack(">QIII", await reader.readexactly(20))
        assert magic == 0x3E889045565A9 and opt == option_code, (hex(magic), opt)
        replies.append((reply, await reader.readexactly(length)))
        if reply == 1 or reply & 0x80000000:
            return replies


async def test_base_allocation_and_a_bitmap_together_get_one_chunk_each(
    snapshots_served: tuple[Engine, NBDServer],
) -> None:
    """Raw NBD (no client asks for two contexts at once): SET_META_CONTEXT with both, then
    BLOCK_STATUS answers with one NBD_REPLY_TYPE_BLOCK_STATUS chunk per context."""
    engine, server = snapshots_served
    volume = engine.volume("v")
    await volume.write(0, b"\x11" * (2 * REGION))
    await engine.snapshot_vv("v", "s1")
    await volume.write(REGION, b"\x22" * 4096)  # region 1 differs from s1
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        await reader.readexactly(18)  # NBDMAGIC, IHAVEOPT, handshake flags
        writer.write(u32(3) + option(8))  # FIXED_NEWSTYLE | NO_ZEROES, STRUCTURED_REPLY
        assert (await _option_replies(reader, 8))[-1][0] == 1
        writer.write(option(10, meta_payload("v", ("qemu:dirty-bitmap:s1", "base:allocation"))))
        selected = await _option_replies(reader, 10)
        contexts = {
            data[4:].decode(): struct.unpack(">I", data[:4])[0] for kind, data in selected if kind == 4
        }
        assert set(contexts) == {"qemu:dirty-bitmap:s1", "base:allocation"}, selected
        writer.write(option(7, info_payload("v")))  # GO
        assert (await _option_replies(reader, 7))[-1][0] == 1
        writer.write(request(7, 99, 0, 4 * REGION))  # BLOCK_STATUS of regions 0-3
        chunks: dict[int, list[tuple[int, int]]] = {}
        done = False
        while not done:
            magic, flags, kind, handle, length = struct.unpack(">IHHQI", await reader.readexactly(20))
            payload = await reader.readexactly(length)
            assert magic == 0x668E33EF and kind == 5 and handle == 99, (hex(magic), kind, handle, payload)
            (context_id,) = struct.unpack(">I", payload[:4])
            words = struct.unpack(f">{(length - 4) // 4}I", payload[4:])
            chunks[context_id] = list(zip(words[::2], words[1::2], strict=True))
            done = bool(flags & 1)
        assert chunks == {
            contexts["base:allocation"]: [(2 * REGION, 0), (2 * REGION, 3)],  # data, then holes
            contexts["qemu:dirty-bitmap:s1"]: [(REGION, 0), (REGION, 1), (2 * REGION, 0)],
        }
        writer.write(request(2))  # DISC
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
