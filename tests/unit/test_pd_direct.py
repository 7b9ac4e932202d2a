"""PDs opened for direct I/O (engine.pd_direct_io): aligned I/O goes through the O_DIRECT
descriptor (through the aligned bounce buffer when the caller's memory is not page-aligned),
unaligned I/O through the page cache, and both see each other's data."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from thinblock.config import load_config
from thinblock.engine import Engine, EngineOptions
from thinblock.errors import MediumError
from thinblock.physical import pd as pd_module
from thinblock.physical.pd import DIRECT_ALIGN, DIRECT_PIECE, PhysicalDisk, buffer_address
from thinblock.units import KiB, MiB

CHUNK = 1 * MiB


@pytest.fixture
def pd(tmp_path: Path) -> Iterator[PhysicalDisk]:
    disk = PhysicalDisk.open(1, str(tmp_path / "pd.img"), size=8 * CHUNK, chunklet_size=CHUNK, create=True)
    if not disk.enable_direct_io():
        disk.close()
        pytest.skip("the file system under tmp_path refuses O_DIRECT")
    yield disk
    disk.close()


class DirectCalls:
    """Counts the syscalls made on the PD's O_DIRECT descriptor."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, pd: PhysicalDisk) -> None:
        self.reads = self.writes = 0
        direct_fd = pd._direct_fd
        real_pwrite, real_preadv = os.pwrite, os.preadv

        def pwrite(fd: int, data: Any, offset: int) -> int:
            self.writes += fd == direct_fd
            return real_pwrite(fd, data, offset)

        def preadv(fd: int, bufs: Any, offset: int) -> int:
            self.reads += fd == direct_fd
            return real_preadv(fd, bufs, offset)

        monkeypatch.setattr(pd_module.os, "pwrite", pwrite)
        monkeypatch.setattr(pd_module.os, "preadv", preadv)


def pattern(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


def unaligned_buffer(n: int) -> memoryview:
    """A writable buffer whose address is not page-aligned (as Python's allocator gives)."""
    raw = bytearray(n + DIRECT_ALIGN)
    view = memoryview(raw)
    start = 8 if buffer_address(view) % DIRECT_ALIGN == 0 else 0
    view = view[start : start + n]
    assert buffer_address(view) % DIRECT_ALIGN
    return view


def aligned_buffer(n: int) -> memoryview:
    return memoryview(mmap.mmap(-1, n))


def buffered_read(pd: PhysicalDisk, offset: int, n: int) -> bytes:
    with open(pd.path, "rb") as f:
        f.seek(offset)
        return f.read(n)


@pytest.mark.parametrize("make_buffer", [aligned_buffer, unaligned_buffer], ids=["aligned", "unaligned"])
def test_aligned_io_goes_direct_and_reads_back(
    pd: PhysicalDisk, monkeypatch: pytest.MonkeyPatch, make_buffer: Any
) -> None:
    calls = DirectCalls(monkeypatch, pd)
    n = 3 * DIRECT_PIECE + 8 * KiB  # more than one bounce piece
    data = pattern(n, 1)
    source = make_buffer(n)
    source[:] = data
    pd.pwrite(64 * KiB, source)
    assert calls.writes >= 1
    target = make_buffer(n)
    pd.pread_into(64 * KiB, target)
    assert calls.reads >= 1
    assert bytes(target) == data
    assert buffered_read(pd, 64 * KiB, n) == data  # what is on the file, as anyone reads it
    read_only = bytes(pattern(16 * KiB, 2))
    pd.pwrite(0, read_only)  # bytes: read-only memory goes through the bounce buffer
    assert buffered_read(pd, 0, 16 * KiB) == read_only


def test_vectored_io_of_aligned_pieces(pd: PhysicalDisk, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = DirectCalls(monkeypatch, pd)
    pieces = [pattern(4 * KiB, 3), pattern(64 * KiB, 4), pattern(8 * KiB, 5)]
    pd.pwritev(CHUNK, [memoryview(p) for p in pieces])
    assert calls.writes == 3
    out = [unaligned_buffer(len(p)) for p in pieces]
    pd.preadv(CHUNK, out)
    assert calls.reads == 3
    assert [bytes(o) for o in out] == pieces


def test_unaligned_io_stays_buffered_and_both_paths_agree(
    pd: PhysicalDisk, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = DirectCalls(monkeypatch, pd)
    base = 2 * CHUNK
    pd.pwrite(base, pattern(8 * KiB, 6))  # direct
    pd.pwrite(base + 512, b"\xab" * 512)  # 512 bytes: through the page cache
    assert calls.writes == 1
    # A direct read of the 4 KiB around it sees the cached write (written back first).
    got = unaligned_buffer(4 * KiB)
    pd.pread_into(base, got)
    assert calls.reads == 1
    expected = bytearray(pattern(8 * KiB, 6)[: 4 * KiB])
    expected[512:1024] = b"\xab" * 512
    assert bytes(got) == bytes(expected)
    # A direct write, then a buffered (unaligned) read of part of it: not a stale cached page.
    pd.pwrite(base, pattern(4 * KiB, 7))
    small = bytearray(100)
    pd.pread_into(base + 500, memoryview(small))
    assert calls.reads == 1  # that read was buffered
    assert bytes(small) == pattern(4 * KiB, 7)[500:600]


def test_a_short_direct_read_is_an_error_not_zeros(pd: PhysicalDisk) -> None:
    pd.pwrite(0, pattern(8 * KiB, 8))
    os.truncate(pd.path, 4 * KiB)  # cut short under the PD
    with pytest.raises(MediumError):
        pd.pread_into(0, unaligned_buffer(8 * KiB))
    assert pd.failed


async def test_engine_option_opens_every_pd_for_direct_io(tmp_path: Path) -> None:
    options = EngineOptions(pd_direct_io=True, pd_check_interval=0, allow_tiny_chunklets=True)
    engine = await Engine.open(tmp_path / "data", options)
    try:
        for index in range(2):
            await engine.add_pd(tmp_path / "data" / f"pd{index}.img", size=64 * MiB, chunklet_size=4 * MiB)
        assert all(pd.direct_io for pd in engine.pds.values())
        await engine.create_pool("p", raid=1, set_size=2)
        await engine.create_vv("v", pool="p", size=64 * MiB)
        volume = engine.volume("v")
        data = pattern(1 * MiB, 9)
        await volume.write(3 * MiB, data)
        assert bytes(await volume.read(3 * MiB, 1 * MiB)) == data
    finally:
        await engine.close()
    # Opened again (its PDs from the store): direct again, the data still there.
    engine = await Engine.open(tmp_path / "data", options)
    try:
        assert engine.pds and all(pd.direct_io for pd in engine.pds.values())
        assert bytes(await engine.volume("v").read(3 * MiB, 1 * MiB)) == data
    finally:
        await engine.close()


def test_config_key(tmp_path: Path) -> None:
    path = tmp_path / "thinblock.toml"
    assert load_config(None).pd_direct_io is False
    path.write_text("[engine]\npd_direct_io = true\n")
    assert load_config(path).pd_direct_io is True
