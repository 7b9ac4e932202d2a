"""``thinblock serve`` as a newcomer meets it: first start, restart, clean stop, check, refusals."""

from __future__ import annotations

import io
import json
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.daemon import SMALL_CONFIG, THINBLOCK_MODULE, Daemon, start_daemon, write_config
from tests.support.stores import StoreBackend
from thinblock.cli import main as cli_main
from thinblock.physical.header import HEADER_AREA
from thinblock.units import GiB, MiB

from .client_tools import data_extents, nbd_size, qemu_io, run_tool

pytestmark = pytest.mark.e2e


def test_first_start_defaults_then_restart(tmp_path: Path, backend: StoreBackend) -> None:
    """The issue's first start, with its real defaults (no config file at all): four sparse
    64 GiB file PDs, pool 'default' (RAID 1, region 1 MiB), a 100 GiB thin volume 'vol0' that is
    the default export, and a log that says where to point qemu-img and nbdinfo.  Then kill -9
    (what qemu-io wrote and flushed survives), a clean stop, a restart.  On both metadata
    backends: SQLite in the data directory (no flag), and PostgreSQL (``--metadata URL``)."""
    args = () if backend.kind == "sqlite" else ("--metadata", backend.url)
    daemon = start_daemon(tmp_path, config="", args=args)
    try:
        pds = daemon.cli_json("pd", "list")
        assert len(pds) == 4
        for pd in pds:
            assert pd["size"] == 64 * GiB and pd["health"] == "normal"
            path = Path(pd["path"])
            assert path.parent == daemon.data_dir.resolve()
            assert path.stat().st_size == HEADER_AREA + 64 * GiB  # the PD header's area, then chunklets
            assert path.stat().st_blocks * 512 < 16 * MiB  # sparse: no real space until written

        [pool] = daemon.cli_json("pool", "list")
        assert (pool["name"], pool["raid"], pool["region_size"], pool["lds"]) == ("default", 1, MiB, 0)
        [vv] = daemon.cli_json("vv", "list")
        assert (vv["name"], vv["pool"], vv["size"], vv["allocated"]) == ("vol0", "default", 100 * GiB, 0)
        status = daemon.cli_json("status")
        assert status["nbd"]["default_export"] == "vol0"
        assert (status["pds"], status["pools"], status["volumes"]) == (4, 1, 1)

        # Where to point the clients, in a few lines of the log; and they work as written.
        uri = daemon.uri("vol0")
        hints = [line for line in daemon.events("hint")]
        assert any(f'msg="nbdinfo {uri}"' in line for line in hints), daemon.log_text()
        assert any(f'msg="qemu-img info {uri}"' in line for line in hints), daemon.log_text()
        assert daemon.events("first-start")
        info = json.loads(
            run_tool("nbdinfo", "--json", f"{daemon.nbd_url}/").stdout
        )  # empty name: default export
        assert info["exports"][0]["export-size"] == 100 * GiB
        assert "virtual size: 100 GiB" in run_tool("qemu-img", "info", uri).stdout

        qemu_io(uri, "write -P 0x6b 0 1M", "write -P 0x6c 99G 4k")
        assert daemon.cli_json("vv", "show", "vol0")["allocated"] == 2 * MiB  # thin: two regions
        assert data_extents(uri) == [(0, MiB), (99 * GiB, MiB)]
        daemon.kill()  # kill -9: qemu-io flushed when it closed

        crashed = start_daemon(tmp_path, config="", args=args)
        try:
            qemu_io(crashed.uri("vol0"), "read -P 0x6b 0 1M", "read -P 0x6c 99G 4k")
            assert crashed.stop() == 0
            assert crashed.events("engine-closed")
        finally:
            crashed.kill()
        check = [*THINBLOCK_MODULE, "check", "--json", "--data", str(daemon.data_dir), *args]
        report = json.loads(subprocess.run(check, capture_output=True, text=True).stdout)
        assert report["ok"] and report["counts"]["vv_map"] == 2, report

        # A later start reopens what is there: nothing created twice, the data still there.
        again = start_daemon(tmp_path, config="", args=args)
        try:
            assert not again.events("first-start")
            assert len(again.cli_json("pd", "list")) == 4
            assert [v["name"] for v in again.cli_json("vv", "list")] == ["vol0"]
            assert again.cli_json("vv", "show", "vol0")["allocated"] == 2 * MiB
            qemu_io(again.uri("vol0"), "read -P 0x6b 0 1M", "read -P 0x6c 99G 4k", "read -P 0 1M 1M")
        finally:
            assert again.stop(signal.SIGINT) == 0  # SIGINT stops cleanly too
    finally:
        daemon.kill()


def test_sigterm_finishes_flushes_and_exits_0(tmp_path: Path) -> None:
    """Write-back data that is still dirty at SIGTERM survives: the daemon flushes before it exits."""
    config = """
[engine]
chunklet_size = "4MiB"
default_cache_mode = "writeback"
destage_delay = 3600          # nothing destages by itself during the test
[first_start]
pd_size = "64MiB"
growth_increment = "8MiB"
volume_size = "64MiB"
"""
    daemon = start_daemon(tmp_path, config=config)
    try:
        image = tmp_path / "pattern.img"
        image.write_bytes(bytes([0x3C]) * (2 * MiB))
        # nbdcopy without --flush: acknowledged writes, no flush from the client.  Requests of
        # 64 KiB stay in the cache (large write-back writes to settled regions go around it).
        run_tool("nbdcopy", "--request-size=65536", str(image), daemon.uri("vol0"))
        assert daemon.cli_json("vv", "show", "vol0")["dirty_bytes"] > 0
        assert daemon.stop(signal.SIGTERM) == 0
        assert daemon.events("engine-closed") and daemon.events("stopped")
    finally:
        daemon.kill()
    check = subprocess.run(
        [*THINBLOCK_MODULE, "check", "--data", str(daemon.data_dir)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    again = start_daemon(tmp_path, config=config)
    try:
        qemu_io(again.uri("vol0"), "read -P 0x3c 0 2M", "read -P 0 2M 62M")
        assert again.cli_json("vv", "show", "vol0")["allocated"] == 2 * MiB
    finally:
        assert again.stop() == 0


def test_sigterm_during_a_copy(tmp_path: Path) -> None:
    """SIGTERM while a host is writing: the daemon stops accepting, lets the requests in flight
    finish, flushes, exits 0, and the store it leaves passes the check and reopens."""
    daemon = start_daemon(tmp_path, config=SMALL_CONFIG)
    # A slow source (nbdkit's random data, each read delayed) keeps nbdcopy writing for a while.
    copy = subprocess.Popen(
        ["nbdcopy", "--", "[", "nbdkit", "--filter=delay", "random", "512M", "rdelay=20ms", "]",
         daemon.uri("vol0")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(500):
            if daemon.cli_json("vv", "show", "vol0")["allocated"] > 0:
                break
            time.sleep(0.02)
        else:
            raise AssertionError("the copy never started writing")
        assert copy.poll() is None, "the copy finished before the test could interrupt it"
        assert daemon.stop(signal.SIGTERM) == 0
        assert daemon.events("engine-closed")
    finally:
        copy.kill()
        copy.wait()
        daemon.kill()
    check = subprocess.run(
        [*THINBLOCK_MODULE, "check", "--data", str(daemon.data_dir), "--json"], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert json.loads(check.stdout)["counts"]["vv_map"] > 0  # what was written is mapped


def test_check_reports_and_fails_on_a_broken_store(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path, config=SMALL_CONFIG)
    qemu_io(daemon.uri("vol0"), "write -P 1 0 64k")
    assert daemon.stop() == 0
    ok = subprocess.run(
        [*THINBLOCK_MODULE, "check", "--data", str(daemon.data_dir), "--json"], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert report["ok"] is True and report["problems"] == []
    assert report["counts"]["pds"] == 4 and report["counts"]["vvs"] == 1
    (daemon.data_dir / "pd2.img").unlink()
    broken = subprocess.run(
        [*THINBLOCK_MODULE, "check", "--data", str(daemon.data_dir)], capture_output=True, text=True
    )
    assert broken.returncode == 1
    assert "NOT OK" in broken.stdout and "pd2.img is missing" in broken.stdout


def test_busy_port_refuses_to_start_before_touching_anything(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        daemon = Daemon(tmp_path, config=SMALL_CONFIG, args=("--api", f"127.0.0.1:{port}"))
        daemon.spawn()
        try:
            assert daemon.wait_exit(60) == 1
        finally:
            daemon.kill()
    assert f"cannot listen for the API on 127.0.0.1:{port}: address already in use" in daemon.log_text()
    assert not daemon.data_dir.exists()
    assert "Traceback" not in daemon.log_text()


@pytest.mark.parametrize(
    ("config", "args", "message"),
    [
        ("[api]\nlisten = 8080\n", (), "api.listen: expected a string"),
        ("colour = 'red'\n", (), "unknown key: colour"),
        # Off loopback without a token: refused before anything is bound (nothing listens).
        ("", ("--api", "0.0.0.0:0"), "set api.token"),
        ("[api]\nrequire_token = true\n", (), "set api.token"),
        ("", ("--chunklet-size", "huge"), "--chunklet-size: not a size"),
    ],
)
def test_configuration_mistakes_are_one_line(
    tmp_path: Path, config: str, args: tuple[str, ...], message: str
) -> None:
    """In process (``thinblock serve`` refuses before it starts anything); the next test runs
    the real command once."""
    config_path = write_config(tmp_path, config)
    out, err = io.StringIO(), io.StringIO()
    argv = ["serve", "--config", str(config_path), "--data", str(tmp_path / "data"), *args]
    assert cli_main(argv, stdout=out, stderr=err) == 2
    assert message in err.getvalue() and err.getvalue().startswith("error: configuration:")
    assert err.getvalue().count("\n") == 1
    assert not (tmp_path / "data").exists()


def test_configuration_mistake_from_the_real_command(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path, config="[nbd]\nlisten = 'x:y'\n")
    daemon.spawn()
    try:
        assert daemon.wait_exit(60) == 2
    finally:
        daemon.kill()
    assert daemon.log_text() == "error: configuration: " + str(tmp_path / "thinblock.toml") + (
        ": nbd.listen: not a port number: 'y'\n"
    )
    assert not daemon.data_dir.exists()


def test_unix_socket_and_no_default_export(tmp_path: Path) -> None:
    sock = tmp_path / "nbd.sock"
    daemon = start_daemon(
        tmp_path, config=SMALL_CONFIG, args=("--nbd-unix", str(sock), "--default-export", "")
    )
    try:
        uri = f"nbd+unix:///vol0?socket={sock}"
        assert nbd_size(uri) == GiB
        qemu_io(uri, "write -P 9 0 4k", "read -P 9 0 4k")
        assert daemon.cli_json("status")["nbd"] == {
            "uri": daemon.nbd_url,
            "unix_socket": str(sock),
            "default_export": None,
            "tls": "off",
            "exposed_without_tls": False,
        }
        assert daemon.cli_json("vv", "show", "vol0")["allocated"] == MiB
    finally:
        assert daemon.stop() == 0


def test_a_second_daemon_on_the_same_data_directory_stops_with_a_clear_error(tmp_path: Path) -> None:
    """Two daemons on one data directory would hand the same LD regions to different writers:
    the second one must stop at start and name the first one's pid; the first goes on serving."""
    first = Daemon(tmp_path / "first", config=SMALL_CONFIG, data_dir=tmp_path / "data")
    first.start()
    try:
        assert first.proc is not None
        second = Daemon(tmp_path / "second", config=SMALL_CONFIG, data_dir=tmp_path / "data")
        second.spawn()
        try:
            assert second.wait_exit(60) == 1
        finally:
            second.kill()
        log = second.log_text()
        assert f"is in use by another thinblock process (pid {first.proc.pid})" in log
        assert "Traceback" not in log
        # The first one is unharmed: it still serves its volume.
        assert nbd_size(first.uri("vol0")) == GiB  # SMALL_CONFIG: a 1 GiB first-start volume
    finally:
        first.stop()
