"""The child process of tests/unit/test_engine_crash.py: writes and flushes through the
engine until it is killed with SIGKILL.

    python -m tests.crash_child DATA_DIR SEED RECORD_FILE

It opens the engine on DATA_DIR (set up by the test: a RAID 1 pool and the volumes of
``VOLUMES``), starts a rebuild in the background if an LD is degraded (the test fails a
PD now and then), prints ``ready``, then runs the operations of ``operations(SEED)`` one at
a time.  After each operation marked ``flush_after`` it flushes the engine and, once the
flush has completed, appends the operation's sequence number to RECORD_FILE and fsyncs
it: every operation up to that number was acknowledged before a completed flush, so it
must survive the kill.

The operations are a pure function of the seed, so the test recomputes them exactly.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from thinblock.engine import Engine, EngineOptions
from thinblock.model import CacheMode
from thinblock.units import KiB

REGION = 16 * KiB
VOLUMES = {"mirror": (48 * REGION, CacheMode.WRITETHROUGH), "cached": (48 * REGION, CacheMode.WRITEBACK)}
OPTIONS = EngineOptions(allow_tiny_chunklets=True, destage_delay=0.002, max_dirty_bytes=256 * KiB)


@dataclass(frozen=True, slots=True)
class Op:
    seq: int
    volume: str
    kind: str  # write, trim, zero (write-zeroes that may trim), nohole (write-zeroes, NO_HOLE)
    offset: int
    length: int
    data_seed: int
    flush_after: bool

    def data(self) -> bytes:
        """What the operation leaves in [offset, offset + length)."""
        if self.kind != "write":
            return bytes(self.length)
        rng = random.Random(self.data_seed)
        if self.data_seed % 11 == 0:  # now and then an all-zero write (zero detect)
            return bytes(self.length)
        return rng.randbytes(self.length)


def operations(seed: int) -> Iterator[Op]:
    rng = random.Random(seed)
    names = sorted(VOLUMES)
    seq = 0
    until_flush = rng.randint(1, 8)
    while True:
        name = rng.choice(names)
        size = VOLUMES[name][0]
        if rng.random() < 0.3:  # region-aligned, so trims and zeroes unmap whole regions
            offset = rng.randrange(size // REGION) * REGION
            length = min(size - offset, rng.randint(1, 3) * REGION)
        else:
            offset = rng.randrange(size)
            length = rng.randint(1, min(size - offset, 3 * REGION))
        kind = rng.choices(["write", "trim", "zero", "nohole"], weights=[75, 10, 8, 7])[0]
        until_flush -= 1
        flush_after = until_flush == 0
        if flush_after:
            until_flush = rng.randint(1, 8)
        yield Op(seq, name, kind, offset, length, rng.randrange(2**32), flush_after)
        seq += 1


async def apply(engine: Engine, op: Op) -> None:
    volume = engine.volume(op.volume)
    if op.kind == "write":
        await volume.write(op.offset, op.data())
    elif op.kind == "trim":
        await volume.trim(op.offset, op.length)
    else:
        await volume.write_zeroes(op.offset, op.length, may_trim=op.kind == "zero")


async def run(data_dir: Path, seed: int, record: Path) -> None:
    engine = await Engine.open(data_dir, OPTIONS)
    # A PD failed before this run: rebuild in the background while writing (the kill may
    # land in the middle of it, before the replacement chunklets are recorded).
    rebuild = None
    if any(ld.health.value != "normal" for ld in engine.list_lds()):
        rebuild = asyncio.ensure_future(engine.rebuild())
    print("ready", flush=True)
    fd = os.open(record, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    for op in operations(seed):
        await apply(engine, op)
        if op.flush_after:
            await engine.flush_all()
            os.write(fd, f"{op.seq}\n".encode())
            os.fsync(fd)
        if rebuild is not None and rebuild.done():
            rebuild.result()  # a rebuild that failed fails the child
            rebuild = None


if __name__ == "__main__":
    asyncio.run(run(Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])))
