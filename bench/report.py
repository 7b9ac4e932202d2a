"""From repeated fio results to the one table: medians, ratios to qemu-nbd, targets; rendered
with rich for the terminal and as Markdown for bench/results/; and the machine description."""

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

BASELINE = "qemu-nbd"
# Issue 5: thinblock / qemu-nbd >= 1.0 on every profile for the RAID 0 pool; the RAID 1 pool
# within 0.8 of that (read here as: its own ratio to qemu-nbd >= 0.8).
TARGETS: dict[str, float] = {"thinblock-raid0": 1.0, "thinblock-raid1": 0.8}


@dataclass(frozen=True, slots=True)
class Cell:
    """Key of one line of the table."""

    connections: int
    profile: str
    server: str


@dataclass(frozen=True, slots=True)
class Summary:
    """The median of the repetitions of one cell (each figure's own median)."""

    runs: int
    mib_s: float
    iops: float
    p99_us: float
    spread: float  # (max - min) / median of MiB/s: how much the repetitions disagree

    @classmethod
    def of(cls, results: Sequence[FioResult]) -> Summary:
        if not results:
            raise ValueError("no results to summarise")
        mib = [r.mib_s for r in results]
        median_mib = statistics.median(mib)
        return cls(
            runs=len(results),
            mib_s=median_mib,
            iops=statistics.median(r.iops for r in results),
            p99_us=statistics.median(r.p99_us for r in results),
            spread=(max(mib) - min(mib)) / median_mib if median_mib else 0.0,
        )


@dataclass
class Results:
    """Everything one run measured, filled as it goes."""

    servers: list[str]
    profiles: list[str]
    connections: list[int]
    runs: dict[Cell, list[FioResult]] = field(default_factory=dict)
    errors: dict[Cell, list[str]] = field(default_factory=dict)

    def add(self, cell: Cell, result: FioResult) -> None:
        self.runs.setdefault(cell, []).append(result)

    def fail(self, cell: Cell, message: str) -> None:
        self.errors.setdefault(cell, []).append(message)

    def summary(self, cell: Cell) -> Summary | None:
        results = self.runs.get(cell)
        return Summary.of(results) if results else None

    def ratio(self, cell: Cell) -> float | None:
        """MiB/s of ``cell`` over qemu-nbd's on the same profile and connections (same run)."""
        mine = self.summary(cell)
        base = self.summary(Cell(cell.connections, cell.profile, BASELINE))
        if mine is None or base is None or base.mib_s == 0:
            return None
        return mine.mib_s / base.mib_s

    def p99_ratio(self, cell: Cell) -> float | None:
        mine = self.summary(cell)
        base = self.summary(Cell(cell.connections, cell.profile, BASELINE))
        if mine is None or base is None or base.p99_us == 0:
            return None
        return mine.p99_us / base.p99_us

    def cells(self) -> Iterable[Cell]:
        for connections in self.connections:
            for profile in self.profiles:
                for server in self.servers:
                    yield Cell(connections, profile, server)

    def target_misses(self) -> list[tuple[Cell, float, float | None]]:
        """(cell, target, ratio or None when not measured) for every thinblock cell below its target."""
        misses = []
        for cell in self.cells():
            target = TARGETS.get(cell.server)
            if target is None:
                continue
            ratio = self.ratio(cell)
            if ratio is None or ratio < target:
                misses.append((cell, target, ratio))
        return misses


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
        return f"met (>= {target:.1f})"
    return f"MISSED by {(target - ratio) / target:.0%} (< {target:.1f})"


def results_table(results: Results) -> Table:
    headers = [
        "conns",
        "profile",
        "server",
        "MiB/s",
        "IOPS",
        "p99 us",
        "spread",
        "vs qemu-nbd",
        "p99 vs qemu",
        "target",
    ]
    table = Table("fio, median of each profile's runs", headers, right_aligned={3, 4, 5, 6, 7, 8})
    for cell in results.cells():
        if cell.server == results.servers[0] and table.rows:
            table.separators.add(len(table.rows))
        summary = results.summary(cell)
        row = [str(cell.connections), cell.profile, cell.server]
        if summary is None:
            errors = results.errors.get(cell, ["not run"])
            row += ["FAILED", "", "", "", "", "", errors[-1][:80]]
        else:
            ratio, p99_ratio = results.ratio(cell), results.p99_ratio(cell)
            spread = f"{summary.spread:.0%}" + (
                f" (n={summary.runs})" if summary.runs != _expected_runs(results) else ""
            )
            row += [
                _fmt(summary.mib_s, 1),
                _fmt(summary.iops),
                _fmt(summary.p99_us),
                spread,
                "-" if ratio is None else f"{ratio:.2f}",
                "-" if p99_ratio is None else f"{p99_ratio:.2f}",
                verdict(ratio, TARGETS[cell.server]) if cell.server in TARGETS else "",
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


def key_value_table(
    title: str, pairs: Sequence[tuple[str, str]], headers: tuple[str, str] = ("", "")
) -> Table:
    return Table(title, list(headers), [[k, v] for k, v in pairs])
