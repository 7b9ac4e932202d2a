"""The block-device contract: one suite, written once, that every block device passes.

Every implementation -- a PD range, each RAID level (healthy and degraded), the zero LD,
and later a virtual volume with or without its write cache -- is driven through the same
small *async* interface, ``AsyncDevice``.  Synchronous ``RawDevice``s are wrapped with
``as_async(raw)``; a ``thinblock.blockdev.Volume`` with ``from_volume(vol)``.

To run the suite against a device, subclass one of the contract classes in a test module
and provide a ``device`` fixture that returns (or yields) an ``AsyncDevice``::

    class TestMyVolume(WritableContract):
        @pytest.fixture
        async def device(self, engine):
            return from_volume(await engine.open_volume(...), boundaries=[region_size])

``boundaries`` lists offsets where the device's layout changes hands (region, row,
stripe ends); the suite aims writes across them.  The suite never touches more than a
few MiB, so a 64 TiB thin volume is fine.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from typing import ClassVar, Protocol

import pytest

from thinblock.blockdev import Buffer, RawDevice, Volume
from thinblock.errors import ReadOnlyDevice

_GUARD = 16  # bytes either side of a read_into buffer that must stay untouched
_GUARD_BYTE = 0xA5


class AsyncDevice(Protocol):
    """What the contract suite drives."""

    @property
    def size(self) -> int: ...

    @property
    def boundaries(self) -> Sequence[int]: ...

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview: ...

    async def write(self, offset: int, data: Buffer, fua: bool = False) -> None: ...

    async def zero(self, offset: int, length: int) -> None:
        """Make the range read as zeros (an adapter picks how: write-zeroes, NO_HOLE, trim)."""
        ...

    async def trim(self, offset: int, length: int) -> None:
        """Discard the range: afterwards it reads as zeros (thinblock's rule for TRIM)."""
        ...

    async def flush(self) -> None: ...


class RawAsyncDevice:
    """A synchronous RawDevice seen through the async interface.

    ``read`` exercises both ``read`` and ``read_into`` (into a slice of a larger buffer
    whose guard bytes must survive) and checks they agree."""

    def __init__(self, raw: RawDevice, boundaries: Sequence[int] = ()) -> None:
        self.raw = raw
        self.boundaries = list(boundaries)

    @property
    def size(self) -> int:
        return self.raw.size

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        plain = self.raw.read(offset, length)
        assert len(plain) == length, f"read({offset}, {length}) returned {len(plain)} bytes"
        guarded = bytearray([_GUARD_BYTE]) * (length + 2 * _GUARD)
        self.raw.read_into(offset, memoryview(guarded)[_GUARD : _GUARD + length])
        assert guarded[:_GUARD] == bytes([_GUARD_BYTE]) * _GUARD, "read_into wrote before its buffer"
        assert guarded[_GUARD + length :] == bytes([_GUARD_BYTE]) * _GUARD, "read_into wrote past its buffer"
        assert guarded[_GUARD : _GUARD + length] == plain, "read and read_into disagree"
        return plain

    async def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        self.raw.write(offset, data)
        if fua:
            self.raw.flush()

    async def zero(self, offset: int, length: int) -> None:
        self.raw.zero(offset, length)

    async def trim(self, offset: int, length: int) -> None:
        self.raw.zero(offset, length)  # a raw device's zero punches holes: that is its trim

    async def flush(self) -> None:
        self.raw.flush()


class VolumeAsyncDevice:
    """A ``thinblock.blockdev.Volume`` seen through the contract's interface."""

    def __init__(self, volume: Volume, boundaries: Sequence[int] = ()) -> None:
        self.volume = volume
        self.boundaries = list(boundaries)

    @property
    def size(self) -> int:
        return self.volume.size

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        """``read`` and ``read_extents`` (the NBD server's read) must agree: pieces covering the
        range in order, holes reading as zeros."""
        plain = await self.volume.read(offset, length)
        joined = bytearray()
        pos = offset
        for at, n, data in await self.volume.read_extents(offset, length):
            assert at == pos and n > 0, (
                f"read_extents({offset}, {length}): a piece at {at} of {n}, expected {pos}"
            )
            assert data is None or len(data) == n, f"read_extents: a piece of {n} bytes holds {len(data)}"
            joined += bytes(n) if data is None else data
            pos += n
        assert pos == offset + length, f"read_extents({offset}, {length}) covered up to {pos}"
        assert joined == plain, "read and read_extents disagree"
        return plain

    async def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        await self.volume.write(offset, data, fua=fua)

    async def zero(self, offset: int, length: int) -> None:
        await self.volume.write_zeroes(offset, length)

    async def trim(self, offset: int, length: int) -> None:
        await self.volume.trim(offset, length)

    async def flush(self) -> None:
        await self.volume.flush()


def as_async(raw: RawDevice, boundaries: Sequence[int] = ()) -> RawAsyncDevice:
    return RawAsyncDevice(raw, boundaries)


def from_volume(volume: Volume, boundaries: Sequence[int] = ()) -> VolumeAsyncDevice:
    return VolumeAsyncDevice(volume, boundaries)


# --- helpers ------------------------------------------------------------------------------
def pattern(length: int, seed: int) -> bytes:
    """Incompressible, position-dependent bytes: a misplaced piece never matches."""
    return random.Random(seed).randbytes(length)


def interesting_offsets(dev: AsyncDevice) -> list[int]:
    size = dev.size
    marks = {0, size // 2, size - 1, *dev.boundaries}
    return sorted(m for m in marks if 0 <= m < size)


def windows(dev: AsyncDevice, width: int = 192 * 1024) -> list[tuple[int, int]]:
    """Disjoint (start, end) windows around the start, the end and every boundary."""
    size = dev.size
    raw = [(0, min(width, size)), (max(0, size - width), size)]
    raw += [(max(0, b - width // 2), min(size, b + width // 2)) for b in dev.boundaries]
    raw.sort()
    merged: list[tuple[int, int]] = []
    for lo, hi in raw:
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


async def read_all(dev: AsyncDevice, offset: int, length: int) -> bytes:
    data = await dev.read(offset, length)
    assert len(data) == length, f"read({offset}, {length}) returned {len(data)} bytes"
    return bytes(data)


# --- the contract -------------------------------------------------------------------------
class ReadableContract:
    """What every device does.  Subclasses provide the ``device`` fixture."""

    fresh_reads_zero: ClassVar[bool] = True

    @pytest.fixture
    def device(self) -> AsyncDevice:
        raise NotImplementedError("a contract subclass provides the device fixture")

    async def test_size_is_positive(self, device: AsyncDevice) -> None:
        assert device.size > 0

    async def test_reads_return_exact_lengths(self, device: AsyncDevice) -> None:
        for length in (1, 511, 4096, 65537):
            length = min(length, device.size)
            for offset in (0, device.size - length, max(0, device.size // 3 - 7)):
                await read_all(device, offset, length)

    async def test_fresh_device_reads_zero(self, device: AsyncDevice) -> None:
        if not self.fresh_reads_zero:
            pytest.skip("this device does not start out zeroed")
        for lo, hi in windows(device):
            assert await read_all(device, lo, hi - lo) == bytes(hi - lo), f"[{lo}, {hi}) is not zeros"
        for off in interesting_offsets(device):
            assert await read_all(device, off, 1) == b"\0"


class WritableContract(ReadableContract):
    """A device that stores what is written to it."""

    async def test_write_read_aligned(self, device: AsyncDevice) -> None:
        size = device.size
        offsets = sorted({0, size - 4096, *(b // 4096 * 4096 for b in device.boundaries)})
        for i, off in enumerate(o for o in offsets if 0 <= o <= size - 4096):
            data = pattern(4096, i)
            await device.write(off, data)
            assert await read_all(device, off, 4096) == data, f"4 KiB at {off}"

    async def test_write_read_unaligned_across_boundaries(self, device: AsyncDevice) -> None:
        size = device.size
        cases = [(1, 1), (4095, 513), (size - 3, 3), (size - 1, 1)]
        cases += [(max(0, b - 100), 200) for b in device.boundaries]
        cases += [(max(0, b - 1), 2) for b in device.boundaries]
        for i, (off, length) in enumerate(cases):
            length = min(length, size - off)
            data = pattern(length, 100 + i)
            await device.write(off, data)
            assert await read_all(device, off, length) == data, f"{length} bytes at {off}"

    async def test_large_write_spanning_every_boundary(self, device: AsyncDevice) -> None:
        size = device.size
        marks = device.boundaries or [size // 2]
        lo = max(0, min(marks) - 3001)
        hi = min(size, max(marks) + 2999, lo + 1024 * 1024)
        data = pattern(hi - lo, 7)
        await device.write(lo, data)
        assert await read_all(device, lo, hi - lo) == data
        # Read it back again in odd-sized pieces that end on and straddle boundaries.
        rng = random.Random(8)
        pos = lo
        while pos < hi:
            n = min(hi - pos, rng.choice([1, 7, 512, 4095, 4096, 12289, 70000]))
            assert await read_all(device, pos, n) == data[pos - lo : pos - lo + n], f"piece at {pos}"
            pos += n

    async def test_overwrite_inside_earlier_write(self, device: AsyncDevice) -> None:
        lo = max(0, (device.boundaries or [device.size // 2])[0] - 10000)
        length = min(40000, device.size - lo)
        model = bytearray(pattern(length, 11))
        await device.write(lo, model)
        for i, (a, n) in enumerate([(5, 1), (4090, 20), (8191, 4097), (length - 300, 300)]):
            if a + n > length:
                continue
            piece = pattern(n, 12 + i)
            model[a : a + n] = piece
            await device.write(lo + a, piece)
        assert await read_all(device, lo, length) == model

    async def test_zero_unaligned_keeps_neighbours(self, device: AsyncDevice) -> None:
        lo = max(0, (device.boundaries or [device.size // 2])[0] - 5000)
        length = min(30000, device.size - lo)
        model = bytearray(pattern(length, 21))
        await device.write(lo, model)
        a, n = 1234, min(20000, length - 2000)
        await device.zero(lo + a, n)
        model[a : a + n] = bytes(n)
        assert await read_all(device, lo, length) == model

    async def test_zero_large_range(self, device: AsyncDevice) -> None:
        size = device.size
        length = min(size, 512 * 1024)
        lo = (size - length) // 2
        await device.write(lo, pattern(length, 31))
        await device.zero(lo, length)
        assert await read_all(device, lo, length) == bytes(length)
        await device.write(lo + 4096, b"after zero")
        assert await read_all(device, lo + 4090, 20) == bytes(6) + b"after zero" + bytes(4)

    async def test_trim_reads_zeros_and_keeps_neighbours(self, device: AsyncDevice) -> None:
        marks = device.boundaries or [device.size // 2]
        lo = max(0, marks[0] - 4096)
        length = min(max(marks[-1] - lo + 4096, 3 * 4096), device.size - lo, 2 * 1024 * 1024)
        model = bytearray(pattern(length, 24))
        await device.write(lo, model)
        for a, n in [(10, 100), (4096, 4096), (length // 2 - 5000, 10000)]:
            if a >= 0 and a + n <= length:
                await device.trim(lo + a, n)
                model[a : a + n] = bytes(n)
        assert await read_all(device, lo, length) == model
        await device.write(lo + 4096, b"rewritten")
        model[4096 : 4096 + 9] = b"rewritten"
        assert await read_all(device, lo, length) == model

    async def test_fua_write_reads_back(self, device: AsyncDevice) -> None:
        off = min(device.size - 5000, 777)
        data = pattern(5000, 25)
        await device.write(off, data, fua=True)
        assert await read_all(device, off, 5000) == data

    async def test_flush_keeps_data(self, device: AsyncDevice) -> None:
        data = pattern(10000, 41)
        off = min(device.size - len(data), 3333)
        await device.write(off, data)
        await device.flush()
        assert await read_all(device, off, len(data)) == data
        await device.flush()

    async def test_accepts_every_buffer_type(self, device: AsyncDevice) -> None:
        base = pattern(3 * 4096, 51)
        big = bytearray(b"x" * 100) + bytearray(base) + bytearray(b"y" * 100)
        sources: list[Buffer] = [
            base,
            bytearray(base),
            memoryview(base),
            memoryview(big)[100 : 100 + len(base)],
        ]
        off = min(device.size - len(base), 8192 + 17)
        for i, src in enumerate(sources):
            await device.zero(off, len(base))
            await device.write(off, src)
            assert await read_all(device, off, len(base)) == base, f"source {i} ({type(src).__name__})"

    async def test_concurrent_writes_to_distinct_ranges(self, device: AsyncDevice) -> None:
        lo, hi = windows(device)[-1]
        piece = 3000
        count = min(24, (hi - lo) // piece)
        datas = [pattern(piece, 60 + i) for i in range(count)]
        await asyncio.gather(*(device.write(lo + i * piece, d) for i, d in enumerate(datas)))
        got = await read_all(device, lo, count * piece)
        assert got == b"".join(datas)

    async def test_random_operations_match_a_model(self, device: AsyncDevice) -> None:
        """Writes, zeroes, reads and flushes at random inside windows around the boundaries."""
        rng = random.Random(1234)
        wins = windows(device)
        models = {}
        for lo, hi in wins:
            models[lo] = bytearray(await read_all(device, lo, hi - lo))
        for i in range(150):
            lo, hi = rng.choice(wins)
            model = models[lo]
            a = rng.randrange(hi - lo)
            n = rng.randint(1, min(hi - lo - a, rng.choice([16, 600, 5000, 40000])))
            op = rng.random()
            if op < 0.45:
                data = pattern(n, 1000 + i)
                await device.write(lo + a, data, fua=rng.random() < 0.1)
                model[a : a + n] = data
            elif op < 0.55:
                await device.zero(lo + a, n)
                model[a : a + n] = bytes(n)
            elif op < 0.6:
                await device.trim(lo + a, n)
                model[a : a + n] = bytes(n)
            elif op < 0.65:
                await device.flush()
            else:
                assert await read_all(device, lo + a, n) == model[a : a + n], f"op {i}: read {n} at {lo + a}"
        for lo, hi in wins:
            assert await read_all(device, lo, hi - lo) == models[lo], f"window [{lo}, {hi})"


# The contract most devices pass.
BlockDeviceContract = WritableContract


class ReadOnlyContract(ReadableContract):
    """A device that reads as zeros and refuses writes (the zero LD)."""

    read_only_error: ClassVar[type[Exception]] = ReadOnlyDevice

    async def test_write_is_refused_and_changes_nothing(self, device: AsyncDevice) -> None:
        for off in interesting_offsets(device):
            length = min(4096, device.size - off)
            with pytest.raises(self.read_only_error):
                await device.write(off, pattern(length, 3))
            assert await read_all(device, off, length) == bytes(length)

    async def test_zero_trim_and_flush_succeed(self, device: AsyncDevice) -> None:
        await device.zero(0, min(device.size, 1 << 20))
        await device.trim(0, min(device.size, 1 << 20))
        await device.flush()
        assert await read_all(device, 0, 4096) == bytes(4096)

    async def test_large_read_is_zeros(self, device: AsyncDevice) -> None:
        length = min(device.size, 3 * 1024 * 1024 + 5)
        assert await read_all(device, device.size - length, length) == bytes(length)
