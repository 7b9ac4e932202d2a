"""thinblock side by side with qemu-nbd and nbdkit (issue 5).

    python -m bench.run [--quick] [--servers ...] [--repeat 3] [--runtime 8]

One after the other on this machine: thinblock (RAID 0 and RAID 1 pools, write-through and
write-back volumes, and with --direct-io the same over PDs opened for direct I/O), qemu-nbd on
a fresh qcow2 image, nbdkit file on a fresh sparse raw file, nbdkit null.  Every repetition
starts every server afresh (new image / file / data directory) and runs the five standard fio
profiles in order against it, so seqwrite-fresh always writes never-written space; the
servers take turns within each repetition, so drift of this machine's speed touches all of
them alike.  Then the same with 4 connections.  Prints one table and writes it, with the
machine's description and the metadata-scale figures, to bench/results/.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from .fio import PROFILE_NAMES, FioError, profile_by_name, run_fio
from .report import (
    RESULTS_DIR,
    Cell,
    Results,
    ServerCost,
    key_value_table,
    machine_description,
    results_path,
    results_table,
)
from .servers import (
    DEFAULT_SERVER_KEYS,
    SERVER_KEYS,
    Server,
    ServerError,
    all_servers,
    process_cpu_seconds,
    process_peak_rss,
    serving,
)

ROOT = Path(__file__).resolve().parent.parent
ALIASES = {
    "thinblock": tuple(k for k in DEFAULT_SERVER_KEYS if k.startswith("thinblock-")),
    "direct": tuple(k for k in SERVER_KEYS if k.endswith("-direct")),
    "peers": ("qemu-nbd", "nbdkit-file", "nbdkit-null"),
}


def _server_keys(values: list[str]) -> list[str]:
    wanted: list[str] = []
    for value in values:
        for name in value.split(","):
            name = name.strip()
            for key in ALIASES.get(name, (name,)):
                if key not in SERVER_KEYS:
                    raise argparse.ArgumentTypeError(
                        f"unknown server {key!r} (known: {', '.join(SERVER_KEYS)})"
                    )
                if key not in wanted:
                    wanted.append(key)
    return [key for key in SERVER_KEYS if key in wanted]  # always in the standard order


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test of the harness: --runtime 1 --size 64M --repeat 1, few regions",
    )
    parser.add_argument(
        "--servers",
        nargs="+",
        help=f"subset of: {' '.join(SERVER_KEYS)} (or 'thinblock', 'direct', 'peers'); comma or "
        "space separated (default: all but the -direct ones)",
    )
    parser.add_argument(
        "--direct-io",
        action="store_true",
        help="also run thinblock with its PDs opened for direct I/O (the -direct servers)",
    )
    parser.add_argument(
        "--repeat", type=int, help="runs of each profile; the median is reported (default 3; quick 1)"
    )
    parser.add_argument("--runtime", type=int, help="seconds of each time-based profile (default 8; quick 1)")
    parser.add_argument("--size", help="fio --size, per connection (default 1G; quick 64M)")
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 4], help="default: 1 4")
    parser.add_argument("--profiles", nargs="+", choices=PROFILE_NAMES, default=list(PROFILE_NAMES))
    parser.add_argument(
        "--thinblock-launch",
        choices=("auto", "daemon", "engine"),
        default="daemon",
        help="start thinblock as the daemon + CLI (default: a daemon that does not start is a "
        "failed server), with bench.launch_thinblock, or the daemon falling back to the launcher "
        "(auto: such rows are flagged FALLBACK in the report)",
    )
    parser.add_argument(
        "--thinblock-loop",
        choices=("uvloop", "asyncio"),
        help="thinblock's event loop (default: the daemon's default; the launcher's is uvloop)",
    )
    parser.add_argument("--no-metadata", action="store_true", help="skip the metadata-scale figures")
    parser.add_argument(
        "--regions", type=int, help="assigned regions for the open figure (default 1,000,000)"
    )
    parser.add_argument("--store", type=Path, help="keep the million-region store here and reuse it")
    parser.add_argument("--workdir", type=Path, help="where images and data dirs go (default: a temp dir)")
    parser.add_argument("--output", type=Path, help="Markdown file (default bench/results/<date>-<host>.md)")
    parser.add_argument("--no-write", action="store_true", help="print only, write no Markdown")
    args = parser.parse_args(argv)
    wanted = args.servers or list(DEFAULT_SERVER_KEYS)
    if args.direct_io:
        wanted = [*wanted, "direct"]
    try:
        args.servers = _server_keys(wanted)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    args.repeat = args.repeat if args.repeat is not None else (1 if args.quick else 3)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    args.runtime = args.runtime or (1 if args.quick else 8)
    args.size = args.size or ("64M" if args.quick else "1G")
    return args


def run_profiles(args: argparse.Namespace, servers: list[Server], workdir: Path, console: Console) -> Results:
    results = Results([s.key for s in servers], list(args.profiles), list(args.connections))
    profiles = [profile_by_name(name) for name in args.profiles]
    broken: dict[str, str] = {}  # servers that failed to start: not retried
    for connections in args.connections:
        for repetition in range(1, args.repeat + 1):
            for server in servers:
                console.print(f"[bold]{connections} conn, run {repetition}/{args.repeat}: {server.key}[/]")
                if server.key in broken:
                    for profile in profiles:
                        results.fail(Cell(connections, profile.name, server.key), broken[server.key])
                    console.print(f"  skipped: {broken[server.key]}")
                    continue
                # Every server starts from the same page cache state: the dirty data the previous
                # server left (its files are deleted, but writeback may still be running) would
                # otherwise throttle this one's writes.  sync(2) waits until it is on disk.
                os.sync()
                try:
                    with serving(server, workdir, connections) as running:
                        if getattr(server, "fell_back", False):
                            console.print(
                                f"  [bold red]FALLBACK: {server.key} runs the engine launcher, not the "
                                f"daemon: {getattr(server, 'fallback_reason', '')}[/]"
                            )
                        for profile in profiles:
                            cell = Cell(connections, profile.name, server.key)
                            timeout = args.runtime * 3 + 120 if profile.time_based else 900
                            cpu_before = process_cpu_seconds(running.pid)
                            try:
                                result, _ = run_fio(
                                    profile, running.uri, size=args.size, runtime=args.runtime,
                                    connections=connections, timeout=timeout,
                                )  # fmt: skip
                            except FioError as exc:
                                results.fail(cell, str(exc))
                                console.print(f"  [red]{profile.name}: {exc}[/]")
                                continue
                            cpu_after = process_cpu_seconds(running.pid)
                            peak = process_peak_rss(running.pid)
                            cost = None
                            if cpu_before is not None and cpu_after is not None and peak is not None:
                                cost = ServerCost(cpu_after - cpu_before, peak)
                            results.add(cell, result, cost)
                            console.print(
                                f"  {profile.name:15s} {result.mib_s:9.1f} MiB/s {result.iops:10.0f} IOPS"
                                f"  p99 {result.p99_us:8.0f} us"
                                + (
                                    ""
                                    if cost is None
                                    else f"  CPU {cost.cpu_seconds / max(result.io_bytes / 2**30, 1e-9):6.2f} s/GiB"
                                    f"  peak RSS {cost.peak_rss_bytes / 2**20:6.0f} MiB"
                                )
                            )
                except (ServerError, OSError, subprocess.SubprocessError) as exc:
                    broken[server.key] = f"did not start: {exc}"[:400]
                    for profile in profiles:
                        results.fail(Cell(connections, profile.name, server.key), broken[server.key])
                    console.print(f"  [red]{broken[server.key]}[/]")
    return results


def targets_summary(results: Results) -> list[str]:
    """One line per thinblock server: its targets met, or each miss (profile, connections, ratio)."""
    lines = []
    for server in results.servers:
        cells = [c for c in results.cells() if c.server == server]
        checks = [(cell, check) for cell in cells for check in results.checks(cell)]
        if not checks:
            continue
        misses = [(cell, check) for cell, check in checks if not check.met]
        if not misses:
            lines.append(f"{server}: all {len(checks)} targets met.")
            continue
        lines.append(f"{server}: {len(misses)} of {len(checks)} targets missed:")
        for cell, check in misses:
            lines.append(
                f"  - {cell.profile}, {cell.connections} conn, vs {check.against}: {check.describe()}"
            )
    if not lines:
        lines.append("No thinblock server with a target in this run.")
    return lines


def markdown_report(
    args: argparse.Namespace,
    argv: list[str],
    started: datetime.datetime,
    seconds: float,
    machine: list[tuple[str, str]],
    servers: list[Server],
    results: Results,
    metadata_markdown: str | None,
    load: tuple[tuple[float, ...], tuple[float, ...]],
) -> str:
    host = dict(machine)["host"]
    out = [f"# thinblock benchmark: {started:%Y-%m-%d} on {host}", ""]
    if args.quick:
        out += ["> **Quick run** (smoke test: short runtime, small size); not a measurement to compare.", ""]
    fell_back = [server.key for server in servers if getattr(server, "fell_back", False)]
    if fell_back:
        out += [
            f"> **FALLBACK**: {', '.join(fell_back)} could not start as the daemon and ran the engine "
            "launcher (bench.launch_thinblock) instead: their rows do not measure the daemon (see Servers).",
            "",
        ]
    out += [
        f"Command: `{' '.join(['python -m bench.run', shlex.join(argv)]).strip()}`",
        f"Started {started:%Y-%m-%d %H:%M:%S}, took {seconds / 60:.1f} min.",
        "",
        "## Machine",
        "",
        key_value_table("machine", machine, ("item", "value")).markdown(),
        "",
        "## Servers",
        "",
        *[f"- **{server.key}**: {server.description}" for server in servers],
        "",
        "## Settings",
        "",
        f"- fio `--size={args.size}` per connection, time-based profiles `--runtime={args.runtime}`, "
        f"{args.repeat} runs of each profile (median reported); connections: "
        f"{', '.join(str(c) for c in args.connections)}.",
        "- Every run starts every server afresh; within a run the servers take turns.",
        f"- Load average (1, 5, 15 min) at the start: {_load(load[0])}; at the end: {_load(load[1])} "
        f"(on {os.cpu_count()} cores: more than that means something else was running).",
        "",
        "## fio profiles",
        "",
        results_table(results).markdown(),
        "",
        "MiB/s, IOPS and p99 (fio's completion latency, microseconds) are each the median of the runs; "
        "*spread* is (max - min) / median of MiB/s over the runs; *CPU s/GiB* is the server "
        "process's CPU time (user + system, all threads) during the profile per GiB fio moved "
        "(median of the runs); *peak RSS* its largest VmHWM; *vs best peer* is MiB/s over the "
        "larger of qemu-nbd's and nbdkit-file's on the same profile in this run; *vs null* over "
        "nbdkit-null's (higher is better). *targets* (issue 15): thinblock-raid0 and -raid1 >= 1.0 "
        "of the best peer everywhere and >= 0.8 of null on seqread and randread-4k; a write-back "
        "server >= 1.0 of its write-through twin, with the per-run ratios (runs take turns, so "
        "run i of one ran next to run i of the other).",
        "",
        "## Targets",
        "",
        *[line if line.startswith("  ") else f"- {line}" for line in targets_summary(results)],
        "",
    ]
    if metadata_markdown is not None:
        out += ["## Metadata scale", "", metadata_markdown, ""]
    failures = [(cell, msgs) for cell, msgs in results.errors.items()]
    if failures:
        out += ["## Failures", ""]
        for cell, messages in failures:
            out.append(f"- {cell.server}, {cell.profile}, {cell.connections} conn: {messages[-1]}")
        out.append("")
    return "\n".join(out)


def _load(values: tuple[float, ...]) -> str:
    return " / ".join(f"{v:.1f}" for v in values)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    # SIGTERM (kill PID) ends the run as Ctrl-C does: the servers are stopped and the work
    # directory (images, PD files: gigabytes) deleted by the finally blocks, not left behind.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    # Piped to a file or a CI log, rich would squeeze the table into 80 columns.
    console = Console(width=None if sys.stdout.isatty() else 200)
    servers = [s for s in all_servers(args.thinblock_launch, args.thinblock_loop) if s.key in args.servers]
    started = datetime.datetime.now()
    began = time.monotonic()
    load_start = os.getloadavg()
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="thinblock-bench-", dir=args.workdir))
    try:
        machine = machine_description(workdir, ROOT)
        results = run_profiles(args, servers, workdir, console)
        load_end = os.getloadavg()
        metadata_markdown = None
        metadata_table = None
        if not args.no_metadata:
            from .metadata_scale import figures_table, run

            console.print("[bold]metadata scale[/]")
            figures = run(workdir / "metadata", quick=args.quick, regions=args.regions, store=args.store)
            metadata_table = figures_table(figures)
            metadata_markdown = metadata_table.markdown()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    seconds = time.monotonic() - began

    console.print(key_value_table("machine", machine, ("item", "value")).rich())
    console.print(results_table(results).rich())
    for line in targets_summary(results):
        console.print(line)
    if metadata_table is not None:
        console.print(metadata_table.rich())

    if not args.no_write:
        text = markdown_report(
            args, argv, started, seconds, machine, servers, results, metadata_markdown, (load_start, load_end)
        )
        output = args.output or results_path("quick" if args.quick else "", started.date())
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
        written = [output]
        if not args.quick and args.output is None:
            latest = RESULTS_DIR / "latest.md"
            latest.write_text(text)
            written.append(latest)
        console.print(
            "written: "
            + ", ".join(str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p) for p in written)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
