"""The NBD server against real clients no one here wrote: qemu-img, qemu-io, nbdinfo,
nbdcopy and fio (Debian's qemu-utils, libnbd-bin, fio)."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest

from thinblock.blockdev import VolumeProvider
from thinblock.nbd.server import NBDServer

from .memvolume import KiB, MiB
from .nbd_helpers import nbd_provider, nbd_server, read_volume, run, unix_uri, uri

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("qemu-img", "qemu-io", "nbdinfo", "nbdcopy", "fio")),
        reason="needs qemu-utils, libnbd-bin and fio",
    ),
]
__all__ = ["nbd_provider", "nbd_server"]


def qemu_io(target: str, *commands: str) -> list[str]:
    argv = ["qemu-io", "-f", "raw"]
    for command in commands:
        argv += ["-c", command]
    return [*argv, target]


def assert_all_ok(result_out: str) -> None:
    for bad in ("Pattern verification failed", "failed", "error"):
        assert bad not in result_out, result_out


async def test_qemu_img_info_over_tcp_unix_and_default_export(nbd_server: NBDServer) -> None:
    for target, size in (
        (uri(nbd_server, "vol0"), 64 * MiB),
        (uri(nbd_server, "vol1"), 16 * MiB),
        (uri(nbd_server), 64 * MiB),  # empty export name: the default export
        (unix_uri(nbd_server, "vol1"), 16 * MiB),
    ):
        info = json.loads((await run("qemu-img", "info", "--output=json", target)).check().out)
        assert info["virtual-size"] == size, (target, info)


async def test_unknown_export_is_refused(nbd_server: NBDServer) -> None:
    result = await run("qemu-img", "info", uri(nbd_server, "nosuch"))
    assert result.code != 0
    assert "nosuch" in result.err or "export" in result.err.lower()


async def test_qemu_io_patterns_across_boundaries_and_at_the_end(nbd_server: NBDServer) -> None:
    end = 64 * MiB
    result = await run(
        *qemu_io(
            uri(nbd_server, "vol0"),
            "write -P 0xab 0 64k",
            "write -P 0xcd 1023k 2k",  # across a 1 MiB region boundary
            "write -P 0xef 65535 3",  # across a 64 KiB block boundary, unaligned
            f"write -P 0x11 {end - 4096} 4k",  # the last bytes of the volume
            f"write -P 0x12 {end - 1} 1",
            "write -P 0x77 8M 4M",
            "read -P 0xab 0 65535",
            "read -P 0xef 65535 3",
            "read -P 0xcd 1023k 2k",
            f"read -P 0x11 {end - 4096} 4095",
            f"read -P 0x12 {end - 1} 1",
            "read -P 0x77 8M 4M",
            "write -z 9M 1M",  # zero inside data
            "read -P 0 9M 1M",
            "read -P 0x77 8M 1M",
            "read -P 0x77 10M 2M",
            "write -z -u 10M 1M",  # zero, holes allowed
            "read -P 0 10M 1M",
            "discard 0 64k",
            "read -P 0 0 64k",
            "discard 11M 512k",
            "read -P 0 11M 512k",
            "read -P 0x77 11776k 512k",
            "read -P 0 20M 1M",  # never written
            "flush",
            "aio_write -P 0x21 30M 64k",
            "aio_write -P 0x22 31M 64k",
            "aio_flush",
            "read -P 0x21 30M 64k",
            "read -P 0x22 31M 64k",
        )
    )
    result.check()
    assert_all_ok(result.out)


async def test_qemu_io_write_zeroes_across_the_whole_volume(nbd_server: NBDServer) -> None:
    # Longer than the maximum block size: the server splits it for the volume.
    result = await run(
        *qemu_io(
            uri(nbd_server, "vol0"),
            "write -P 0x55 40M 1M",
            "write -z -u 0 64M",
            "read -P 0 0 64M",
            "write -P 0x56 63M 1M",
            "discard 0 64M",
            "read -P 0 0 64M",
        )
    )
    result.check()
    assert_all_ok(result.out)


async def test_qemu_img_convert_into_a_volume_and_back(nbd_server: NBDServer, tmp_path: Path) -> None:
    source = tmp_path / "source.qcow2"
    (await run("qemu-img", "create", "-q", "-f", "qcow2", str(source), "16M")).check()
    # A sparse guest disk: data at the start, across a boundary, in the middle and at the end.
    (
        await run(
            "qemu-io",
            "-f",
            "qcow2",
            "-c",
            "write -P 0x01 0 1M",
            "-c",
            "write -P 0x02 2047k 2k",
            "-c",
            "write -P 0x03 7M 300k",
            "-c",
            "write -P 0x04 16380k 4k",
            str(source),
        )
    ).check()
    target = uri(nbd_server, "vol1")
    (await run("qemu-img", "convert", "-n", "-f", "qcow2", "-O", "raw", str(source), target)).check()
    (await run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(source), target)).check()
    back = tmp_path / "back.raw"
    (await run("qemu-img", "convert", "-f", "raw", "-O", "raw", target, str(back))).check()
    (await run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(source), str(back))).check()
    # Holes stayed holes: the map shows data only where the guest wrote.
    extents = json.loads((await run("nbdinfo", "--map", "--json", target)).check().out)
    data = [(e["offset"], e["length"]) for e in extents if not e["type"] & 1]
    assert data, extents
    assert sum(length for _o, length in data) <= 4 * MiB, data


async def test_nbdinfo_list_shows_every_volume(nbd_server: NBDServer, nbd_provider: VolumeProvider) -> None:
    listing = json.loads((await run("nbdinfo", "--list", "--json", uri(nbd_server))).check().out)
    exports = {e["export-name"]: e for e in listing["exports"]}
    assert set(exports) == set(nbd_provider.export_names())
    for name, export in exports.items():
        volume = nbd_provider.open_volume(name)
        assert export["export-size"] == volume.size
        assert export.get("description", "") == volume.description
        assert export["can_multi_conn"] and export["can_flush"] and export["can_fua"]
        assert export["can_trim"] and export["can_zero"] and export["can_fast_zero"] and export["can_cache"]
        assert export["block_size_maximum"] == 32 * MiB
        assert "base:allocation" in export["contexts"]


async def _map(target: str) -> list[tuple[int, int, int]]:
    extents = json.loads((await run("nbdinfo", "--map", "--json", target)).check().out)
    return [(e["offset"], e["length"], e["type"]) for e in extents]


def _type_at(extents: list[tuple[int, int, int]], offset: int) -> int:
    for start, length, type_ in extents:
        if start <= offset < start + length:
            return type_
    raise AssertionError(f"{offset} not mapped: {extents}")


@pytest.mark.parametrize("export", ["vol0", "vol1"])
async def test_nbdinfo_map_shows_holes_data_and_holes_again_after_discard(
    nbd_server: NBDServer, export: str
) -> None:
    target = uri(nbd_server, export)
    fresh = await _map(target)
    assert fresh == [(0, fresh[0][1], 3)] and sum(length for _o, length, _t in fresh) == fresh[0][1]
    (await run(*qemu_io(target, "write -P 1 1M 64k", "write -P 2 5M 100", "write -P 3 9M 2M"))).check()
    written = await _map(target)
    assert sum(length for _o, length, _t in written) == fresh[0][1]  # covers the volume exactly
    for offset in (1 * MiB, 5 * MiB, 9 * MiB, 11 * MiB - 1):
        assert _type_at(written, offset) == 0, (offset, written)
    for offset in (0, 2 * MiB, 6 * MiB, 12 * MiB, fresh[0][1] - 1):
        assert _type_at(written, offset) == 3, (offset, written)
    (await run(*qemu_io(target, "discard 1M 64k", "discard 9M 2M"))).check()
    after = await _map(target)
    assert _type_at(after, 1 * MiB) == 3 and _type_at(after, 10 * MiB) == 3
    assert _type_at(after, 5 * MiB) == 0


async def test_nbdcopy_in_and_out(
    nbd_server: NBDServer, nbd_provider: VolumeProvider, tmp_path: Path
) -> None:
    rng = random.Random(42)
    image = bytearray(16 * MiB)
    for _ in range(40):  # scattered data, long zero runs in between
        at = rng.randrange(0, 16 * MiB - 256 * KiB)
        image[at : at + rng.randrange(1, 256 * KiB)] = rng.randbytes(256 * KiB)[: rng.randrange(1, 256 * KiB)]
    image = image[: 16 * MiB]
    source = tmp_path / "in.img"
    source.write_bytes(bytes(image))
    (await run("nbdcopy", str(source), uri(nbd_server, "vol1"))).check()
    assert await read_volume(nbd_provider.open_volume("vol1")) == bytes(image)
    out = tmp_path / "out.img"
    (await run("nbdcopy", uri(nbd_server, "vol1"), str(out))).check()
    assert out.read_bytes() == bytes(image)
    # and through the Unix socket, volume to volume
    (await run("nbdcopy", unix_uri(nbd_server, "vol1"), uri(nbd_server, "vol0"))).check()
    assert await read_volume(nbd_provider.open_volume("vol0"), 0, 16 * MiB) == bytes(image)


async def test_fio_verified_over_several_connections(
    nbd_server: NBDServer, nbd_provider: VolumeProvider, tmp_path: Path
) -> None:
    common = [
        "fio",
        "--name=verify",
        "--ioengine=nbd",
        f"--uri={uri(nbd_server, 'vol0')}",
        "--thread",
        "--numjobs=4",  # four connections to the same volume
        "--iodepth=16",
        "--size=2M",
        "--offset_increment=2M",
        "--bsrange=4k-64k",
        "--rw=randwrite",
        "--verify=crc32c",
        "--verify_state_save=0",
        "--randseed=1234",
        "--group_reporting",
        "--output-format=json",
    ]
    result = (await run(*common, "--do_verify=1", cwd=tmp_path)).check()
    report = json.loads(result.out[result.out.index("{") :])
    job = report["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] >= 8 * MiB and job["read"]["io_bytes"] >= 8 * MiB
    # The same data read again by a fresh fio run that only verifies...
    (await run(*common, "--verify_only", cwd=tmp_path)).check()
    # ... and read back through qemu-io/qemu-img: what the clients see is what the volume holds.
    out = tmp_path / "vol0.raw"
    (await run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri(nbd_server, "vol0"), str(out))).check()
    assert out.read_bytes()[: 8 * MiB] == await read_volume(nbd_provider.open_volume("vol0"), 0, 8 * MiB)
    assert os.path.getsize(out) == 64 * MiB


async def test_enospc_past_the_allocation_limit(nbd_server: NBDServer, nbd_provider: VolumeProvider) -> None:
    target = uri(nbd_server, "limited")
    # Up to the limit: fine.
    (await run(*qemu_io(target, "write -P 0x31 0 4M"))).check()
    # One region more: ENOSPC, and only for the new region.
    full = await run(*qemu_io(target, "write -P 0x32 8M 1M"))
    assert full.code != 0 and "No space left on device" in (full.out + full.err), full
    # What it holds keeps reading back, and allocated regions stay writable.
    again = await run(
        *qemu_io(target, "read -P 0x31 0 4M", "write -P 0x33 0 1M", "read -P 0x33 0 1M", "read -P 0 8M 1M")
    )
    again.check()
    assert_all_ok(again.out)
    # Zeroing that may leave holes needs no space; NO_HOLE (qemu-io's write -z without -u) does.
    (await run(*qemu_io(target, "write -z -u 12M 1M", "read -P 0 12M 1M"))).check()
    no_hole = await run(*qemu_io(target, "write -z 12M 1M"))
    assert no_hole.code != 0 and "No space left on device" in no_hole.out + no_hole.err
    # The server keeps serving everyone else.
    (await run(*qemu_io(uri(nbd_server, "vol1"), "write -P 9 0 1M", "read -P 9 0 1M"))).check()
    list_alerts = getattr(nbd_provider, "list_alerts", None)
    if list_alerts is not None:  # the engine: the refusal is recorded, once
        kinds = [a.kind.value for a in list_alerts(True) if a.object == "vv:limited"]
        assert kinds.count("vv-allocation-limit") == 1, kinds
