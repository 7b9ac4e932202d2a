"""iSCSI benchmark: ``qemu-img bench`` against thinblock's iSCSI target, tgtd (Debian ``tgt``) on a
sparse file, and thinblock's own NBD export of the same volume, interleaved in one run.

    .venv/bin/python -m bench.iscsi [--count 20000] [--size 1G] [--rounds 3] [--workdir DIR]

Profiles (qemu-img bench, queue depth 16): 4 KiB random-ish reads and writes (qemu-img bench
walks the image with a 4 KiB step, wrapping around) and 1 MiB sequential reads and writes.
Every target is written once whole before the read profiles, so reads read data, not holes:
with a byte pattern (``--pattern``), since qemu-img bench writes zeros by default, which
thinblock's zero detection keeps as holes and qemu's iSCSI driver then answers itself (LBPRZ
and GET LBA STATUS say they read zeros), without asking the target; every write profile
writes the pattern too.

The time is qemu-img's own ("Run completed in N seconds"): the requests alone, not the
process start, the login and the capacity queries, which at a few thousand requests were
a third of the wall time and made every target look alike.  Each profile runs ``--rounds``
times, the three targets one after the other in each round, and the median is kept: the
machine this runs on is shared and noisy, so compare figures of one run, never across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PATTERN = "--pattern=0x5a"  # not zeros: see the module docstring
PROFILES = [
    ("4k-read", ["-s", "4k", "-d", "16"], False, 1),
    ("4k-write", ["-s", "4k", "-d", "16", "-w", PATTERN], True, 1),
    ("1m-seq-read", ["-s", "1M", "-S", "1M", "-d", "16"], False, 20),
    ("1m-seq-write", ["-s", "1M", "-S", "1M", "-d", "16", "-w", PATTERN], True, 20),
]
_COMPLETED = re.compile(r"Run completed in ([0-9.]+) seconds")


def size_bytes(text: str) -> int:
    units = {"K": 1024, "M": 1024**2, "G": 1024**3}
    if text[-1:].upper() in units:
        return int(text[:-1]) * units[text[-1].upper()]
    return int(text)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(log: Path, proc: subprocess.Popen[bytes], timeout: float = 60) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"thinblock exited: {log.read_text()[-2000:]}")
        for line in log.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == "ready":
                return record
        time.sleep(0.1)
    raise RuntimeError("thinblock did not become ready")


def bench(uri: str, args: list[str], count: int) -> float:
    """Seconds qemu-img bench took for ``count`` requests (its own measure)."""
    argv = ["qemu-img", "bench", "-f", "raw", "-c", str(count), *args, uri]
    done = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=600)
    match = _COMPLETED.search(done.stdout)
    if match is None:
        raise RuntimeError(f"qemu-img bench said: {done.stdout!r} {done.stderr!r}")
    return max(float(match.group(1)), 1e-3)


def start_thinblock(work: Path, size: str, procs: list[subprocess.Popen[bytes]]) -> tuple[str, str]:
    """One daemon, NBD and iSCSI on the same volume (RAID 0: the data path alone); returns
    its iSCSI and NBD URIs of the volume."""
    config = work / "thinblock.toml"
    config.write_text(
        '[first_start]\npds = 2\npd_size = "4GiB"\nraid = 0\n'
        f'volume_size = "{size}"\ngrowth_increment = "1GiB"\n[iscsi]\nnode_name = "bench"\n'
    )
    log = work / "thinblock.log"
    argv = [sys.executable, "-m", "thinblock", "serve", "--config", str(config), "--data", str(work / "data")]
    argv += ["--nbd", "127.0.0.1:0", "--api", "127.0.0.1:0", "--iscsi", "127.0.0.1:0", "--log-format", "json"]
    with log.open("wb") as out:
        procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT))
    ready = wait_ready(log, procs[-1])
    return f"iscsi://{ready['iscsi']}/iqn.2026-12.org.thinblock:bench:vol0/0", f"{ready['nbd']}/vol0"


def start_tgtd(work: Path, size: str, procs: list[subprocess.Popen[bytes]]) -> str:
    """tgtd on a sparse file of ``size``, with its own control port and portal."""
    image = work / "tgt.img"
    with image.open("wb") as f:
        f.truncate(size_bytes(size))
    control, portal = free_port() % 1000 + 3000, free_port()
    procs.append(
        subprocess.Popen(
            ["tgtd", "-f", "-C", str(control), "--iscsi", f"portal=127.0.0.1:{portal}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    )
    time.sleep(1)
    tgtadm = ["tgtadm", "-C", str(control), "--lld", "iscsi"]
    iqn = "iqn.2026-12.org.thinblock:bench-tgtd"
    subprocess.run([*tgtadm, "--op", "new", "--mode", "target", "--tid", "1", "-T", iqn], check=True)
    subprocess.run(
        [*tgtadm, "--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1", "-b", str(image)],
        check=True,
    )
    subprocess.run([*tgtadm, "--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL"], check=True)
    return f"iscsi://127.0.0.1:{portal}/{iqn}/1"


def fill(uri: str, size: str) -> None:
    """Write the whole volume once with the pattern, so that reads read data."""
    count = size_bytes(size) // (1024 * 1024)
    args = ["-w", PATTERN, "-s", "1M", "-S", "1M", "-d", "16"]
    subprocess.run(
        ["qemu-img", "bench", "-f", "raw", *args, "-c", str(count), uri],
        check=True,
        capture_output=True,
        timeout=900,
    )


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20000, help="4 KiB requests per profile")
    parser.add_argument("--size", default="1G", help="volume size")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per profile (median kept)")
    parser.add_argument("--profile", action="append", help="run only these profiles (default: all)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--output", default=None, help="Markdown file to write (default: print only)")
    a = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tb-iscsi-bench-", dir=a.workdir))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        thinblock_iscsi, thinblock_nbd = start_thinblock(work, a.size, procs)
        tgtd_iscsi = start_tgtd(work, a.size, procs)
        targets = [
            ("thinblock iSCSI", thinblock_iscsi),
            ("tgtd iSCSI (file)", tgtd_iscsi),
            ("thinblock NBD", thinblock_nbd),
        ]
        for _name, uri in targets:
            fill(uri, a.size)
        profiles = [p for p in PROFILES if not a.profile or p[0] in a.profile]
        results: dict[tuple[str, str], list[float]] = {}
        for profile, args, _write, divisor in profiles:
            count = max(100, a.count // divisor)
            for _round in range(a.rounds):
                for name, uri in targets:
                    results.setdefault((profile, name), []).append(count / bench(uri, args, count))
        load = os.getloadavg()
        lines = [
            f"# iSCSI benchmark ({time.strftime('%Y-%m-%d %H:%M')}, {socket.gethostname()}, {os.cpu_count()} CPUs, "
            f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at the end)",
            "",
            f"`qemu-img bench`, queue depth 16, {a.count} 4 KiB requests and {max(100, a.count // 20)} 1 MiB "
            f"requests per profile; one {a.size} volume each, written whole first. Requests per second "
            f"(higher is better), the median of {a.rounds} interleaved rounds (qemu-img's own time).",
            "",
            "| profile | "
            + " | ".join(n for n, _ in targets)
            + " | thinblock iSCSI / tgtd | thinblock iSCSI / NBD |",
            "| --- | " + " | ".join("---" for _ in targets) + " | --- | --- |",
        ]
        for profile, *_ in profiles:
            row = [statistics.median(results[(profile, n)]) for n, _ in targets]
            lines.append(
                f"| {profile} | "
                + " | ".join(f"{v:,.0f}" for v in row)
                + f" | {row[0] / row[1]:.2f} | {row[0] / row[2]:.2f} |"
            )
        text = "\n".join(lines) + "\n"
        print(text)
        if a.output:
            Path(a.output).write_text(text)
        return 0
    finally:
        stop(procs)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
