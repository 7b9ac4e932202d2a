"""The metadata store backends side by side (issue 11): thinblock on SQLite against thinblock on
PostgreSQL, in one run, on this machine.

    python -m bench.metadata_backends [--quick] [--repeat 3] [--regions 1000000] [--store DIR]

* **Fresh writes**: the paths that assign regions, through the daemon and fio (the NBD client
  of the other profiles), RAID 0 over two sparse file PDs, 1 MiB regions, a fresh data
  directory (and a fresh database) for every run:
  - ``seqwrite-fresh``: 1 MiB sequential writes into never-written space (``--size``, once);
  - ``randwrite-4k-fresh``: 4 KiB writes at random 1 MiB-aligned offsets of a 64 GiB volume
    (``--blockalign=1M --norandommap``, ``--number_ios`` of them, iodepth 16): each one assigns
    a region unless it hits one already written (about 3 % of them with the defaults).
  The two backends take turns within every run, the median of the runs is reported, and the
  PostgreSQL / SQLite ratio of the medians is checked against the target (>= 0.9).
* **One million assigned regions**: the store ``bench.metadata_scale`` builds (``--store DIR``
  reuses one), opened by a fresh process from SQLite, then copied into PostgreSQL
  (``thinblock metadata copy``'s code) and opened from there; median of three opens each, time
  and resident memory (targets on PostgreSQL: < 5 s, < 200 MiB).

PostgreSQL is a throwaway cluster of its own (tests/support/postgres.py: ``initdb`` + ``pg_ctl``
in a temporary directory, Unix socket only), with the server's default durability (``fsync``
on, every commit flushed), removed at the end.  ``python -m bench.run`` does not run this;
``make bench`` runs both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.support.postgres import PostgresCluster, start_cluster, unavailable_reason

from .fio import FioError, FioResult, parse_fio_json, profile_by_name, run_fio
from .metadata_scale import STORE_MARKER, build_store, probe_open
from .report import Table, write_results
from .servers import ServerError, ThinblockServer, serving

ROOT = Path(__file__).resolve().parent.parent
TARGET = 0.9  # PostgreSQL >= 0.9 of SQLite on both write profiles
OPEN_TARGET_S = 5.0
RSS_TARGET_MIB = 200.0
BACKENDS = ("sqlite", "postgresql")


@dataclass
class WriteFigures:
    """Medians over the runs of one (profile, backend)."""

    mib_s: list[float]
    iops: list[float]
    p99_us: list[float]


def randwrite_fresh_command(uri: str, ios: int) -> list[str]:
    """4 KiB writes at random 1 MiB-aligned offsets: (nearly) every one into a fresh region."""
    return [
        "fio", "--name=randwrite-4k-fresh", "--ioengine=nbd", f"--uri={uri}", "--size=64G",
        "--rw=randwrite", "--bs=4k", "--blockalign=1M", "--norandommap", "--randrepeat=0",
        f"--number_ios={ios}", "--iodepth=16", "--output-format=json",
    ]  # fmt: skip


def run_randwrite_fresh(uri: str, ios: int) -> FioResult:
    proc = subprocess.run(randwrite_fresh_command(uri, ios), capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise FioError(f"randwrite-4k-fresh: fio exited {proc.returncode}: {' | '.join(tail)}")
    return parse_fio_json(proc.stdout, "randwrite")


def _cluster() -> PostgresCluster:
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    return start_cluster(durable=True)


def fresh_database(cluster: PostgresCluster) -> Callable[[], str]:
    def make() -> str:
        name = "bench_" + uuid.uuid4().hex[:12]
        cluster.sql(f"CREATE DATABASE {name}")
        return cluster.url(name)

    return make


def measure_writes(
    cluster: PostgresCluster, workdir: Path, repeat: int, size: str, ios: int, say: Callable[[str], None]
) -> dict[tuple[str, str], WriteFigures]:
    servers = {
        "sqlite": ThinblockServer("thinblock-raid0-sqlite", 0, launch="daemon", export_size=64 * 2**30,
                                  pd_size=64 * 2**30),
        "postgresql": ThinblockServer("thinblock-raid0-postgresql", 0, launch="daemon", export_size=64 * 2**30,
                                      pd_size=64 * 2**30, metadata=fresh_database(cluster),
                                      metadata_name="PostgreSQL"),
    }  # fmt: skip
    figures: dict[tuple[str, str], WriteFigures] = {}
    seq = profile_by_name("seqwrite-fresh")
    for run in range(1, repeat + 1):
        for backend, server in servers.items():
            for profile in ("seqwrite-fresh", "randwrite-4k-fresh"):
                os.sync()  # the page cache as the previous instance left it must not throttle this one
                with serving(server, workdir, 1) as running:
                    if profile == "seqwrite-fresh":
                        result, _ = run_fio(seq, running.uri, size=size, runtime=0, timeout=900)
                    else:
                        result = run_randwrite_fresh(running.uri, ios)
                cell = figures.setdefault((profile, backend), WriteFigures([], [], []))
                cell.mib_s.append(result.mib_s)
                cell.iops.append(result.iops)
                cell.p99_us.append(result.p99_us)
                say(
                    f"run {run}/{repeat} {backend:10s} {profile:18s} {result.mib_s:8.1f} MiB/s"
                    f" {result.iops:8.0f} IOPS p99 {result.p99_us:8.0f} us"
                )
    return figures


def writes_table(figures: dict[tuple[str, str], WriteFigures]) -> tuple[Table, list[str]]:
    rows, verdicts = [], []
    for profile in ("seqwrite-fresh", "randwrite-4k-fresh"):
        medians = {}
        for backend in BACKENDS:
            cell = figures[(profile, backend)]
            median = statistics.median(cell.mib_s)
            medians[backend] = median
            runs = ", ".join(f"{v:.1f}" for v in cell.mib_s)
            rows.append(
                [
                    profile,
                    backend,
                    f"{median:.1f}",
                    f"{statistics.median(cell.iops):.0f}",
                    f"{statistics.median(cell.p99_us):.0f}",
                    runs,
                ]
            )
        ratio = medians["postgresql"] / medians["sqlite"] if medians["sqlite"] else 0.0
        met = ratio >= TARGET
        verdicts.append(
            f"{profile}: PostgreSQL / SQLite = {ratio:.2f} ({'met' if met else 'MISSED'}, target >= {TARGET})"
        )
        rows.append([profile, "PostgreSQL / SQLite", f"{ratio:.2f}", "", "", "met" if met else "missed"])
    table = Table(
        "fresh writes, RAID 0, 1 connection",
        ["profile", "metadata", "MiB/s", "IOPS", "p99 us", "runs (MiB/s)"],
        rows,
        right_aligned={2, 3, 4},
    )
    return table, verdicts


def measure_open(
    cluster: PostgresCluster, workdir: Path, regions: int, store: Path | None, say: Callable[[str], None]
) -> Table:
    """Open a store of ``regions`` assigned regions from SQLite, then from PostgreSQL."""
    from thinblock.metadata import open_store
    from thinblock.metadata.copy import copy_store
    from thinblock.pdheaders import GENERATION_KEY

    keep = store is not None
    store = store or workdir / "store"
    marker = store / STORE_MARKER
    built = json.loads(marker.read_text()) if keep and marker.exists() else {}
    if not (built.get("complete") and built.get("regions") == regions):
        if store.exists() and any(store.iterdir()):
            if not marker.exists():  # never delete a directory this benchmark did not build
                raise RuntimeError(f"{store} is not empty and holds no benchmark store ({STORE_MARKER})")
            shutil.rmtree(store)
        store.mkdir(parents=True, exist_ok=True)
        say(f"building a store of {regions:,} assigned regions")
        asyncio.run(build_store(store, regions))
    data = store / "data"
    rows = []
    opens: dict[str, list[dict[str, float]]] = {}
    opens["sqlite"] = [probe_open(data) for _ in range(3)]
    url = fresh_database(cluster)()
    began = time.perf_counter()
    report = copy_store(f"sqlite:{data}", url)
    copy_s = time.perf_counter() - began
    say(f"copied {report.counts['vv_map']:,} map rows into PostgreSQL in {copy_s:.1f} s")
    try:
        opens["postgresql"] = [probe_open(data, url) for _ in range(3)]
    finally:
        # Each open and close on PostgreSQL moved the store generation the PD headers carry; the
        # kept SQLite store takes the same number, or its next open (a later run) is refused as
        # older than the data.  Only this benchmark opens one data directory from two stores.
        pg = open_store(url)
        sqlite = open_store(f"sqlite:{data}")
        try:
            generation = pg.get_meta(GENERATION_KEY)
            if generation is not None:
                sqlite.set_meta(GENERATION_KEY, generation)
        finally:
            pg.close()
            sqlite.close()
    for backend in BACKENDS:
        runs = opens[backend]
        open_s = statistics.median(o["open_s"] for o in runs)
        rss = statistics.median(o["rss_kib"] for o in runs) / 1024
        peak = statistics.median(o["peak_kib"] for o in runs) / 1024
        base = statistics.median(o["import_rss_kib"] for o in runs) / 1024
        verdict = ""
        if backend == "postgresql":
            met = open_s < OPEN_TARGET_S and max(rss, peak) < RSS_TARGET_MIB
            verdict = f"{'met' if met else 'MISSED'} (< {OPEN_TARGET_S:.0f} s, < {RSS_TARGET_MIB:.0f} MiB)"
        rows.append(
            [
                backend,
                f"{open_s:.2f} s",
                f"{rss:.0f} MiB (peak {peak:.0f}, {base:.0f} after imports)",
                ", ".join(f"{o['open_s']:.2f}" for o in runs),
                verdict,
            ]
        )
    rows.append(["(copy into PostgreSQL)", f"{copy_s:.1f} s", "", "", ""])
    return Table(
        f"open {regions:,} assigned regions, fresh process, median of 3",
        ["metadata", "open", "resident memory", "runs (s)", "target"],
        rows,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.metadata_backends", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: 1 run, 64 MiB, 2,000 I/Os, 20,000 regions"
    )
    parser.add_argument("--repeat", type=int, help="runs of each write profile (default 3; quick 1)")
    parser.add_argument("--size", help="seqwrite-fresh --size (default 1G; quick 64M)")
    parser.add_argument("--ios", type=int, help="randwrite-4k-fresh writes (default 8192; quick 2000)")
    parser.add_argument(
        "--regions", type=int, help="assigned regions to open (default 1,000,000; quick 20,000)"
    )
    parser.add_argument("--store", type=Path, help="build the million-region store here and keep it")
    parser.add_argument("--no-open", action="store_true", help="skip the million-region open")
    parser.add_argument("--no-writes", action="store_true", help="skip the write profiles (the open only)")
    parser.add_argument("--workdir", type=Path, help="where data directories go (default: a temp dir)")
    parser.add_argument(
        "--output", type=Path, help="Markdown file (default bench/results/<date>-<host>-metadata-backends.md)"
    )
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    repeat = args.repeat or (1 if args.quick else 3)
    size = args.size or ("64M" if args.quick else "1G")
    ios = args.ios or (2000 if args.quick else 8192)
    regions = args.regions or (20_000 if args.quick else 1_000_000)

    def say(text: str) -> None:
        print(text, flush=True)

    started = time.time()
    load_start = os.getloadavg()
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="thinblock-backends-", dir=args.workdir))
    cluster = _cluster()
    try:
        table, verdicts = None, []
        if not args.no_writes:
            table, verdicts = writes_table(measure_writes(cluster, workdir, repeat, size, ios, say))
        open_table = None if args.no_open else measure_open(cluster, workdir, regions, args.store, say)
    except (ServerError, FioError) as exc:
        say(f"failed: {exc}")
        return 1
    finally:
        cluster.remove()
        shutil.rmtree(workdir, ignore_errors=True)
    load_end = os.getloadavg()
    text = [
        "# thinblock metadata backends: SQLite and PostgreSQL side by side",
        "",
        *(["> **Quick run** (smoke test); not a measurement to compare.", ""] if args.quick else []),
        f"Command: `python -m bench.metadata_backends {' '.join(argv or sys.argv[1:])}`".rstrip(),
        f"Started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))},"
        f" took {(time.time() - started) / 60:.1f} min. Load average (1/5/15 min) at the start"
        f" {' / '.join(f'{v:.1f}' for v in load_start)}, at the end {' / '.join(f'{v:.1f}' for v in load_end)}"
        f" ({os.cpu_count()} cores).",
        "",
        "PostgreSQL: a throwaway cluster on a Unix socket, server defaults (fsync on, synchronous"
        " commit); SQLite: the data directory's store (WAL, synchronous=NORMAL, fsynced at every flush).",
        "",
        *([table.markdown(), ""] if table is not None else []),
        *[f"- {v}" for v in verdicts],
        "",
    ]
    if open_table is not None:
        text += [open_table.markdown(), ""]
    print("\n".join(text))
    if not args.no_write:
        write_results("\n".join(text), args.output, "metadata-backends", quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
