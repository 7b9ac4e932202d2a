"""From repeated fio results to the one table: medians, ratios (to the best file-backed peer, to
nbdkit-null, write-back to write-through), the server's CPU time per GiB and peak memory,
targets; rendered with rich for the terminal and as Markdown for bench/results/; and the
machine description."""

from __future__ import annotations

import datetime
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .fio import FioResult

# Issue 15's targets, read off the run itself (ratios between servers measured side by side):
# 1. thinblock >= 1.0 of the best file-backed peer (the larger MiB/s of qemu-nbd and nbdkit-file on
#    that profile) on every profile, for RAID 0 and the default volume (RAID 1, write-through);
# 2. reads within 0.8 of nbdkit-null (no storage: the protocol's ceiling here) on the 1 MiB
#    sequential and 4 KiB random reads, for the same two;
# 3. a write-back volume never slower than its write-through twin (same RAID level, same PD mode).
FILE_PEERS = ("qemu-nbd", "nbdkit-file")
CEILING = "nbdkit-null"
PEER_TARGET = 1.0
CEILING_TARGET = 0.8
CEILING_PROFILES = ("seqread", "randread-4k")
TWIN_TARGET = 1.0
PEER_TARGETED = ("thinblock-raid0", "thinblock-raid1")
WRITEBACK_MARK = "-wb"


def write_through_twin(server: str) -> str | None:
    """The write-through server a write-back one is compared with: ``thinblock-raid1-wb`` ->
    ``thinblock-raid1``, ``thinblock-raid0-wb-direct`` -> ``thinblock-raid0-direct``."""
    if not server.startswith("thinblock-") or WRITEBACK_MARK not in server:
        return None
    return server.replace(WRITEBACK_MARK, "", 1)


@dataclass(frozen=True, slots=True)
class Cell:
    """Key of one line of the table."""

    connections: int
    profile: str
    server: str


@dataclass(frozen=True, slots=True)
class ServerCost:
    """What one fio run cost the server process: CPU seconds (user + system, all its threads)
    spent during the run, and its peak resident memory so far (VmHWM)."""

    cpu_seconds: float
    peak_rss_bytes: int


@dataclass(frozen=True, slots=True)
class Summary:
    """The median of the repetitions of one cell (each figure's own median)."""

    runs: int
    mib_s: float
    iops: float
    p99_us: float
    spread: float  # (max - min) / median of MiB/s: how much the repetitions disagree
    cpu_s_per_gib: float | None = None  # median of the runs' server CPU seconds per GiB moved
    peak_rss_bytes: int | None = None  # the largest peak resident size seen over the runs

    @classmethod
    def of(cls, results: Sequence[FioResult], costs: Sequence[ServerCost] = ()) -> Summary:
        if not results:
            raise ValueError("no results to summarise")
        mib = [r.mib_s for r in results]
        median_mib = statistics.median(mib)
        per_gib = [
            cost.cpu_seconds / (result.io_bytes / 2**30)
            for result, cost in zip(results, costs, strict=False)
            if result.io_bytes > 0
        ]
        return cls(
            runs=len(results),
            mib_s=median_mib,
            iops=statistics.median(r.iops for r in results),
            p99_us=statistics.median(r.p99_us for r in results),
            spread=(max(mib) - min(mib)) / median_mib if median_mib else 0.0,
            cpu_s_per_gib=statistics.median(per_gib) if per_gib else None,
            peak_rss_bytes=max((c.peak_rss_bytes for c in costs), default=None),
        )


@dataclass(frozen=True, slots=True)
class Check:
    """One target on one cell: what it compares with, the threshold, the measured ratio."""

    name: str  # "best peer", "null", "write-through"
    against: str  # the server (or servers) compared with
    target: float
    ratio: float | None  # None: not measured (a server of the pair did not run or failed)
    run_ratios: tuple[float, ...] = ()  # per-run ratios when both sides ran the same runs

    @property
    def met(self) -> bool:
        return self.ratio is not None and self.ratio >= self.target

    def describe(self) -> str:
        spread = ""
        if len(self.run_ratios) > 1:
            spread = f", runs {min(self.run_ratios):.2f}-{max(self.run_ratios):.2f}"
        return f"{self.name} {verdict(self.ratio, self.target)}{spread}"


@dataclass
class Results:
    """Everything one run measured, filled as it goes."""

    servers: list[str]
    profiles: list[str]
    connections: list[int]
    runs: dict[Cell, list[FioResult]] = field(default_factory=dict)
    costs: dict[Cell, list[ServerCost]] = field(default_factory=dict)
    errors: dict[Cell, list[str]] = field(default_factory=dict)

    def add(self, cell: Cell, result: FioResult, cost: ServerCost | None = None) -> None:
        self.runs.setdefault(cell, []).append(result)
        if cost is not None:
            self.costs.setdefault(cell, []).append(cost)

    def fail(self, cell: Cell, message: str) -> None:
        self.errors.setdefault(cell, []).append(message)

    def summary(self, cell: Cell) -> Summary | None:
        results = self.runs.get(cell)
        if not results:
            return None
        costs = self.costs.get(cell, [])
        return Summary.of(results, costs if len(costs) == len(results) else ())

    def _ratio_to(self, cell: Cell, other: str) -> float | None:
        mine = self.summary(cell)
        base = self.summary(Cell(cell.connections, cell.profile, other))
        if mine is None or base is None or base.mib_s == 0:
            return None
        return mine.mib_s / base.mib_s

    def best_peer(self, connections: int, profile: str) -> str | None:
        """The file-backed peer with the larger median MiB/s on this profile (None: neither ran)."""
        best: tuple[float, str] | None = None
        for peer in FILE_PEERS:
            summary = self.summary(Cell(connections, profile, peer))
            if summary is not None and (best is None or summary.mib_s > best[0]):
                best = (summary.mib_s, peer)
        return None if best is None else best[1]

    def peer_ratio(self, cell: Cell) -> float | None:
        """MiB/s of ``cell`` over the best file-backed peer's on the same profile and connections."""
        peer = self.best_peer(cell.connections, cell.profile)
        return None if peer is None else self._ratio_to(cell, peer)

    def ceiling_ratio(self, cell: Cell) -> float | None:
        """MiB/s of ``cell`` over nbdkit-null's (the protocol ceiling) on the same profile."""
        return self._ratio_to(cell, CEILING)

    def twin_ratio(self, cell: Cell) -> tuple[float | None, tuple[float, ...]]:
        """A write-back server over its write-through twin: the ratio of the medians, and the
        ratio of each run's pair (runs take turns, so run i of one was measured next to run i
        of the other) when both have all their runs."""
        twin = write_through_twin(cell.server)
        if twin is None:
            return None, ()
        ratio = self._ratio_to(cell, twin)
        mine = self.runs.get(cell, [])
        theirs = self.runs.get(Cell(cell.connections, cell.profile, twin), [])
        pairs: tuple[float, ...] = ()
        if mine and len(mine) == len(theirs):
            pairs = tuple(a.mib_s / b.mib_s for a, b in zip(mine, theirs, strict=True) if b.mib_s)
        return ratio, pairs

    def checks(self, cell: Cell) -> list[Check]:
        """The targets that apply to ``cell`` with their measured ratios (none for the peers)."""
        out: list[Check] = []
        if cell.server in PEER_TARGETED:
            peer = self.best_peer(cell.connections, cell.profile) or " / ".join(FILE_PEERS)
            out.append(Check("best peer", peer, PEER_TARGET, self.peer_ratio(cell)))
            if cell.profile in CEILING_PROFILES:
                out.append(Check("null", CEILING, CEILING_TARGET, self.ceiling_ratio(cell)))
        twin = write_through_twin(cell.server)
        if twin is not None:
            ratio, pairs = self.twin_ratio(cell)
            out.append(Check("write-through", twin, TWIN_TARGET, ratio, pairs))
        return out

    def cells(self) -> Iterable[Cell]:
        for connections in self.connections:
            for profile in self.profiles:
                for server in self.servers:
                    yield Cell(connections, profile, server)

    def target_misses(self) -> list[tuple[Cell, Check]]:
        """Every (cell, check) below its target or not measured."""
        return [(cell, check) for cell in self.cells() for check in self.checks(cell) if not check.met]


@dataclass
class Table:
    """A plain table of strings, rendered to rich or to Markdown."""

    title: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    right_aligned: set[int] = field(default_factory=set)
    separators: set[int] = field(default_factory=set)  # row indexes that start a new group

    def markdown(self) -> str:
        def escape(text: str) -> str:
            return " ".join(text.split()).replace("|", "\\|")  # one line per row

        lines = ["| " + " | ".join(escape(h) for h in self.headers) + " |"]
        lines.append(
            "|"
            + "|".join("---:" if i in self.right_aligned else "---" for i in range(len(self.headers)))
            + "|"
        )
        lines += ["| " + " | ".join(escape(c) for c in row) + " |" for row in self.rows]
        return "\n".join(lines)

    def rich(self) -> object:
        from rich.table import Table as RichTable

        table = RichTable(title=self.title)
        for index, header in enumerate(self.headers):
            table.add_column(header, justify="right" if index in self.right_aligned else "left")
        for index, row in enumerate(self.rows):
            table.add_row(*row, end_section=index + 1 in self.separators)
        return table


def _fmt(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def verdict(ratio: float | None, target: float) -> str:
    if ratio is None:
        return "not measured"
    if ratio >= target:
        return f"{ratio:.2f} met (>= {target:.1f})"
    return f"{ratio:.2f} MISSED by {(target - ratio) / target:.0%} (< {target:.1f})"


def results_table(results: Results) -> Table:
    headers = [
        "conns",
        "profile",
        "server",
        "MiB/s",
        "IOPS",
        "p99 us",
        "spread",
        "CPU s/GiB",
        "peak RSS MiB",
        "vs best peer",
        "vs null",
        "targets",
    ]
    table = Table("fio, median of each profile's runs", headers, right_aligned={3, 4, 5, 6, 7, 8, 9, 10})
    for cell in results.cells():
        if cell.server == results.servers[0] and table.rows:
            table.separators.add(len(table.rows))
        summary = results.summary(cell)
        row = [str(cell.connections), cell.profile, cell.server]
        if summary is None:
            errors = results.errors.get(cell, ["not run"])
            row += ["FAILED", "", "", "", "", "", "", "", errors[-1][:80]]
        else:
            peer, ceiling = results.peer_ratio(cell), results.ceiling_ratio(cell)
            spread = f"{summary.spread:.0%}" + (
                f" (n={summary.runs})" if summary.runs != _expected_runs(results) else ""
            )
            row += [
                _fmt(summary.mib_s, 1),
                _fmt(summary.iops),
                _fmt(summary.p99_us),
                spread,
                "-" if summary.cpu_s_per_gib is None else f"{summary.cpu_s_per_gib:.2f}",
                "-" if summary.peak_rss_bytes is None else _fmt(summary.peak_rss_bytes / 2**20),
                "-" if peer is None else f"{peer:.2f}",
                "-" if ceiling is None else f"{ceiling:.2f}",
                "; ".join(check.describe() for check in results.checks(cell)),
            ]
        table.rows.append(row)
    return table


def _expected_runs(results: Results) -> int:
    return max((len(r) for r in results.runs.values()), default=0)


# --- the machine ----------------------------------------------------------------------------------


def _first_line(cmd: Sequence[str]) -> str:
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    text = (proc.stdout or proc.stderr).strip()
    return text.splitlines()[0] if text else "unavailable"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def _filesystem(path: Path) -> str:
    line = _first_line(["sh", "-c", f"df -PT '{path}' | tail -1"])
    parts = line.split()
    return f"{parts[1]} ({parts[0]})" if len(parts) > 2 else line


def git_commit(root: Path) -> str:
    commit = _first_line(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"])
    status = subprocess.run(
        ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", "src"],
        capture_output=True,
        text=True,
        check=False,
    )
    return commit + (" (src/ has uncommitted changes)" if status.stdout.strip() else "")


def machine_description(workdir: Path, root: Path) -> list[tuple[str, str]]:
    fio_version = _first_line(["fio", "--version"])
    qemu_version = re.sub(r"^qemu-nbd\s+", "", _first_line(["qemu-nbd", "--version"]))
    return [
        ("host", socket.gethostname()),
        ("cores", f"{os.cpu_count()} x {_cpu_model()}"),
        ("memory", _memory()),
        ("kernel", f"{platform.system()} {platform.release()}"),
        ("python", f"{platform.python_implementation()} {sys.version.split()[0]}"),
        ("qemu-nbd", qemu_version),
        ("nbdkit", _first_line(["nbdkit", "--version"])),
        ("fio", fio_version),
        ("thinblock commit", git_commit(root)),
        ("work directory filesystem", _filesystem(workdir)),
    ]


RESULTS_DIR = Path(__file__).resolve().parent / "results"


def results_path(suffix: str = "", day: datetime.date | None = None) -> Path:
    """bench/results/<date>-<host>[-suffix].md"""
    day = day or datetime.date.today()
    name = f"{day.isoformat()}-{socket.gethostname()}" + (f"-{suffix}" if suffix else "")
    return RESULTS_DIR / f"{name}.md"


def write_results(text: str, output: Path | None, name: str, *, quick: bool = False) -> Path:
    """Write a benchmark's Markdown to ``output``, or to bench/results/<date>-<host>-NAME.md
    (NAME-quick for a quick run); says where."""
    path = output or results_path(name + ("-quick" if quick else ""))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"written: {path}")
    return path


def key_value_table(
    title: str, pairs: Sequence[tuple[str, str]], headers: tuple[str, str] = ("", "")
) -> Table:
    return Table(title, list(headers), [[k, v] for k, v in pairs])
