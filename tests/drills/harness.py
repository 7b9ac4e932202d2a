"""What the drills share besides the daemon (tests/support/daemon.py starts, kills and restarts
it): set-up through the REST API, the offline check, fio, self-describing data patterns, a PD
that fails on demand, and the figures a drill reports.

Data pattern: a 4 KiB block is 128 copies of one 32-byte record naming who wrote it::

    magic "TBDRILL\\0" | volume tag (u32) | block index (u32) | write sequence (u64) | check (u64)

so a block read back tells whose data it is (volume, place, which write), and a block of another
volume, a stale block or a torn one is recognised as such, not merely as "different".
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.daemon import THINBLOCK_SCRIPT, Daemon, file_tail

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


# --- data patterns -------------------------------------------------------------------------------

BLOCK = 4096
MAGIC = b"TBDRILL\0"
_RECORD = struct.Struct("<8sIIQQ")
_ZERO_BLOCK = bytes(BLOCK)


def _check_word(tag: int, block: int, seq: int) -> int:
    return ((tag * 0x9E3779B1) ^ (block * 0x85EBCA77) ^ (seq * 0xC2B2AE3D) ^ 0x5BD1E995) & 0xFFFFFFFFFFFFFFFF


def block_data(tag: int, block: int, seq: int) -> bytes:
    """The 4 KiB that write ``seq`` of volume ``tag`` puts at block index ``block``."""
    return _RECORD.pack(MAGIC, tag, block, seq, _check_word(tag, block, seq)) * (BLOCK // _RECORD.size)


def run_data(tag: int, first_block: int, count: int, seq: int) -> bytes:
    return b"".join(block_data(tag, first_block + i, seq) for i in range(count))


@dataclass(frozen=True, slots=True)
class Decoded:
    """What a 4 KiB block read back holds: zeros, a whole block of the pattern, or garbage."""

    kind: str  # "zeros", "pattern", "garbage"
    tag: int = -1
    block: int = -1
    seq: int = -1

    def __str__(self) -> str:
        if self.kind == "pattern":
            return f"volume tag {self.tag} block {self.block} write {self.seq}"
        return self.kind


def decode_block(data: bytes | bytearray | memoryview) -> Decoded:
    data = bytes(data)
    if data == _ZERO_BLOCK:
        return Decoded("zeros")
    magic, tag, block, seq, check = _RECORD.unpack_from(data)
    if magic == MAGIC and check == _check_word(tag, block, seq) and data == block_data(tag, block, seq):
        return Decoded("pattern", tag, block, seq)
    return Decoded("garbage")


# --- the offline check and the store ---------------------------------------------------------


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll ``condition`` every 50 ms until it holds; AssertionError naming ``what`` after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def wait_for_more_writes(daemon: Daemon, names: list[str], timeout: float = 60.0) -> None:
    """Return once every volume in ``names`` has taken a write since this call (its ``writes``
    statistic grew): the load is really running on each of them."""

    # The API answers on the daemon's event loop, which the load keeps busy: on a loaded machine
    # one answer may take longer than api_get's own timeout, so the deadline here is what counts.
    def writes(n: str) -> int:
        return int(daemon.api_get(f"/volumes/{n}/stats", timeout=timeout)["writes"])

    before = {n: writes(n) for n in names}
    deadline = time.monotonic() + timeout
    waiting = set(names)
    while waiting and time.monotonic() < deadline:
        waiting = {n for n in waiting if writes(n) <= before[n]}
        time.sleep(0.02)
    assert not waiting, f"no writes reached {sorted(waiting)} in {timeout:.0f} s"


def thinblock_check(data_dir: Path) -> tuple[int, dict[str, Any]]:
    """The documented offline check, ``thinblock check --data DIR --json``: exit status and report."""
    result = subprocess.run(
        [THINBLOCK_SCRIPT, "check", "--json", "--data", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    if result.stdout.strip():
        return result.returncode, json.loads(result.stdout)
    return result.returncode, {"ok": False, "problems": [result.stderr.strip()], "counts": {}}


def duplicate_ld_regions(data_dir: Path) -> list[tuple[int, int, int]]:
    """LD regions assigned more than once, read straight from the store (read-only), by a query of
    our own rather than the daemon's check: (ld, region, times)."""
    import sqlite3

    uri = f"file:{data_dir / 'thinblock.db'}?mode=ro"
    db = sqlite3.connect(uri, uri=True)
    try:
        return [
            tuple(row)
            for row in db.execute(
                "SELECT ld_id, ld_region, COUNT(*) FROM vv_map NOT INDEXED GROUP BY ld_id, ld_region HAVING COUNT(*) > 1"
            )
        ]
    finally:
        db.close()


@dataclass
class Standard:
    """A storage layout for a drill: ``count`` sparse file PDs of ``size`` with ``chunklet`` chunklets."""

    count: int = 4
    size: int = 128 * MiB
    chunklet: int = 1 * MiB
    sizes: Sequence[int] = field(default_factory=tuple)  # per PD, overrides ``size``


def add_pds(daemon: Daemon, layout: Standard, directory: Path, first: int = 0) -> list[dict[str, Any]]:
    """Sparse file PDs ``pd{first}.img``... in ``directory``, added through the REST API."""
    sizes = list(layout.sizes) or [layout.size] * layout.count
    return [
        daemon.api_ok(
            "POST",
            "/pds",
            {"path": str(directory / f"pd{i}.img"), "size": size, "chunklet_size": layout.chunklet},
        )
        for i, size in enumerate(sizes, start=first)
    ]


# --- fio -----------------------------------------------------------------------------------------


def fio_argv(jobs: Sequence[tuple[str, str]], common: Sequence[str], output: Path) -> list[str]:
    """fio with the nbd engine: one job per (name, nbd URI), ``common`` options for all."""
    argv = ["fio", "--output-format=json", f"--output={output}", "--ioengine=nbd", *common]
    for name, uri in jobs:
        argv += [f"--name={name}", f"--uri={uri}"]
    return argv


@dataclass
class FioResult:
    returncode: int
    report: dict[str, Any]
    stderr: str

    def job(self, name: str) -> dict[str, Any]:
        for job in self.report.get("jobs", []):
            if job.get("jobname") == name:
                return dict(job)
        raise KeyError(name)

    def errors(self) -> dict[str, int]:
        return {j["jobname"]: int(j.get("error", 0)) for j in self.report.get("jobs", [])}

    def bytes_read(self) -> int:
        return sum(int(j["read"]["io_bytes"]) for j in self.report.get("jobs", []))

    def bytes_written(self) -> int:
        return sum(int(j["write"]["io_bytes"]) for j in self.report.get("jobs", []))


def read_fio_output(proc_rc: int, output: Path, stderr: str) -> FioResult:
    report: dict[str, Any] = {}
    text = output.read_text(errors="replace") if output.exists() else ""
    # fio may print warnings before the JSON document.
    start = text.find("{")
    if start >= 0:
        with contextlib.suppress(ValueError):
            report = json.loads(text[start:])
    return FioResult(proc_rc, report, stderr + text[:start])


def run_fio(argv: list[str], output: Path, cwd: Path, timeout: float = 600) -> FioResult:
    result = subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    return read_fio_output(result.returncode, output, result.stderr)


# --- figures -------------------------------------------------------------------------------------


@dataclass
class Figures:
    """What a drill did, for its summary line and docs/reliability.md."""

    drill: str
    rounds: int = 0
    bytes_verified: int = 0
    faults: int = 0
    data_lost: int = 0
    notes: dict[str, Any] = field(default_factory=dict)

    def report(self) -> None:
        line = {
            "drill": self.drill,
            "rounds": self.rounds,
            "bytes_verified": self.bytes_verified,
            "faults_injected": self.faults,
            "data_lost": self.data_lost,
            **self.notes,
        }
        print("DRILL-FIGURES " + json.dumps(line), file=sys.stderr)
        path = os.environ.get("THINBLOCK_DRILL_FIGURES")
        if path:
            with open(path, "a") as f:
                f.write(json.dumps(line) + "\n")


def setup_pool(
    daemon: Daemon, name: str, raid: int, *, region: int = 64 * KiB, increment: int = 8 * MiB, **extra: Any
) -> Any:
    body = {"name": name, "raid": raid, "region_size": region, "growth_increment": increment, **extra}
    return daemon.api_ok("POST", "/pools", body)


def setup_volume(
    daemon: Daemon, name: str, pool: str, size: int, cache: str = "writethrough", **extra: Any
) -> Any:
    body = {"name": name, "pool": pool, "size": size, "cache_mode": cache, **extra}
    return daemon.api_ok("POST", "/volumes", body)


# --- a PD that fails on demand -------------------------------------------------------------------


class FuseMountFailed(Exception):
    """nbdfuse did not mount the error-injecting file; the message carries the end of its log."""


class ErrorInjectingFile:
    """A file whose reads and writes start failing with EIO when told to: nbdkit's file plugin behind
    its error filter (``error-file=``: errors only while the trigger file exists), mounted as a
    regular file with nbdfuse.  thinblock sees an ordinary file that suddenly returns I/O errors,
    as a dying disk does."""

    def __init__(self, directory: Path, size: int) -> None:
        self.directory = directory
        self.size = size
        self.backing = directory / "fuse-backing.img"
        self.mountpoint = directory / "fuse-mnt"
        self.trigger = directory / "fuse-fail-now"
        self.path = self.mountpoint / "pd.img"
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def unavailable() -> str | None:
        """Why this machine cannot do it (no FUSE device, no nbdfuse or nbdkit), or None."""
        import shutil

        for tool in ("nbdfuse", "nbdkit"):
            if shutil.which(tool) is None:
                return f"{tool} is not installed"
        if not os.path.exists("/dev/fuse"):
            return "no /dev/fuse"
        return None

    def start(self, timeout: float = 20.0) -> None:
        with self.backing.open("wb") as f:
            f.truncate(self.size)
        self.mountpoint.mkdir(exist_ok=True)
        argv = [
            "nbdfuse",
            str(self.path),
            "--command",
            "nbdkit",
            "-s",
            "--filter=error",
            "file",
            str(self.backing),
        ]
        argv += ["error=EIO", "error-rate=100%", f"error-file={self.trigger}"]
        with (self.directory / "nbdfuse.log").open("wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_size == self.size:
                    return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        log_text = file_tail(self.directory / "nbdfuse.log", 30)
        self.close()
        raise FuseMountFailed(f"nbdfuse did not mount {self.path}: {log_text}")

    def fail(self) -> None:
        """From now on every I/O on the file returns EIO."""
        self.trigger.touch()

    def close(self) -> None:
        """Unmount (the daemon using the file must be gone) and make sure nbdfuse has exited."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            result = subprocess.run(["umount", str(self.mountpoint)], capture_output=True, timeout=30)
            if result.returncode != 0:
                subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True, timeout=30)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None


def run_in_terminal(argv: Sequence[str], timeout: float = 300.0) -> tuple[int, str]:
    """Run a command with a pseudo-terminal as its stdout and stderr (as an administrator at a
    terminal sees it: progress bars included); exit status and output without ANSI sequences."""
    import pty
    import re
    import select

    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            list(argv), stdout=slave, stderr=slave, stdin=subprocess.DEVNULL, close_fds=True
        )
    finally:
        os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the other side is closed
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = b"".join(chunks).decode(errors="replace")
    return rc, re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r", "\n", text)
