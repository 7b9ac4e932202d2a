"""4 KiB random writes in-process to a RAID 5 volume, healthy and degraded, with and without the
RAID 5 journal (logical/journal.py): what closing the degraded write hole costs.

A RAID 5 pool of 3 sparse file PDs (set size 3, the default 128 KiB step), a write-through
volume of ``--mib`` MiB written in full and flushed first, then ``--writes`` 4 KiB writes at
random 4 KiB-aligned offsets, one at a time, through ``Engine.volume(...).write`` (no NBD).
Cases: the set healthy, then with one PD failed; each with the journal (as the engine runs)
and without it (every LD's ``journal`` detached: the code path before the journal existed).
The cases take turns, ``--repeat`` times, each in a fresh directory; prints writes/s, the
median latency.  With ``--loop-stall`` a ticker task (``await asyncio.sleep(0)`` in a loop) runs
beside the writer, which yields once after each write, and records the gaps between its turns:
a write done inline holds the loop for its whole length, one handed to the I/O threads only
while it is submitted.  The 99th percentile of those gaps is how long another connection would
wait for the event loop (the ticker spins, so it also slows the writer: rates and latencies are
comparable only between runs with the same setting).

    .venv/bin/python -m bench.raid5_writes --workdir /tmp/r5 --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from thinblock.engine import Engine, EngineOptions
from thinblock.memory import warm_heap

MiB = 1 << 20
BLOCK = 4096


async def random_writes(
    directory: Path, mib: int, writes: int, degraded: bool, journal: bool, loop_stall: bool = False
) -> tuple[float, float, float]:
    engine = await Engine.open(directory / "data", EngineOptions())
    try:
        for i in range(3):
            await engine.add_pd(
                directory / f"pd{i}.img", size=max(2 * mib * MiB, 1 << 30), chunklet_size=256 * MiB
            )
        await engine.create_pool("p", raid=5, set_size=3)
        await engine.create_vv("v", pool="p", size=mib * MiB)
        volume = engine.volume("v")
        chunk = memoryview(bytearray(os.urandom(MiB)))
        for i in range(mib):
            await volume.write(i * MiB, chunk)
        await engine.flush_all()
        if degraded:
            await engine.fail_pd(next(iter(engine.pds)))
        if not journal:
            for ld in engine.lds.values():
                ld.journal = None
        rng = random.Random(1)
        data = memoryview(bytearray(os.urandom(BLOCK)))
        offsets = [rng.randrange(mib * MiB // BLOCK) * BLOCK for _ in range(writes)]
        latencies = []
        gaps: list[float] = []
        done = False

        async def ticker() -> None:
            while not done:
                t = time.perf_counter()
                await asyncio.sleep(0)
                gaps.append(time.perf_counter() - t)

        ticking = asyncio.create_task(ticker() if loop_stall else asyncio.sleep(0))
        started = time.perf_counter()
        for off in offsets:
            t = time.perf_counter()
            await volume.write(off, data)
            latencies.append(time.perf_counter() - t)
            if loop_stall:
                await asyncio.sleep(0)  # the ticker's turn: the gap it sees is the write's hold
        elapsed = time.perf_counter() - started
        done = True
        await ticking
        gaps.sort()
        stall = gaps[int(len(gaps) * 0.99)] * 1e6 if gaps else float("nan")
        return writes / elapsed, statistics.median(latencies) * 1e6, stall
    finally:
        await engine.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.raid5_writes", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--mib", type=int, default=64, help="volume size in MiB (default 64)")
    parser.add_argument("--writes", type=int, default=3000, help="4 KiB writes per case (default 3000)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", help="where the files go (default: system temp)")
    parser.add_argument(
        "--loop-stall", action="store_true", help="measure the event loop's stalls beside the writer"
    )
    args = parser.parse_args(argv)
    warm_heap()  # as the daemon does
    cases = {
        (
            degraded,
            journal,
        ): f"{'degraded' if degraded else 'healthy'}, {'journal' if journal else 'no journal'}"
        for degraded in (False, True)
        for journal in (False, True)
    }
    figures: dict[tuple[bool, bool], list[tuple[float, float, float]]] = {case: [] for case in cases}
    for _ in range(args.repeat):
        for case in cases:
            directory = Path(tempfile.mkdtemp(prefix="thinblock-r5-", dir=args.workdir))
            try:
                figures[case].append(
                    asyncio.run(random_writes(directory, args.mib, args.writes, *case, args.loop_stall))
                )
            finally:
                shutil.rmtree(directory, ignore_errors=True)
    for case, name in cases.items():
        rates = [r for r, _, _ in figures[case]]
        lat = [m for _, m, _ in figures[case]]
        stalls = [g for _, _, g in figures[case]]
        runs = ", ".join(f"{r:,.0f}" for r in rates)
        print(
            f"{name:22s} median {statistics.median(rates):8,.0f} writes/s, "
            f"median latency {statistics.median(lat):7,.1f} us"
            + (f", loop stall p99 {statistics.median(stalls):7,.1f} us" if args.loop_stall else "")
            + f"   (runs: {runs})"
        )


if __name__ == "__main__":
    main()
