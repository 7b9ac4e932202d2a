"""Metadata scale: how thinblock's metadata behaves with big volumes and many regions.

    python -m bench.metadata_scale [--quick] [--regions 1000000] [--store DIR]

Figures (issue 5):

* time to create a 64 TiB VV (target < 1 s);
* fresh-region assignments per second, through the volume write path: 4 KiB writes, each
  to a region never written before, one at a time and with many writers at once, with the
  default 1 MiB regions and with the smallest region size the pool accepts;
* time to open a data directory holding one million assigned regions, and the resident
  memory of the fresh process that opened it (targets < 5 s, < 200 MiB).  The store is
  built by writing through the engine API (4 KiB to each of a million distinct regions,
  64 writers at once); ``--store DIR`` keeps it there and reuses it on the next run;
* 1,000 VVs listed through the REST API (the daemon, ``thinblock serve``).

Each figure that cannot be measured (the engine, the daemon not there yet) says why.
``python -m bench.run`` runs this too and puts the figures in the same Markdown.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .report import Table, write_results
from .servers import HOST, Process, ServerError, free_port, thinblock_env, thinblock_executable, wait_for_port

KiB, MiB, GiB, TiB = 2**10, 2**20, 2**30, 2**40
WRITE_SIZE = 4 * KiB
WRITERS = 64  # writers at once when building the store and in the "concurrent" rate
SMALL_REGION_CANDIDATES = (4 * KiB, 16 * KiB, 64 * KiB, 128 * KiB, 256 * KiB)
STORE_MARKER = ".bench-store.json"


@dataclass
class Figure:
    name: str
    value: str
    target: str = ""
    verdict: str = ""


def _ms(seconds: float) -> str:
    if seconds < 0.001:
        return f"{seconds * 1e6:,.0f} us"
    return f"{seconds * 1000:,.1f} ms" if seconds < 1 else f"{seconds:,.2f} s"


def _check(met: bool) -> str:
    return "met" if met else "MISSED"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, NotImplementedError):
        return "not measured: the engine is not implemented yet (NotImplementedError)"
    if isinstance(exc, ImportError):
        return f"not measured: {exc}"
    return " ".join(f"not measured: {type(exc).__name__}: {exc}".split())[:300]


# --- engine helpers ---------------------------------------------------------------------------------


async def _open_engine(data_dir: Path) -> Any:
    from thinblock.engine import Engine

    return await Engine.open(data_dir)


async def _make_pool(engine: Any, pd_dir: Path, name: str, region_size: int, capacity: int) -> None:
    """Two sparse file PDs and a RAID 0 pool big enough for ``capacity`` bytes of regions."""
    chunklet = 256 * MiB if region_size >= MiB else 64 * MiB
    per_pd = -(-(capacity // 2 + 2 * GiB) // chunklet) * chunklet  # whole chunklets, with slack for growth
    pd_dir.mkdir(parents=True, exist_ok=True)
    for index in range(2):
        await engine.add_pd(pd_dir / f"{name}-pd{index}.img", size=per_pd, chunklet_size=chunklet)
    await engine.create_pool(name, raid=0, set_size=2, region_size=region_size)


async def _smallest_region_pool(engine: Any, pd_dir: Path, name: str, regions: int) -> int:
    """The smallest region size the engine accepts; the pool is created with it."""
    from thinblock.errors import InvalidArgument

    refused = []
    for region_size in SMALL_REGION_CANDIDATES:
        try:
            await _make_pool(engine, pd_dir / f"r{region_size}", name, region_size, regions * region_size)
        except InvalidArgument as exc:
            refused.append(f"{region_size}: {exc}")
            continue
        return region_size
    raise ValueError("no small region size accepted: " + "; ".join(refused))


async def _write_fresh_regions(volume: Any, region_size: int, first: int, count: int, writers: int) -> float:
    """4 KiB of non-zero data at the start of regions first..first+count-1; returns seconds."""
    payload = bytes([0xA5]) * min(WRITE_SIZE, region_size)

    async def writer(start: int) -> None:
        for region in range(first + start, first + count, writers):
            await volume.write(region * region_size, payload)

    began = time.perf_counter()
    if writers == 1:
        await writer(0)
    else:
        await asyncio.gather(*(writer(k) for k in range(writers)))
    return time.perf_counter() - began


# --- the figures ------------------------------------------------------------------------------------


async def measure_create_vv(workdir: Path) -> list[Figure]:
    engine = await _open_engine(workdir / "create-vv")
    try:
        await _make_pool(engine, workdir / "create-vv-pds", "meta", MiB, 4 * GiB)
        times = []
        for n in range(3):
            began = time.perf_counter()
            await engine.create_vv(f"big{n}", pool="meta", size=64 * TiB)
            times.append(time.perf_counter() - began)
    finally:
        await engine.close()
    worst = max(times)
    return [
        Figure(
            "create a 64 TiB VV (median of 3, worst)",
            f"{_ms(statistics.median(times))}, worst {_ms(worst)}",
            "< 1 s",
            _check(worst < 1),
        )
    ]


async def measure_assignment_rate(workdir: Path, count: int) -> list[Figure]:
    figures = []
    engine = await _open_engine(workdir / "assign")
    try:
        pools = [("assign-1m", MiB)]
        await _make_pool(engine, workdir / "assign-pds", "assign-1m", MiB, 2 * count * MiB)
        small = await _smallest_region_pool(engine, workdir / "assign-pds", "assign-small", 2 * count)
        pools.append(("assign-small", small))
        for pool, region_size in pools:
            name = f"vv-{pool}"
            await engine.create_vv(name, pool=pool, size=2 * count * region_size)
            volume = engine.volume(name)
            one = await _write_fresh_regions(volume, region_size, 0, count, 1)
            many = await _write_fresh_regions(volume, region_size, count, count, WRITERS)
            label = f"{region_size // KiB} KiB" if region_size < MiB else f"{region_size // MiB} MiB"
            figures.append(
                Figure(
                    f"fresh-region assignments/s, {label} regions, 4 KiB writes ({count:,} each)",
                    f"{count / one:,.0f}/s one writer; {count / many:,.0f}/s {WRITERS} writers",
                )
            )
    finally:
        await engine.close()
    return figures


async def build_store(store: Path, regions: int) -> tuple[int, float]:
    """A data directory holding ``regions`` assigned regions; returns (region size, seconds)."""
    marker = store / STORE_MARKER
    marker.write_text(json.dumps({"regions": regions, "complete": False}))  # ours, to delete if need be
    began = time.perf_counter()
    engine = await _open_engine(store / "data")
    try:
        region_size = await _smallest_region_pool(engine, store / "pds", "scale", regions)
        await engine.create_vv("scale", pool="scale", size=regions * region_size)
        volume = engine.volume("scale")
        await _write_fresh_regions(volume, region_size, 0, regions, WRITERS)
        allocated = engine.get_vv("scale").regions_allocated
        if allocated != regions:
            raise RuntimeError(f"the store holds {allocated} assigned regions, expected {regions}")
        await engine.flush_all()
    finally:
        await engine.close()
    seconds = time.perf_counter() - began
    marker.write_text(json.dumps({"regions": regions, "region_size": region_size, "complete": True}))
    return region_size, seconds


def _status_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return 0


async def _probe_open(data_dir: Path, metadata: str | None = None) -> dict[str, float]:
    """In a fresh process: open the store (``metadata``: a URL; None: the data directory's
    SQLite store), report time and memory."""
    from thinblock.engine import Engine

    import_rss = _status_kib("VmRSS")
    began = time.perf_counter()
    engine = await Engine.open(data_dir, metadata=metadata)
    opened = time.perf_counter() - began
    rss, peak = _status_kib("VmRSS"), _status_kib("VmHWM")
    await engine.close()
    return {"open_s": opened, "rss_kib": rss, "peak_kib": peak, "import_rss_kib": import_rss}


def probe_open(data_dir: Path, metadata: str | None = None) -> dict[str, float]:
    more = [] if metadata is None else ["--probe-metadata", metadata]
    proc = subprocess.run(
        [sys.executable, "-m", "bench.metadata_scale", "--probe-open", str(data_dir), *more],
        capture_output=True,
        text=True,
        env=thinblock_env(),
        timeout=600,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"open probe exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


async def measure_million(workdir: Path, regions: int, store: Path | None) -> list[Figure]:
    keep = store is not None
    store = store or workdir / "store"
    marker = store / STORE_MARKER
    figures = []
    reused = False
    built = json.loads(marker.read_text()) if keep and marker.exists() else {}
    if built.get("complete") and built.get("regions") == regions:
        region_size = int(built["region_size"])
        reused = True
    else:
        if store.exists() and any(store.iterdir()):
            if not marker.exists():  # never delete a directory this benchmark did not build
                raise RuntimeError(f"{store} is not empty and holds no benchmark store ({STORE_MARKER})")
            shutil.rmtree(store)
        store.mkdir(parents=True, exist_ok=True)
        region_size, seconds = await build_store(store, regions)
        figures.append(
            Figure(
                f"build a store of {regions:,} assigned regions ({region_size // KiB} KiB regions, "
                f"4 KiB writes, {WRITERS} writers)",
                f"{_ms(seconds)} ({regions / seconds:,.0f} assignments/s)",
            )
        )
    opens = [probe_open(store / "data") for _ in range(3)]
    open_s = statistics.median(o["open_s"] for o in opens)
    rss_mib = statistics.median(o["rss_kib"] for o in opens) / 1024
    peak_mib = statistics.median(o["peak_kib"] for o in opens) / 1024
    base_mib = statistics.median(o["import_rss_kib"] for o in opens) / 1024
    what = f"{regions:,} assigned regions" + (" (store reused from --store)" if reused else "")
    if regions < 1_000_000:
        what += " -- fewer than the target's one million"
    figures += [
        Figure(
            f"open a data dir of {what}, fresh process, median of 3", _ms(open_s), "< 5 s", _check(open_s < 5)
        ),
        Figure(
            "resident memory of that process after the open (peak)",
            f"{rss_mib:,.0f} MiB (peak {peak_mib:,.0f} MiB; {base_mib:,.0f} MiB before the open, after imports)",
            "< 200 MiB",
            _check(max(rss_mib, peak_mib) < 200),
        ),
    ]
    return figures


def _find_vv_list_path(openapi: dict[str, Any]) -> str:
    """The REST route that lists VVs, found in the daemon's OpenAPI document."""
    candidates = [
        path
        for path, operations in openapi.get("paths", {}).items()
        if "get" in operations
        and "{" not in path
        and path.rstrip("/").rsplit("/", 1)[-1] in ("vvs", "volumes")
    ]
    if not candidates:
        raise RuntimeError("no GET .../vvs route in the daemon's OpenAPI document")
    return sorted(candidates, key=len)[0]


OPENAPI_URLS = ("/api/v1/openapi.json", "/openapi.json", "/api/openapi.json")


def _openapi(client: Any) -> dict[str, Any]:
    """The daemon's OpenAPI document (FastAPI serves it under the API prefix)."""
    for url in OPENAPI_URLS:
        response = client.get(url)
        if response.status_code == 200:
            document: dict[str, Any] = response.json()
            return document
    raise RuntimeError(f"no OpenAPI document at {', '.join(OPENAPI_URLS)}")


def _count_items(document: Any) -> int:
    if isinstance(document, list):
        return len(document)
    if isinstance(document, dict):
        lists = [v for v in document.values() if isinstance(v, list)]
        if len(lists) == 1:
            return len(lists[0])
    raise RuntimeError(f"cannot find the list of VVs in the response ({type(document).__name__})")


async def measure_api_listing(workdir: Path, count: int = 1000) -> list[Figure]:
    import httpx

    data_dir = workdir / "listing" / "data"
    engine = await _open_engine(data_dir)
    try:
        await _make_pool(engine, workdir / "listing" / "pds", "many", MiB, 4 * GiB)
        began = time.perf_counter()
        for n in range(count):
            await engine.create_vv(f"vv{n:04d}", pool="many", size=GiB)
        created = time.perf_counter() - began
    finally:
        await engine.close()
    figures = [Figure(f"create {count:,} VVs through the engine API", _ms(created))]

    exe = thinblock_executable()
    if exe is None:
        return [
            *figures,
            Figure(f"list {count:,} VVs through the REST API", "not measured: no thinblock executable"),
        ]
    api_port, nbd_port = free_port(), free_port()
    cmd = [
        exe, "serve", "--data", str(data_dir), "--nbd", f"{HOST}:{nbd_port}", "--api", f"{HOST}:{api_port}",
        "--no-first-start",
    ]  # fmt: skip
    process = Process(cmd, workdir / "listing" / "daemon.log", thinblock_env())
    try:
        try:
            wait_for_port(api_port, process, timeout=60)
        except ServerError as exc:
            return [*figures, Figure(f"list {count:,} VVs through the REST API", _reason(exc))]
        base = f"http://{HOST}:{api_port}"
        with httpx.Client(base_url=base, timeout=60) as client:
            path = _find_vv_list_path(_openapi(client))
            times = []
            for _ in range(5):
                began = time.perf_counter()
                response = client.get(path).raise_for_status()
                listed = _count_items(response.json())
                times.append(time.perf_counter() - began)
        if listed < count:
            raise RuntimeError(f"GET {path} listed {listed} VVs, expected {count}")
        figures.append(
            Figure(
                f"list {count:,} VVs through the REST API (GET {path}, median of 5)",
                _ms(statistics.median(times)),
            )
        )
    finally:
        process.stop()
    return figures


async def _guarded(name: str, measurement: Any) -> list[Figure]:
    try:
        figures: list[Figure] = await measurement
    except Exception as exc:
        return [Figure(name, _reason(exc))]
    return figures


async def run_all(workdir: Path, regions: int, assignments: int, store: Path | None) -> list[Figure]:
    figures: list[Figure] = []
    figures += await _guarded("create a 64 TiB VV", measure_create_vv(workdir))
    figures += await _guarded("fresh-region assignments/s", measure_assignment_rate(workdir, assignments))
    figures += await _guarded(
        f"open a data dir of {regions:,} assigned regions", measure_million(workdir, regions, store)
    )
    figures += await _guarded("list 1,000 VVs through the REST API", measure_api_listing(workdir))
    return figures


def run(
    workdir: Path, *, quick: bool = False, regions: int | None = None, store: Path | None = None
) -> list[Figure]:
    """Every figure; ``quick`` uses 20,000 regions instead of a million (a smoke test)."""
    regions = regions or (20_000 if quick else 1_000_000)
    assignments = 2_000 if quick else 20_000
    workdir.mkdir(parents=True, exist_ok=True)
    return asyncio.run(run_all(workdir, regions, assignments, store))


def figures_table(figures: Sequence[Figure]) -> Table:
    rows = [[f.name, f.value, f.target, f.verdict] for f in figures]
    return Table("metadata scale", ["figure", "value", "target", "verdict"], rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.metadata_scale", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="20,000 regions instead of a million")
    parser.add_argument(
        "--regions", type=int, help="assigned regions in the store to open (default 1,000,000)"
    )
    parser.add_argument("--store", type=Path, help="build the store here and keep it; reused when it matches")
    parser.add_argument("--workdir", type=Path, help="scratch directory (default: a new temporary one)")
    parser.add_argument(
        "--output", type=Path, help="Markdown file (default bench/results/<date>-<host>-metadata.md)"
    )
    parser.add_argument("--no-write", action="store_true", help="print only, write no Markdown")
    parser.add_argument("--probe-open", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--probe-metadata", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.probe_open:
        print(json.dumps(asyncio.run(_probe_open(args.probe_open, args.probe_metadata))))
        return

    from rich.console import Console

    scratch = Path(tempfile.mkdtemp(prefix="thinblock-meta-", dir=args.workdir))
    try:
        figures = run(scratch, quick=args.quick, regions=args.regions, store=args.store)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    table = figures_table(figures)
    Console(width=None if sys.stdout.isatty() else 200).print(table.rich())
    if not args.no_write:
        write_results(
            f"# thinblock metadata scale\n\n{table.markdown()}\n", args.output, "metadata", quick=args.quick
        )


if __name__ == "__main__":
    main()
