"""The standard fio profiles (../shared/bench/fio-profiles.sh) as data, their command lines,
and the parsing of fio's JSON output.

The command lines are those of fio-profiles.sh, with three additions, none of which changes
the I/O of a one-connection run:

* ``--unified_rw_reporting=both`` on the mixed profile only: fio then also reports the read
  and write halves together ("mixed"), so MiB/s, IOPS and p99 cover the whole mix (the shell
  script prints the read half only).
* with several connections: ``--numjobs=N --group_reporting`` (as the issue asks) and
  ``--offset_increment=SIZE``, so each connection works on its own SIZE slice of the export:
  ``seqwrite-fresh`` then writes fresh space on every connection, instead of four
  connections racing over the same first gigabyte.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    rw: str  # fio --rw
    block_size: str  # fio --bs
    iodepth: int
    time_based: bool  # False: write/read --size once (the sequential ones); True: --runtime seconds
    summary: str  # one line for the README and the report


# In the order fio-profiles.sh runs them: seqread reads what seqwrite-fresh wrote.
PROFILES: tuple[Profile, ...] = (
    Profile("seqwrite-fresh", "write", "1M", 8, False, "sequential 1 MiB writes into never-written space"),
    Profile("seqread", "read", "1M", 8, False, "sequential 1 MiB reads of what seqwrite-fresh wrote"),
    Profile("randwrite-4k", "randwrite", "4k", 16, True, "random 4 KiB writes over the written range"),
    Profile("randread-4k", "randread", "4k", 16, True, "random 4 KiB reads over the written range"),
    Profile("randrw-64k", "randrw", "64k", 8, True, "random 64 KiB, half reads half writes"),
)
PROFILE_NAMES = tuple(p.name for p in PROFILES)


def profile_by_name(name: str) -> Profile:
    for profile in PROFILES:
        if profile.name == name:
            return profile
    raise KeyError(f"unknown profile {name!r} (known: {', '.join(PROFILE_NAMES)})")


def fio_command(
    profile: Profile, uri: str, *, size: str, runtime: int, connections: int = 1, fio: str = "fio"
) -> list[str]:
    """The fio command line of one profile against one NBD URI (fio-profiles.sh's ``run``)."""
    cmd = [
        fio,
        f"--name={profile.name}",
        "--ioengine=nbd",
        f"--uri={uri}",
        f"--size={size}",
        f"--rw={profile.rw}",
        f"--bs={profile.block_size}",
        f"--iodepth={profile.iodepth}",
    ]
    if profile.time_based:
        cmd += [f"--runtime={runtime}", "--time_based"]
    if profile.rw == "randrw":
        cmd.append("--unified_rw_reporting=both")
    if connections > 1:
        cmd += [f"--numjobs={connections}", "--group_reporting", f"--offset_increment={size}"]
    cmd.append("--output-format=json")
    return cmd


@dataclass(frozen=True, slots=True)
class FioResult:
    """One fio run of one profile, all connections together."""

    bw_bytes: float  # bytes per second
    iops: float
    p99_us: float  # 99th percentile completion latency (fio clat), microseconds
    io_bytes: int  # bytes moved, to tell a run that did nothing from a slow one

    @property
    def mib_s(self) -> float:
        return self.bw_bytes / 2**20


class FioError(RuntimeError):
    pass


def load_fio_json(text: str) -> dict[str, Any]:
    """fio's JSON document out of its stdout: the nbd engine prints "fio: connected to NBD
    server" lines (one per connection) before it, so decode from the first brace."""
    start = text.find("{")
    if start < 0:
        raise FioError(f"no JSON in fio output: {text[:200]!r}")
    document, _ = json.JSONDecoder().raw_decode(text, start)
    if not isinstance(document, dict):
        raise FioError("fio output is not a JSON object")
    return document


def _side(job: dict[str, Any], rw: str) -> dict[str, Any]:
    if rw == "randrw" or rw == "rw":
        mixed = job.get("mixed")
        if mixed is None:
            raise FioError("mixed profile without a 'mixed' section (needs --unified_rw_reporting=both)")
        return dict(mixed)
    return dict(job["write"] if rw in ("write", "randwrite") else job["read"])


def parse_fio_json(text: str, rw: str) -> FioResult:
    """The figures of a (group-reported) fio run; ``rw`` is the profile's --rw."""
    document = load_fio_json(text)
    jobs = document.get("jobs") or []
    if len(jobs) != 1:
        raise FioError(f"expected one (group-reported) job, got {len(jobs)}")
    job = jobs[0]
    if job.get("error"):
        raise FioError(f"fio job failed with error {job['error']}")
    side = _side(job, rw)
    percentiles = side.get("clat_ns", {}).get("percentile", {})
    p99_ns = float(percentiles.get("99.000000", 0.0))
    return FioResult(
        bw_bytes=float(side["bw_bytes"]),
        iops=float(side["iops"]),
        p99_us=p99_ns / 1000,
        io_bytes=int(side["io_bytes"]),
    )


def run_fio(
    profile: Profile,
    uri: str,
    *,
    size: str,
    runtime: int,
    connections: int = 1,
    timeout: float = 600,
) -> tuple[FioResult, str]:
    """Run one profile; returns the parsed figures and the raw JSON text."""
    cmd = fio_command(profile, uri, size=size, runtime=runtime, connections=connections)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise FioError(f"{profile.name}: fio did not finish within {timeout:.0f} s") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise FioError(f"{profile.name}: fio exited {proc.returncode}: {' | '.join(tail)}")
    result = parse_fio_json(proc.stdout, profile.rw)
    if result.io_bytes <= 0:
        raise FioError(f"{profile.name}: fio moved no data")
    return result, proc.stdout
