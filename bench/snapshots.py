"""Snapshots, clones, copy on write and diff, measured (issue 14).

    python -m bench.snapshots [--quick] [--regions 1000000] [--store DIR] [--cow-regions 512]

In-process, through the engine API (no NBD), as ``bench.raid5_writes`` does:

* **A volume with one million assigned regions** (the store ``bench.metadata_scale`` builds: 4 KiB
  writes into a million distinct 4 KiB regions; ``--store DIR`` keeps it and reuses it): the time
  and the memory of a snapshot of it and of a clone of that snapshot (target < 1 s, independent
  of the data beyond the map copy: the same on a volume of 1,000 regions but for the map), split
  into the in-memory part (``RegionMap.copy`` and the space map's references, what the engine does
  between two awaits) and the rest (the store's transaction: the map rows copied by
  ``INSERT ... SELECT``).  Memory: the new volume's map, and the process's resident set before
  and after and its peak during the call (``VmHWM`` after resetting it through
  ``/proc/self/clear_refs``; the heap the open left free is reused first, so growth shows only
  past it).
* **Diff of two snapshots with one million regions** (``vv diff``; target < 1 s): snapshot S1,
  ``--diff-writes`` 4 KiB writes into random regions of the volume (each a copy on write), snapshot
  S2, then ``Engine.diff_vv(S1, S2)``; also the dirty bitmap (NBD's ``qemu:dirty-bitmap:S1`` on
  the S2 export) asked over the whole volume, as a backup client walks it.
* **Copy on write against unshared writes, in one run**: a RAID 1 volume of ``3 x --cow-regions``
  1 MiB regions (two sparse file PDs, write-through), written in full, flushed, snapshotted; the
  last third is then written once (copied: unshared from then on).  Then 4 KiB writes at random
  4 KiB-aligned offsets, one at a time, taking turns: one into a region of the first third still
  shared with the snapshot (its first write: a copy on write), one into a random unshared region.
  Median and mean latencies of each, and their ratio; the time the copies spent in the target
  LD's flush (the fsync that makes the copy durable before the map names it, volume/cow.py) is
  counted separately.  Then the second third's first writes, each after ``--dirty-mib`` MiB of
  other writes left dirty in the page cache: the copy's flush writes those out too.

The machine may be loaded: figures are printed and written to bench/results/, never asserted.
``make bench`` runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from thinblock.engine import Engine, EngineOptions
from thinblock.logical.raid import LogicalDisk
from thinblock.memory import warm_heap

from .metadata_scale import STORE_MARKER, build_store
from .report import Table, machine_description, write_results

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
ROOT = Path(__file__).resolve().parent.parent
TARGET_S = 1.0
SMALL_REGIONS = 1000  # the volume a million-region snapshot is compared with
T = TypeVar("T")


def _status_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    """Reset VmHWM to the current resident set (Linux: "5" to /proc/PID/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@dataclass
class Timed:
    seconds: float
    rss_before_mib: float
    rss_after_mib: float
    peak_mib: float | None  # None: the peak could not be reset, so it is not this call's

    @property
    def memory(self) -> str:
        grown = self.rss_after_mib - self.rss_before_mib
        peak = "" if self.peak_mib is None else f", peak +{self.peak_mib - self.rss_before_mib:,.1f} MiB"
        return f"+{grown:,.1f} MiB resident{peak} (from {self.rss_before_mib:,.0f} MiB)"


async def timed(call: Callable[[], Awaitable[T]]) -> tuple[T, Timed]:
    before = _status_kib("VmRSS") / 1024
    reset = _reset_peak()
    began = time.perf_counter()
    result = await call()
    seconds = time.perf_counter() - began
    after = _status_kib("VmRSS") / 1024
    peak = _status_kib("VmHWM") / 1024 if reset else None
    return result, Timed(seconds, before, after, peak)


def _ms(seconds: float) -> str:
    if seconds < 0.001:
        return f"{seconds * 1e6:,.0f} us"
    return f"{seconds * 1000:,.1f} ms" if seconds < 1 else f"{seconds:,.2f} s"


def _verdict(seconds: float) -> str:
    return "met" if seconds < TARGET_S else "MISSED"


def _in_memory_share(engine: Engine, name: str) -> float:
    """What a snapshot does between two awaits: the map copied, every region one more reference
    (then given back: this measures, it does not make a snapshot)."""
    vv: Any = engine.volume(name)
    began = time.perf_counter()
    vv.map.copy()
    packed = vv.map.packed_array()
    vv.pool.share_many(packed)
    seconds = time.perf_counter() - began
    vv.pool.unshare_many(packed)
    return seconds


# --- one million regions: snapshot, clone, diff -------------------------------------------------------


def _ensure_store(store: Path, regions: int, say: Callable[[str], None]) -> None:
    marker = store / STORE_MARKER
    built = json.loads(marker.read_text()) if marker.exists() else {}
    if built.get("complete") and built.get("regions") == regions:
        say(f"reusing the store of {regions:,} assigned regions in {store}")
        return
    if store.exists() and any(store.iterdir()):
        if not marker.exists():  # never delete a directory this benchmark did not build
            raise RuntimeError(f"{store} is not empty and holds no benchmark store ({STORE_MARKER})")
        shutil.rmtree(store)
    store.mkdir(parents=True, exist_ok=True)
    say(f"building a store of {regions:,} assigned regions (bench.metadata_scale)")
    region_size, seconds = asyncio.run(build_store(store, regions))
    say(f"built in {seconds:.1f} s ({region_size // KiB} KiB regions)")


async def measure_million(
    store: Path, regions: int, diff_writes: int, keep: bool, say: Callable[[str], None]
) -> Table:
    rows: list[list[str]] = []
    engine = await Engine.open(store / "data")
    made: list[str] = []
    try:
        volume: Any = engine.volume("scale")
        region_size = volume.region_size
        assert volume.map.count == regions, (volume.map.count, regions)
        # A small volume in the same pool: the same operations but for the map.
        await engine.create_vv("small", pool="scale", size=SMALL_REGIONS * region_size)
        made.append("small")
        small: Any = engine.volume("small")
        payload = b"\xa5" * min(4 * KiB, region_size)
        for region in range(SMALL_REGIONS):
            await small.write(region * region_size, payload)

        for name, count in (("small", SMALL_REGIONS), ("scale", regions)):
            memory_s = statistics.median(_in_memory_share(engine, name) for _ in range(3))
            _, snap = await timed(lambda name=name: engine.snapshot_vv(name, f"{name}-s1"))  # type: ignore[misc]
            made.append(f"{name}-s1")
            _, clone = await timed(lambda name=name: engine.clone_vv(f"{name}-s1", f"{name}-c1"))  # type: ignore[misc]
            made.append(f"{name}-c1")
            # What the new volume holds in memory: its map (8 KiB per 1,024 regions); the packed
            # array of the source's regions (8 bytes each) lives only during the call.
            map_mib = len(engine.volume(f"{name}-s1").map.chunks) * 8 * KiB / MiB  # type: ignore[attr-defined]
            for what, figure in (("snapshot", snap), ("clone of the snapshot", clone)):
                rows.append(
                    [
                        f"{what}, {count:,} regions",
                        _ms(figure.seconds),
                        _ms(memory_s),
                        _ms(max(figure.seconds - memory_s, 0.0)),
                        f"map {map_mib:,.1f} MiB; {figure.memory}",
                        f"< 1 s: {_verdict(figure.seconds)}",
                    ]
                )
                say(f"{what:22s} {count:>9,} regions {_ms(figure.seconds):>10s}  {figure.memory}")

        # Diff of two snapshots: S1, writes into random regions (copies on write), S2.
        rng = random.Random(14)
        touched = rng.sample(range(regions), min(diff_writes, regions))
        for region in touched:
            await volume.write(region * region_size, payload)
        await engine.snapshot_vv("scale", "scale-s2")
        made.append("scale-s2")
        diffs = []
        extents: list[tuple[int, int]] = []
        for _ in range(3):
            began = time.perf_counter()
            extents = engine.diff_vv("scale-s1", "scale-s2")
            diffs.append(time.perf_counter() - began)
        assert sum(n for _, n in extents) == len(touched) * region_size, "the diff names the written regions"
        diff_s = statistics.median(diffs)
        rows.append(
            [
                f"diff of two snapshots, {regions:,} regions each ({len(touched):,} differ), median of 3",
                _ms(diff_s),
                "",
                "",
                f"{len(extents):,} extents",
                f"< 1 s: {_verdict(diff_s)}",
            ]
        )
        say(f"diff                   {regions:>9,} regions {_ms(diff_s):>10s}  {len(extents):,} extents")
        # The same through the dirty bitmap, as an NBD client walks it (4 GiB - 1 MiB per request:
        # NBD lengths are 32-bit).
        bitmap = engine.volume("scale-s2").dirty_bitmap("scale-s1")  # type: ignore[attr-defined]
        size = engine.volume("scale-s2").size
        step = 4 * GiB - MiB
        began = time.perf_counter()
        requests = dirty = 0
        offset = 0
        while offset < size:
            runs = await bitmap.status(offset, min(step, size - offset))
            requests += 1
            dirty += sum(n for n, is_dirty in runs if is_dirty)
            offset += sum(n for n, _ in runs)
        walk_s = time.perf_counter() - began
        assert dirty == len(touched) * region_size
        rows.append(
            [
                f"dirty bitmap qemu:dirty-bitmap:scale-s1 of scale-s2 walked over the volume ({requests} requests)",
                _ms(walk_s),
                "",
                "",
                "",
                "",
            ]
        )
    finally:
        if keep:  # a kept store goes back to its one volume (its data changed); a temporary one goes
            for name in reversed(made):
                if name in engine.vvs:
                    await engine.delete_vv(name, force=True)
        await engine.close()
    return Table(
        f"a volume with {regions:,} assigned regions ({region_size // KiB} KiB regions, RAID 0, SQLite)",
        ["operation", "time", "in memory (map copy, references)", "the rest (store)", "memory", "target"],
        rows,
        right_aligned={1, 2, 3},
    )


# --- copy on write against unshared writes ------------------------------------------------------------


async def measure_cow(
    workdir: Path, regions: int, dirty_mib: int, say: Callable[[str], None]
) -> tuple[Table, list[str]]:
    """Regions [0, R) shared, first writes taking turns with unshared ones; [R, 2R) shared, each
    first write after ``dirty_mib`` MiB of other writes left dirty in the PDs' page cache (what
    the copy's flush then writes out too); [2R, 3R) unshared."""
    unwrapped = LogicalDisk.flush  # put back in the finally below (wrapped for the count)
    engine = await Engine.open(workdir / "data", EngineOptions())
    try:
        pd_size = max(6 * regions * MiB + 512 * MiB, GiB)
        for index in range(2):
            await engine.add_pd(workdir / f"pd{index}.img", size=pd_size, chunklet_size=256 * MiB)
        await engine.create_pool("p", raid=1)
        await engine.create_vv("v", pool="p", size=3 * regions * MiB)
        volume: Any = engine.volume("v")
        region_size = volume.region_size
        chunk = memoryview(bytearray(os.urandom(MiB)))
        for region in range(3 * regions):
            await volume.write(region * region_size, chunk[:region_size])
        await engine.flush_all()
        await engine.snapshot_vv("v", "s")
        unshared = range(2 * regions, 3 * regions)
        for region in unshared:  # copied once: unshared from now on
            await volume.write(region * region_size, chunk[:4096])
        await engine.flush_all()

        # Count the LD flushes (the copies' fsyncs) and their time: on the class, so that an LD
        # the pool makes for the copies is counted too (wrapping the LDs present here counted
        # none of them once the copies landed in a new LD).
        flushes: list[float] = []

        def counted(ld: LogicalDisk) -> None:
            began = time.perf_counter()
            unwrapped(ld)
            flushes.append(time.perf_counter() - began)

        LogicalDisk.flush = counted  # type: ignore[method-assign]
        rng = random.Random(7)
        data = os.urandom(4096)

        async def write_4k(region: int) -> float:
            offset = region * region_size + rng.randrange(region_size // 4096) * 4096
            began = time.perf_counter()
            await volume.write(offset, data)
            return time.perf_counter() - began

        copies_before = volume.cow_copies
        cow_lat: list[float] = []
        plain_lat: list[float] = []
        shared = list(range(regions))
        rng.shuffle(shared)
        for region in shared:
            cow_lat.append(await write_4k(region))
            plain_lat.append(await write_4k(rng.choice(unshared)))
        quiet_flushes = list(flushes)
        flushes.clear()
        dirty_lat: list[float] = []
        for region in range(regions, 2 * regions):
            for _ in range(dirty_mib):  # other data, left dirty (write-through: the page cache)
                await volume.write(rng.choice(unshared) * region_size, chunk[:region_size])
            dirty_lat.append(await write_4k(region))
        dirty_flushes = list(flushes)
        copies = volume.cow_copies - copies_before
        assert copies == 2 * regions, f"{copies} copies on write for {2 * regions} first writes"
    finally:
        LogicalDisk.flush = unwrapped  # type: ignore[method-assign]
        await engine.close()

    def row(what: str, lat: list[float]) -> list[str]:
        p99 = _ms(statistics.quantiles(lat, n=100)[98]) if len(lat) >= 100 else ""
        mean = statistics.fmean(lat)
        return [what, f"{len(lat):,}", f"{1 / mean:,.0f}", _ms(statistics.median(lat)), _ms(mean), p99]

    cow_mean, plain_mean = statistics.fmean(cow_lat), statistics.fmean(plain_lat)
    quiet_flush = statistics.fmean(quiet_flushes) if quiet_flushes else 0.0
    dirty_flush = statistics.fmean(dirty_flushes) if dirty_flushes else 0.0
    rows = [
        row("into a region shared with the snapshot (copy on write)", cow_lat),
        row("into an unshared region (taking turns with the above)", plain_lat),
        row(f"copy on write with {dirty_mib} MiB of other writes dirty in the page cache", dirty_lat),
    ]
    notes = [
        f"copy on write / unshared, mean latency {cow_mean / plain_mean:,.0f} x, median"
        f" {statistics.median(cow_lat) / statistics.median(plain_lat):,.0f} x (one 1 MiB region read,"
        " written to both mirrors and flushed, two store commits, against one 4 KiB write)",
        f"the copy's LD flush (fsync of every PD of the target LD): {len(quiet_flushes):,} flushes for"
        f" {len(cow_lat):,} copies, mean {_ms(quiet_flush)} = {quiet_flush / cow_mean:.0%} of a copy-on-write"
        f" write's mean; with {dirty_mib} MiB of other data dirty: mean {_ms(dirty_flush)} ="
        f" {dirty_flush / statistics.fmean(dirty_lat):.0%} of its mean {_ms(statistics.fmean(dirty_lat))}",
    ]
    for line in notes:
        say(line)
    table = Table(
        f"4 KiB random writes, RAID 1, {region_size // MiB} MiB regions, write-through",
        ["writes", "count", "writes/s (1 / mean)", "median", "mean", "p99"],
        rows,
        right_aligned={1, 2, 3, 4, 5},
    )
    return table, notes


# --- main ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.snapshots", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke test, not a measurement)")
    parser.add_argument("--regions", type=int, help="assigned regions of the big volume (default 1,000,000)")
    parser.add_argument("--store", type=Path, help="keep the million-region store here and reuse it")
    parser.add_argument("--diff-writes", type=int, help="regions written between the two snapshots (1,000)")
    parser.add_argument("--cow-regions", type=int, help="copies on write measured per case (default 256)")
    parser.add_argument("--dirty-mib", type=int, default=16, help="other data dirty before a copy (16 MiB)")
    parser.add_argument("--workdir", type=Path, help="where the files go (default: system temp)")
    parser.add_argument(
        "--output", type=Path, help="the Markdown file (default bench/results/DATE-HOST-snapshots.md)"
    )
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--no-million", action="store_true", help="skip the million-region figures")
    parser.add_argument("--no-cow", action="store_true", help="skip the copy-on-write figures")
    args = parser.parse_args(argv)
    regions = args.regions or (20_000 if args.quick else 1_000_000)
    diff_writes = args.diff_writes or (200 if args.quick else 1000)
    cow_regions = args.cow_regions or (16 if args.quick else 256)
    warm_heap()  # as the daemon does

    def say(text: str) -> None:
        print(text, flush=True)

    started = time.time()
    load_start = os.getloadavg()
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="thinblock-snapshots-", dir=args.workdir))
    tables: list[Table] = []
    notes: list[str] = []
    try:
        if not args.no_million:
            store = args.store or workdir / "store"
            _ensure_store(store, regions, say)
            tables.append(
                asyncio.run(measure_million(store, regions, diff_writes, args.store is not None, say))
            )
        if not args.no_cow:
            (workdir / "cow").mkdir()
            table, notes = asyncio.run(measure_cow(workdir / "cow", cow_regions, args.dirty_mib, say))
            tables.append(table)
        machine = machine_description(workdir, ROOT)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    load_end = os.getloadavg()
    text = [
        "# thinblock snapshots: snapshot, clone, copy on write, diff (issue 14)",
        "",
        *(["> **Quick run** (smoke test); not a measurement to compare.", ""] if args.quick else []),
        f"Command: `python -m bench.snapshots {' '.join(argv if argv is not None else sys.argv[1:])}`".rstrip(),
        f"Started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))},"
        f" took {(time.time() - started) / 60:.1f} min. Load average (1/5/15 min) at the start"
        f" {' / '.join(f'{v:.1f}' for v in load_start)}, at the end {' / '.join(f'{v:.1f}' for v in load_end)}"
        f" ({os.cpu_count()} cores).",
        "",
        "Machine: " + "; ".join(f"{k}: {v}" for k, v in machine),
        "",
    ]
    for table in tables:
        text += [f"### {table.title}", "", table.markdown(), ""]
    text += [f"- {line}" for line in notes]
    text.append("")
    print("\n".join(text))
    if not args.no_write:
        write_results("\n".join(text), args.output, "snapshots", quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
