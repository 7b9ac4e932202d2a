"""Fresh 1 MiB writes in-process: the engine against a plain pwrite loop, no NBD.

How much of a seqwrite-fresh figure is thinblock's own bookkeeping (region assignment, the
map, the store, the I/O threads) and how much is the kernel's page cache?  This writes
``--mib`` MiB of never-written space in 1 MiB writes, eight in flight, through
``Engine.volume(...).write`` on a RAID 0 and a RAID 1 pool of two sparse file PDs, and the
same bytes with a plain loop of 256 KiB ``pwrite`` calls into one file (what RAID 0 has to
write) and into two files (RAID 1's two copies).  Each case runs in a fresh directory after a
``sync``, the cases take turns, ``--repeat`` times; prints MiB/s.

    .venv/bin/python -m bench.fresh_writes --workdir /tmp/fw --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from thinblock.engine import Engine, EngineOptions
from thinblock.memory import warm_heap

MiB = 1 << 20
PIECE = 256 * 1024  # as physical.pd.WRITE_PIECE
DEPTH = 8


async def engine_writes(directory: Path, raid: int, mib: int) -> float:
    engine = await Engine.open(directory / "data", EngineOptions())
    try:
        for i in range(2):
            await engine.add_pd(
                directory / f"pd{i}.img", size=max(4 * mib * MiB, 1 << 30), chunklet_size=256 * MiB
            )
        await engine.create_pool("p", raid=raid, set_size=2)
        await engine.create_vv("v", pool="p", size=mib * MiB)
        volume = engine.volume("v")
        buffers = [memoryview(bytearray(os.urandom(MiB))) for _ in range(DEPTH)]
        os.sync()
        gate = asyncio.Semaphore(DEPTH)

        async def one(i: int) -> None:
            async with gate:
                await volume.write(i * MiB, buffers[i % DEPTH])

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(mib)))
        return mib / (time.perf_counter() - started)
    finally:
        await engine.close()


def plain_writes(directory: Path, copies: int, mib: int) -> float:
    fds = [os.open(directory / f"plain{i}", os.O_RDWR | os.O_CREAT, 0o600) for i in range(copies)]
    try:
        for fd in fds:
            os.ftruncate(fd, mib * MiB)
        data = memoryview(os.urandom(MiB))
        os.sync()
        started = time.perf_counter()
        for i in range(mib):
            for fd in fds:
                for pos in range(0, MiB, PIECE):
                    os.pwrite(fd, data[pos : pos + PIECE], i * MiB + pos)
        return mib / (time.perf_counter() - started)
    finally:
        for fd in fds:
            os.close(fd)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fresh_writes", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--mib", type=int, default=1024, help="MiB written per case (default 1024)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", help="where the files go (default: system temp)")
    args = parser.parse_args(argv)
    warm_heap()  # as the daemon does
    cases = {
        "plain, 1 file": lambda d: plain_writes(d, 1, args.mib),
        "engine, RAID 0": lambda d: asyncio.run(engine_writes(d, 0, args.mib)),
        "plain, 2 files": lambda d: plain_writes(d, 2, args.mib),
        "engine, RAID 1": lambda d: asyncio.run(engine_writes(d, 1, args.mib)),
    }
    figures: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeat):
        for name, run in cases.items():
            directory = Path(tempfile.mkdtemp(prefix="thinblock-fresh-", dir=args.workdir))
            try:
                figures[name].append(run(directory))
            finally:
                shutil.rmtree(directory, ignore_errors=True)
    for name, values in figures.items():
        runs = ", ".join(f"{v:,.0f}" for v in values)
        print(f"{name:15s} median {statistics.median(values):8,.0f} MiB/s   (runs: {runs})")


if __name__ == "__main__":
    main()
