"""Thin provisioning in band over iSCSI, on the real engine: UNIT ATTENTION 38h/07h (THIN
PROVISIONING SOFT THRESHOLD REACHED) once per crossing of the VV's allocation warning, to
every initiator connected to it; DATA PROTECT 27h/07h (SPACE ALLOCATION FAILED WRITE PROTECT)
for a write that needs a region past the VV's limit, while reads and overwrites go on.
With raw initiators (exact sense data) and with qemu-io (what a host sees)."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.e2e.nbd_helpers import run
from thinblock.engine import Engine, EngineOptions
from thinblock.iscsi.server import ISCSIServer
from thinblock.units import Limit, MiB

from .client import RawInitiator

UA, DATA_PROTECT = 0x6, 0x7
SOFT_THRESHOLD, SPACE_ALLOCATION_FAILED = 0x3807, 0x2707
CHECK_CONDITION = 0x02
REGION = 1 * MiB
BLOCKS_PER_REGION = REGION // 512


@pytest.fixture
async def target(tmp_path: Path) -> AsyncIterator[tuple[ISCSIServer, Engine]]:
    engine = await Engine.open(tmp_path / "engine", EngineOptions(allow_tiny_chunklets=True))
    try:
        for i in range(2):
            await engine.add_pd(tmp_path / "engine" / f"pd{i}.img", size=64 * MiB, chunklet_size=MiB)
        await engine.create_pool("p", raid=1, region_size=REGION, growth_increment=8 * MiB)
        # warning at 2 regions, limit at 4 regions
        await engine.create_vv(
            "thin",
            pool="p",
            size=64 * MiB,
            alloc_warning=Limit(bytes=2 * MiB),
            alloc_limit=Limit(bytes=4 * MiB),
        )
        server = ISCSIServer(engine, node_name="tp")
        await server.start("127.0.0.1", 0)
        try:
            yield server, engine
        finally:
            await server.stop()
    finally:
        await engine.close()


async def test_soft_threshold_unit_attention_once_to_every_initiator_and_data_protect(
    target: tuple[ISCSIServer, Engine],
) -> None:
    server, engine = target
    name = server.target_name("thin")
    first = await RawInitiator.connect(server.port or 0, name, "iqn.2026-12.test:host1")
    second = await RawInitiator.connect(server.port or 0, name, "iqn.2026-12.test:host2")
    try:
        block = b"\x5a" * 4096  # one write command; the first write to a region assigns it whole
        assert (await first.write16(0, block)).status == 0  # 1 region: below the warning
        assert (await second.test_unit_ready()).status == 0
        assert (await first.write16(BLOCKS_PER_REGION, block)).status == 0  # 2 regions: crosses it
        for host in (first, second):
            seen = await host.test_unit_ready()
            assert (seen.status, seen.sense_key, seen.asc) == (CHECK_CONDITION, UA, SOFT_THRESHOLD)
            again = await host.test_unit_ready()
            assert again.status == 0  # once per crossing
        assert (await first.write16(2 * BLOCKS_PER_REGION, block)).status == 0  # 3 regions
        assert (await second.test_unit_ready()).status == 0  # still the same crossing: no new UA
        # The 4th region is the last one the limit allows; the 5th is refused as DATA PROTECT.
        assert (await first.write16(3 * BLOCKS_PER_REGION, block)).status == 0
        refused = await first.write16(10 * BLOCKS_PER_REGION, block)
        assert (refused.status, refused.sense_key, refused.asc) == (
            CHECK_CONDITION,
            DATA_PROTECT,
            SPACE_ALLOCATION_FAILED,
        )
        # Reads and overwrites of assigned regions go on.
        assert (await second.write16(0, b"\x77" * 4096)).status == 0
        read = await second.read16(0, 16)
        assert read.status == 0 and read.data[:4096] == b"\x77" * 4096 and read.data[4096:] == bytes(4096)
        assert engine.get_vv("thin").allocated == 4 * REGION

        # Unmapping brings the allocation back under the warning; crossing it again is a new
        # crossing, and each initiator hears of it once more.
        unmap = bytes([0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0]) + b""
        params = (22).to_bytes(2, "big") + (16).to_bytes(2, "big") + bytes(4)
        params += (0).to_bytes(8, "big") + (4 * BLOCKS_PER_REGION).to_bytes(4, "big") + bytes(4)
        assert (await first.command(unmap, data=params)).status == 0
        assert engine.get_vv("thin").allocated == 0
        for lba in (0, BLOCKS_PER_REGION):
            assert (await first.write16(lba, block)).status == 0
        for host in (first, second):
            seen = await host.test_unit_ready()
            assert (seen.sense_key, seen.asc) == (UA, SOFT_THRESHOLD)
    finally:
        await first.close()
        await second.close()


@pytest.mark.skipif(not shutil.which("qemu-io"), reason="needs qemu-utils with qemu-block-extra")
async def test_qemu_io_over_iscsi_until_the_warning_and_the_limit(target: tuple[ISCSIServer, Engine]) -> None:
    server, engine = target
    uri = f"iscsi://127.0.0.1:{server.port}/{server.target_name('thin')}/0"
    # qemu retries the UNIT ATTENTION by itself; the writes up to the limit succeed
    ok = await run("qemu-io", "-f", "raw", "-c", "write -P 0xa1 0 3M", "-c", "write -P 0xa2 3M 1M", uri)
    assert ok.code == 0 and "error" not in ok.out + ok.err, ok.out + ok.err
    # past the limit: qemu turns 27h/07h into ENOSPC ("No space left on device")
    full = await run("qemu-io", "-f", "raw", "-c", "write -P 0xa3 8M 1M", uri)
    assert "No space left on device" in full.out + full.err, full.out + full.err
    back = await run("qemu-io", "-f", "raw", "-c", "read -P 0xa1 0 3M", "-c", "write -P 0xa4 0 4k", uri)
    assert back.code == 0 and "fail" not in back.out, back.out
    assert engine.get_vv("thin").allocated == 4 * REGION


async def test_a_snapshot_is_write_protected_over_iscsi(target: tuple[ISCSIServer, Engine]) -> None:
    """A snapshot's LU says WP in MODE SENSE and answers writes DATA PROTECT / WRITE PROTECTED
    (27h/00h); it reads the volume's data as of the snapshot."""
    server, engine = target
    await engine.volume("thin").write(0, b"\x21" * 4096)
    await engine.snapshot_vv("thin", "snap")
    await engine.volume("thin").write(0, b"\x22" * 4096)
    host = await RawInitiator.connect(server.port or 0, server.target_name("snap"), "iqn.2026-12.test:backup")
    try:
        sense = await host.command(bytes([0x1A, 0, 0x3F, 0, 255, 0]), read=255)  # MODE SENSE(6), all pages
        assert sense.status == 0 and sense.data[2] & 0x80, "WP not set"
        refused = await host.write16(0, b"\x33" * 4096)
        assert (refused.status, refused.sense_key, refused.asc) == (CHECK_CONDITION, DATA_PROTECT, 0x2700)
        read = await host.read16(0, 8)
        assert read.status == 0 and read.data == b"\x21" * 4096
    finally:
        await host.close()


async def test_the_snapshot_space_limit_answers_data_protect_space_allocation_failed(
    target: tuple[ISCSIServer, Engine],
) -> None:
    """A write whose copy on write would pass the volume's snapshot space limit (policy fail) is
    answered as a write past the allocation limit: DATA PROTECT 27h/07h; the data is unchanged."""
    server, engine = target
    await engine.set_vv("thin", snapshot_limit=Limit(bytes=REGION))  # one region of snapshot space
    await engine.volume("thin").write(0, b"\x41" * (2 * REGION))
    await engine.snapshot_vv("thin", "snap")
    host = await RawInitiator.connect(server.port or 0, server.target_name("thin"), "iqn.2026-12.test:host1")
    try:
        assert (await host.write16(0, b"\x42" * 4096)).status == 0  # region 0 copied: at the limit
        refused = await host.write16(BLOCKS_PER_REGION, b"\x43" * 4096)  # region 1 would pass it
        assert (refused.status, refused.sense_key, refused.asc) == (
            CHECK_CONDITION,
            DATA_PROTECT,
            SPACE_ALLOCATION_FAILED,
        )
        read = await host.read16(BLOCKS_PER_REGION, 8)
        assert read.status == 0 and read.data == b"\x41" * 4096
    finally:
        await host.close()


async def test_a_renamed_volume_still_warns_its_connected_initiator(
    target: tuple[ISCSIServer, Engine],
) -> None:
    """A session logged in before `vv rename` keeps its volume; the soft threshold crossed after
    the rename still reaches it (the alert names the volume by its new name)."""
    server, engine = target
    host = await RawInitiator.connect(server.port or 0, server.target_name("thin"), "iqn.2026-12.test:host1")
    try:
        block = b"\x5a" * 4096
        assert (await host.write16(0, block)).status == 0  # 1 region: below the warning
        await engine.rename_vv("thin", "renamed")
        assert (await host.write16(BLOCKS_PER_REGION, block)).status == 0  # 2 regions: crosses it
        seen = await host.test_unit_ready()
        assert (seen.status, seen.sense_key, seen.asc) == (CHECK_CONDITION, UA, SOFT_THRESHOLD)
        assert (await host.test_unit_ready()).status == 0  # once per crossing
    finally:
        await host.close()
