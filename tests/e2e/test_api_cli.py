"""The administrator's walk-through, end to end: the CLI (--json) against the real daemon, and
what qemu-io, nbdinfo and nbdcopy then see."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import SMALL_CONFIG, Daemon, running_daemon
from thinblock.units import GiB, MiB

from .client_tools import data_extents, nbd_size, qemu_io, run_tool

pytestmark = pytest.mark.e2e

VV_KEYS = {"name", "pool", "size", "region_size", "allocated", "regions_allocated", "alloc_warning",
           "alloc_limit", "cache_mode"}  # fmt: skip
POOL_KEYS = {"name", "raid", "set_size", "region_size", "capacity", "used", "free", "growth_increment",
             "growth_warning", "growth_limit", "lds"}  # fmt: skip
LD_KEYS = {"id", "pool", "raid", "set_size", "size", "regions", "regions_used", "health", "chunklets"}
ALERT_KEYS = {"id", "time", "severity", "kind", "object", "message", "state"}


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    with running_daemon(tmp_path, config=SMALL_CONFIG, clean_stop=True) as d:
        yield d


def _alerts(daemon: Daemon, *extra: str) -> list[dict[str, object]]:
    alerts: list[dict[str, object]] = daemon.cli_json("alerts", *extra)
    assert all(set(a) == ALERT_KEYS for a in alerts)
    return alerts


def test_walkthrough(daemon: Daemon, tmp_path: Path) -> None:
    # A fifth PD, a RAID 5 pool with a growth limit, a thin volume with a warning and a limit.
    pd = daemon.cli_json("pd", "add", str(tmp_path / "pd-extra.img"), "--size", "64MiB")
    assert (pd["size"], pd["chunklet_size"], pd["health"]) == (64 * MiB, 4 * MiB, "normal")
    assert daemon.cli_json("pd", "show", str(pd["id"])) == pd
    assert len(daemon.cli_json("pd", "list")) == 5

    gold = daemon.cli_json(
        "pool", "create", "gold", "--raid", "5", "--set-size", "3", "--growth-increment", "8MiB",
        "--growth-limit", "16MiB",
    )  # fmt: skip
    assert set(gold) >= POOL_KEYS
    assert (gold["raid"], gold["set_size"], gold["growth_limit"], gold["capacity"]) == (5, 3, 16 * MiB, 0)
    vv = daemon.cli_json("vv", "create", "thin1", "--pool", "gold", "--size", "256MiB",
                         "--alloc-warning", "2MiB", "--alloc-limit", "4MiB")  # fmt: skip
    assert set(vv) >= VV_KEYS
    assert (vv["size"], vv["allocated"], vv["alloc_warning"], vv["alloc_limit"]) == (
        256 * MiB,
        0,
        2 * MiB,
        4 * MiB,
    )
    listing = run_tool("nbdinfo", "--list", "--json", daemon.nbd_url or "").stdout
    assert '"export-name": "thin1"' in listing and '"export-name": "vol0"' in listing

    # Write with qemu-io; watch allocation grow; the warning fires once.
    uri = daemon.uri("thin1")
    qemu_io(uri, "write -P 0x5a 0 3M")
    shown = daemon.cli_json("vv", "show", "thin1")
    assert (shown["allocated"], shown["regions_allocated"]) == (3 * MiB, 3)
    # The same objects (less the forecast, which the daemon's history moves on between two calls).
    listed = [{k: v for k, v in vv.items() if k != "forecast"} for vv in daemon.cli_json("vv", "list")]
    shown_each = [daemon.cli_json("vv", "show", n) for n in ("vol0", "thin1")]
    assert listed == [{k: v for k, v in vv.items() if k != "forecast"} for vv in shown_each]
    assert data_extents(uri) == [(0, 3 * MiB)]
    warnings = [a for a in _alerts(daemon) if a["kind"] == "vv-allocation-warning"]
    assert [(a["object"], a["state"]) for a in warnings] == [("vv:thin1", "new")]

    # Past the limit: ENOSPC for new regions, the volume keeps serving what it holds.
    failed = qemu_io(uri, "write -P 0x11 8M 2M", check=False)
    assert "No space left on device" in failed.stdout + failed.stderr
    assert daemon.cli_json("vv", "show", "thin1")["allocated"] <= 4 * MiB
    assert "vv-allocation-limit" in {a["kind"] for a in _alerts(daemon)}
    qemu_io(uri, "write -P 0x77 0 1M", "read -P 0x77 0 1M", "read -P 0x5a 1M 2M")

    # Discard returns whole regions to the zero LD.
    qemu_io(uri, "discard 0 1M")
    assert daemon.cli_json("vv", "show", "thin1")["allocated"] <= 3 * MiB
    assert all(offset >= MiB for offset, _ in data_extents(uri))
    qemu_io(uri, "read -P 0 0 1M")

    # The pool's growth limit: a second volume runs the pool out, and the alert says so.
    daemon.cli_json("vv", "create", "thin2", "--pool", "gold", "--size", "64MiB")
    failed = qemu_io(daemon.uri("thin2"), "write -P 0x22 0 20M", check=False)
    assert "No space left on device" in failed.stdout + failed.stderr
    pool = daemon.cli_json("pool", "show", "gold")
    assert pool["capacity"] <= 16 * MiB and pool["lds"] == 2 and pool["volumes"] == 2
    assert "pool-growth-limit" in {a["kind"] for a in _alerts(daemon)}
    pools_listed = [{k: v for k, v in p.items() if k != "forecast"} for p in daemon.cli_json("pool", "list")]
    assert pools_listed == [
        {k: v for k, v in daemon.cli_json("pool", "show", n).items() if k != "forecast"}
        for n in ("default", "gold")
    ]

    # LDs: RAID layout, chunklets on distinct PDs, regions used and free, health.
    lds = daemon.cli_json("ld", "list", "--pool", "gold")
    assert len(lds) == 2
    for ld in lds:
        assert set(ld) >= LD_KEYS
        assert (ld["pool"], ld["raid"], ld["set_size"], ld["health"]) == ("gold", 5, 3, "normal")
        for row in {c["row"] for c in ld["chunklets"]}:
            row_pds = [c["pd_id"] for c in ld["chunklets"] if c["row"] == row]
            assert len(row_pds) == len(set(row_pds)) == 3
        assert daemon.cli_json("ld", "show", str(ld["id"])) == ld
    assert sum(ld["regions_used"] for ld in lds) == pool["used"] // MiB

    # Grow a volume: NBD clients see the new size.
    assert daemon.cli_json("vv", "grow", "thin1", "512MiB")["size"] == 512 * MiB
    assert nbd_size(uri) == 512 * MiB

    # Acknowledge an alert.
    alert = next(a for a in _alerts(daemon) if a["kind"] == "vv-allocation-warning")
    acked = daemon.cli_json("alerts", "ack", str(alert["id"]))
    assert (acked["id"], acked["state"]) == (alert["id"], "acknowledged")
    assert next(a for a in _alerts(daemon) if a["id"] == alert["id"])["state"] == "acknowledged"

    # Tear down: volumes, compaction, pool, the extra PD.
    assert daemon.cli_json("vv", "delete", "thin1") == {"deleted": "volume", "name": "thin1"}
    daemon.cli_json("vv", "delete", "thin2")
    compacted = daemon.cli_json("pool", "compact", "gold")
    assert compacted["released_lds"] == 2 and compacted["pool"]["capacity"] == 0
    daemon.cli_json("pool", "delete", "gold")
    assert [p["name"] for p in daemon.cli_json("pool", "list")] == ["default"]
    daemon.cli_json("pd", "remove", str(pd["id"]))
    assert len(daemon.cli_json("pd", "list")) == 4


def test_errors_are_one_line_from_the_real_command(daemon: Daemon) -> None:
    thinblock = Path(sys.executable).with_name("thinblock")
    command = [str(thinblock)] if thinblock.exists() else [sys.executable, "-m", "thinblock"]
    env = {**os.environ, "THINBLOCK_API": daemon.api_url}
    missing = subprocess.run([*command, "pool", "show", "gold"], capture_output=True, text=True, env=env)
    assert (missing.returncode, missing.stdout, missing.stderr) == (1, "", "error: pool 'gold' not found\n")
    busy = daemon.cli("pool", "delete", "default")
    assert busy.code == 1 and busy.err.startswith("error: ") and busy.err.count("\n") == 1
    conflict = daemon.cli("vv", "create", "vol0", "--pool", "default", "--size", "1G")
    assert (conflict.code, conflict.err) == (1, "error: volume 'vol0' already exists\n")
    shrink = daemon.cli("vv", "grow", "vol0", "1MiB")
    assert shrink.code == 1 and "shrink" in shrink.err
    unreachable = subprocess.run(
        [*command, "status", "--api", "http://127.0.0.1:9"], capture_output=True, text=True, env=env
    )
    assert unreachable.returncode == 3 and unreachable.stdout == ""
    assert unreachable.stderr.startswith(
        "error: cannot reach thinblock at http://127.0.0.1:9: is `thinblock serve` running?"
    )
    assert "Traceback" not in missing.stderr + unreachable.stderr
    # Tables for people: the same command without --json.
    table = subprocess.run([*command, "vv", "list"], capture_output=True, text=True, env=env)
    assert table.returncode == 0
    row = next(line for line in table.stdout.splitlines() if line.strip().startswith("vol0"))
    assert "1 GiB" in row and "through" in row  # WRITE column: the cache mode


def test_import_export_stay_thin(daemon: Daemon, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    with image.open("wb") as f:  # 64 MiB, data in three places, holes elsewhere
        f.truncate(64 * MiB)
        for offset, byte in ((0, 0xA1), (5 * MiB + 4096, 0xB2), (40 * MiB, 0xC3)):
            f.seek(offset)
            f.write(bytes([byte]) * (MiB if offset != 5 * MiB + 4096 else 8192))
    daemon.cli_json("vv", "create", "img", "--pool", "default", "--size", "64MiB")
    result = daemon.cli_json("vv", "import", "img", str(image))
    assert result["bytes"] == 64 * MiB
    # Only the regions holding data were allocated: the zeros were skipped.
    assert result["allocated"] == daemon.cli_json("vv", "show", "img")["allocated"] == 3 * MiB
    uri = daemon.uri("img")
    assert run_tool("qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), uri).returncode == 0

    out = tmp_path / "out.raw"
    exported = daemon.cli_json("vv", "export", "img", str(out))
    assert exported["bytes"] == 64 * MiB
    assert out.read_bytes() == image.read_bytes()
    assert out.stat().st_blocks * 512 <= 4 * MiB  # sparse: the holes stayed holes

    refused = daemon.cli("vv", "export", "img", str(out))
    assert refused.code == 1 and "exists; give --force" in refused.err
    assert daemon.cli("vv", "export", "img", str(out), "--force", "--json").code == 0

    # Volume to volume through nbd:// URIs, and a source too large for the volume.
    daemon.cli_json("vv", "create", "copy", "--pool", "default", "--size", "64MiB")
    assert daemon.cli_json("vv", "import", "copy", uri)["allocated"] == 3 * MiB
    run_tool("qemu-img", "compare", "-f", "raw", "-F", "raw", uri, daemon.uri("copy"))
    big = tmp_path / "big.raw"
    big.write_bytes(b"")
    os.truncate(big, GiB)
    too_big = daemon.cli("vv", "import", "copy", str(big))
    assert too_big.code == 1 and "is larger than volume 'copy'" in too_big.err
    missing = daemon.cli("vv", "import", "copy", str(tmp_path / "nope.raw"))
    assert missing.code == 1 and "No such file" in missing.err


def test_rebuild_after_a_pd_failure(daemon: Daemon) -> None:
    uri = daemon.uri("vol0")
    qemu_io(uri, "write -P 0x42 0 2M")
    [ld] = daemon.cli_json("ld", "list")
    victim = ld["chunklets"][0]["pd_id"]
    assert daemon.cli_json("pd", "fail", str(victim))["health"] == "failed"
    assert daemon.cli_json("ld", "show", str(ld["id"]))["health"] == "degraded"
    kinds = {a["kind"] for a in _alerts(daemon)}
    assert {"pd-failed", "ld-degraded"} <= kinds
    qemu_io(uri, "read -P 0x42 0 2M")  # degraded, still serving

    progress = daemon.cli_json("rebuild")
    assert progress["running"] is False and progress["error"] is None
    assert progress["lds_done"] == progress["lds_total"] == 1
    rebuilt = daemon.cli_json("ld", "show", str(ld["id"]))
    assert rebuilt["health"] == "normal" and victim not in {c["pd_id"] for c in rebuilt["chunklets"]}
    assert "rebuild-done" in {a["kind"] for a in _alerts(daemon, "--all")}
    qemu_io(uri, "read -P 0x42 0 2M")
    assert daemon.cli_json("status")["lds_degraded"] == 0
    nothing = daemon.cli("rebuild")
    assert nothing.code == 0 and "nothing to rebuild" in nothing.out


def test_pd_add_cannot_hurt_the_host(daemon: Daemon, tmp_path: Path) -> None:
    """Through the CLI and the API as an administrator would type it (physical/admission.py)."""
    host_file = tmp_path / "host.conf"
    host_file.write_bytes(b"# a host's configuration\n" * 100_000)
    before = host_file.read_bytes()
    link = daemon.data_dir / "pd-link.img"
    link.symlink_to(host_file)
    outside = tmp_path.parent / f"{tmp_path.name}-outside.img"
    cases = {
        str(host_file): "holds data and is not a thinblock PD",
        str(link): "a PD may be a symlink only to a block device",
        str(outside): "outside the data directory and the allowed roots",
        "/dev/thinblock-e2e-no-such-disk": "must exist already",
    }
    for path, reason in cases.items():
        refused = daemon.cli("pd", "add", path, "--size", "64MiB")
        assert refused.code == 1 and reason in refused.err, (path, refused.err)
    # A relative path is the data directory's: it cannot climb out of it.
    status, doc = daemon.api_request("POST", "/pds", {"path": "../../escaped.img", "size": "64MiB"})
    assert status == 400 and "outside the data directory" in doc["error"]
    assert host_file.read_bytes() == before
    assert not outside.exists() and not Path("/dev/thinblock-e2e-no-such-disk").exists()
    assert not (daemon.data_dir.parent.parent / "escaped.img").exists()
    assert len(daemon.cli_json("pd", "list")) == 4
