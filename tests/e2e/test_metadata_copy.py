"""Moving up: a node's SQLite metadata copied into PostgreSQL with ``thinblock metadata copy``,
then the same data directory served from PostgreSQL -- the same volumes, the same bytes, read
back by real clients (qemu-io, nbdinfo).  The copy is refused while the daemon runs (its lock),
and into a store that is not empty; the old SQLite store, once the PostgreSQL one has served
writes, is refused by the PD headers (its generation is behind theirs)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.support.daemon import SMALL_CONFIG, THINBLOCK_MODULE, Daemon, start_daemon
from tests.support.postgres import PostgresCluster, fresh_database
from thinblock.units import MiB

from .client_tools import data_extents, qemu_io

pytestmark = pytest.mark.e2e

# (volume, offset, length, pattern byte): written before the copy, read back after it
PATTERNS = [
    ("vol0", 0, MiB, 0x11),
    ("vol0", 5 * MiB + 4096, 64 * 1024, 0x22),
    ("vol0", 700 * MiB, 3 * MiB, 0x33),
    ("db", 0, 4096, 0x44),
    ("db", 100 * MiB, 2 * MiB, 0x55),
]


def _copy(source: str, target: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*THINBLOCK_MODULE, "metadata", "copy", "--from", source, "--to", target],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_node_moves_from_sqlite_to_postgresql_with_its_volumes_and_bytes(
    tmp_path: Path, postgres_cluster: PostgresCluster
) -> None:
    with fresh_database(postgres_cluster) as url:
        node = start_daemon(tmp_path, config=SMALL_CONFIG)
        try:
            node.cli_json(
                "vv", "create", "db", "--pool", "default", "--size", "256MiB", "--cache", "writeback"
            )
            for vv, offset, length, byte in PATTERNS:
                qemu_io(node.uri(vv), f"write -P {byte:#x} {offset} {length}")
            qemu_io(node.uri("vol0"), "discard 700M 1M")  # a region given back: a hole after the copy too
            before = {vv: data_extents(node.uri(vv)) for vv in ("vol0", "db")}
            volumes = {v["name"]: v["allocated"] for v in node.cli_json("vv", "list")}

            # Refused while the daemon holds the data directory.
            running = _copy(f"sqlite:{node.data_dir}", url)
            assert running.returncode == 1, running
            assert running.stderr.count("\n") == 1 and f"(pid {node.pid})" in running.stderr, running.stderr
            assert "stop the daemon" in running.stderr
            assert node.stop() == 0
        finally:
            node.kill()

        copied = _copy(f"sqlite:{node.data_dir}", url)
        assert copied.returncode == 0, copied.stderr
        assert "checked ok on both sides" in copied.stdout and "vv_map:" in copied.stdout
        again = _copy(f"sqlite:{node.data_dir}", url)
        assert again.returncode == 1 and "is not empty" in again.stderr and again.stderr.count("\n") == 1

        moved = start_daemon(tmp_path, config=SMALL_CONFIG, args=("--metadata", url))
        try:
            assert not moved.events("first-start")
            assert {v["name"]: v["allocated"] for v in moved.cli_json("vv", "list")} == volumes
            assert {vv: data_extents(moved.uri(vv)) for vv in ("vol0", "db")} == before
            for vv, offset, length, byte in PATTERNS:
                if (vv, offset) == ("vol0", 700 * MiB):
                    qemu_io(
                        moved.uri(vv),
                        f"read -P 0 {offset} {MiB}",
                        f"read -P {byte:#x} {offset + MiB} {length - MiB}",
                    )
                else:
                    qemu_io(moved.uri(vv), f"read -P {byte:#x} {offset} {length}")
            # New regions are assigned in PostgreSQL from where SQLite left off: no region twice.
            qemu_io(moved.uri("db"), "write -P 0x66 200M 1M", "read -P 0x66 200M 1M", "read -P 0x55 100M 2M")
            assert moved.stop() == 0
        finally:
            moved.kill()
        check = [*THINBLOCK_MODULE, "check", "--json", "--data", str(node.data_dir), "--metadata", url]
        report = json.loads(subprocess.run(check, capture_output=True, text=True, timeout=120).stdout)
        assert report["ok"], report

        # The old store is behind the data now: a daemon on it refuses to start.
        stale = Daemon(tmp_path, config=SMALL_CONFIG, log_format="json")
        try:
            status, records = stale.start_expecting_failure()
        finally:
            stale.kill()
        assert status == 1, stale.log_tail()
        assert any("older than the data" in str(r.get("msg", "")) for r in records), stale.log_tail()
