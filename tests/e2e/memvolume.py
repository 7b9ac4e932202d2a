"""A small in-memory thin volume for driving the NBD server without the engine.

Sparse dict of fixed-size blocks: a block that was never written (or was trimmed) is a
hole that reads as zeros and is reported HOLE|ZERO by block_status; all-zero writes to
a hole allocate nothing (zero detect).  An optional allocation limit raises OutOfSpace
for writes that need a new block past it, while blocks already allocated stay writable
-- the behaviour the engine promises for a VV allocation limit.
"""

from __future__ import annotations

import asyncio

from thinblock.blockdev import Buffer, Capabilities, Extent, ExtentFlags, ReadPiece
from thinblock.errors import NotFound, OutOfSpace, SlowZero

KiB = 1024
MiB = 1024 * KiB


class MemVolume:
    def __init__(
        self,
        name: str,
        size: int,
        *,
        description: str = "",
        block_size: int = 64 * KiB,
        alloc_limit: int | None = None,
        capabilities: Capabilities | None = None,
        suspend_every: int = 0,
    ) -> None:
        self._name = name
        self._size = size
        self._description = description
        self.block_size = block_size
        self.alloc_limit = alloc_limit
        self._capabilities = capabilities or Capabilities()
        self._blocks: dict[int, bytearray] = {}
        # Every n-th call suspends once, so that the server's Task path is exercised too.
        self.suspend_every = suspend_every
        self._calls = 0
        self.flushes = 0
        self.writes = 0
        self.out_of_space = 0

    # --- properties -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._name

    @property
    def description(self) -> str:
        return self._description

    @property
    def size(self) -> int:
        return self._size

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    @property
    def allocated_bytes(self) -> int:
        return len(self._blocks) * self.block_size

    def allocated_blocks(self) -> list[int]:
        return sorted(self._blocks)

    def contents(self) -> bytes:
        """The whole volume (for checks in tests)."""
        return self._read(0, self._size)

    # --- helpers ------------------------------------------------------------------------------
    async def _maybe_suspend(self) -> None:
        if self.suspend_every:
            self._calls += 1
            if self._calls % self.suspend_every == 0:
                await asyncio.sleep(0)

    def _check(self, offset: int, length: int) -> None:
        assert offset >= 0 and length > 0 and offset + length <= self._size, (offset, length, self._size)
        assert length <= self._capabilities.maximum_block, length

    def _pieces(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """(block index, offset within block, length) for a range."""
        out = []
        end = offset + length
        bs = self.block_size
        while offset < end:
            index, within = divmod(offset, bs)
            n = min(bs - within, end - offset)
            out.append((index, within, n))
            offset += n
        return out

    def _block_length(self, index: int) -> int:
        return min(self.block_size, self._size - index * self.block_size)

    def _allocate(self, index: int) -> bytearray:
        block = self._blocks.get(index)
        if block is None:
            if self.alloc_limit is not None and self.allocated_bytes + self.block_size > self.alloc_limit:
                self.out_of_space += 1
                raise OutOfSpace(f"volume {self._name}: allocation limit {self.alloc_limit} reached")
            block = self._blocks[index] = bytearray(self._block_length(index))
        return block

    def _read(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        pos = 0
        for index, within, n in self._pieces(offset, length):
            block = self._blocks.get(index)
            if block is not None:
                out[pos : pos + n] = block[within : within + n]
            pos += n
        return bytes(out)

    def _zero(self, offset: int, length: int, may_trim: bool) -> None:
        pieces = self._pieces(offset, length)
        if not may_trim:
            # NO_HOLE: the range must end up allocated; allocate everything first so that a
            # refusal changes nothing.
            missing = [i for i, _w, _n in pieces if i not in self._blocks]
            if (
                self.alloc_limit is not None
                and self.allocated_bytes + len(missing) * self.block_size > self.alloc_limit
            ):
                self.out_of_space += 1
                raise OutOfSpace(f"volume {self._name}: allocation limit {self.alloc_limit} reached")
        for index, within, n in pieces:
            block = self._blocks.get(index)
            if may_trim and within == 0 and n == self._block_length(index):
                self._blocks.pop(index, None)
            elif block is not None:
                block[within : within + n] = bytes(n)
            elif not may_trim:
                self._allocate(index)

    # --- Volume -------------------------------------------------------------------------------
    async def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        await self._maybe_suspend()
        return self._read(offset, length)

    async def read_extents(self, offset: int, length: int) -> list[ReadPiece]:
        """No holes reported: the whole read as one piece of data (through ``read``, so that
        subclasses overriding it are what the NBD server sees)."""
        return [(offset, length, await self.read(offset, length))]

    async def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        self._check(offset, len(data))
        await self._maybe_suspend()
        view = memoryview(data)
        pieces = self._pieces(offset, len(view))
        # Refuse before changing anything if the write needs more blocks than the limit allows.
        needed = 0
        pos = 0
        for index, _within, n in pieces:
            if index not in self._blocks and any(view[pos : pos + n]):
                needed += 1
            pos += n
        if (
            needed
            and self.alloc_limit is not None
            and self.allocated_bytes + needed * self.block_size > self.alloc_limit
        ):
            self.out_of_space += 1
            raise OutOfSpace(f"volume {self._name}: allocation limit {self.alloc_limit} reached")
        pos = 0
        for index, within, n in pieces:
            chunk = view[pos : pos + n]
            block = self._blocks.get(index)
            if block is None and any(chunk):
                block = self._allocate(index)
            if block is not None:
                block[within : within + n] = chunk
            pos += n
        self.writes += 1
        if fua:
            self.flushes += 1

    async def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool = True, fast: bool = False, fua: bool = False
    ) -> None:
        self._check(offset, length)
        await self._maybe_suspend()
        if fast and not may_trim:
            raise SlowZero("zeroing without punching holes is as slow as writing zeros")
        self._zero(offset, length, may_trim)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._check(offset, length)
        await self._maybe_suspend()
        self._zero(offset, length, may_trim=True)

    async def flush(self) -> None:
        await self._maybe_suspend()
        self.flushes += 1

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        # The one call that may exceed maximum_block; this toy walks its blocks one by one, so it
        # describes at most maximum_block bytes (a volume may describe less than was asked).
        length = min(length, self._capabilities.maximum_block)
        self._check(offset, length)
        await self._maybe_suspend()
        extents: list[Extent] = []
        for index, _within, n in self._pieces(offset, length):
            flags = ExtentFlags.ALLOCATED if index in self._blocks else ExtentFlags.HOLE | ExtentFlags.ZERO
            if extents and extents[-1].flags == flags:
                extents[-1] = Extent(extents[-1].length + n, flags)
            else:
                extents.append(Extent(n, flags))
        return extents

    async def cache(self, offset: int, length: int) -> None:
        self._check(offset, length)


class SparseMemVolume(MemVolume):
    """A MemVolume whose reads report never-written blocks as holes (as a thin volume does)."""

    async def read_extents(self, offset: int, length: int) -> list[ReadPiece]:
        self._check(offset, length)
        await self._maybe_suspend()
        out: list[ReadPiece] = []
        position = offset
        for index, within, n in self._pieces(offset, length):
            block = self._blocks.get(index)
            data = None if block is None else bytes(block[within : within + n])
            if out and data is None and out[-1][2] is None:
                out[-1] = (out[-1][0], out[-1][1] + n, None)
            else:
                out.append((position, n, data))
            position += n
        return out


class MemProvider:
    """A VolumeProvider over a dict of volumes."""

    def __init__(self, *volumes: MemVolume) -> None:
        self.volumes = {v.name: v for v in volumes}

    def export_names(self) -> list[str]:
        return list(self.volumes)

    def open_volume(self, name: str) -> MemVolume:
        try:
            return self.volumes[name]
        except KeyError:
            raise NotFound(f"no volume named {name!r}") from None
