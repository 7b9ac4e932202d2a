"""Safe defaults through the CLI against the real daemon, with real clients (issue 16): a volume
in use is not deleted unless forced, and then its client gets errors, never zeros; an image
container is not imported as raw bytes; a volume holding data is not overwritten by accident;
contradictory settings are refused in one line; the overcommit ratio is shown."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.drills.nbd_client import ConnectionLost, NBDClient, NBDError
from tests.support.daemon import SMALL_CONFIG, Daemon, running_daemon
from thinblock.units import GiB, MiB

from .client_tools import qemu_io, run_tool

pytestmark = pytest.mark.e2e


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    with running_daemon(tmp_path, config=SMALL_CONFIG, clean_stop=True) as d:
        yield d


def test_delete_of_a_volume_in_use_is_refused_and_forced_delete_fails_the_client(daemon: Daemon) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB, no zeros to detect

    async def scenario() -> None:
        client = await NBDClient.connect("127.0.0.1", daemon.nbd_port, "vol0")
        try:
            await client.write(0, data)
            await client.flush()
            port = client._writer.get_extra_info("sockname")[1]

            refused = await asyncio.to_thread(daemon.cli, "vv", "delete", "vol0", "-y")
            assert refused.code == 1
            assert refused.err == (
                f"error: volume 'vol0' is in use by 1 NBD client from 127.0.0.1:{port}; "
                "disconnect it or use --force\n"
            )
            shown = await asyncio.to_thread(daemon.cli_json, "vv", "show", "vol0")
            assert [(c["protocol"], c["peer"]) for c in shown["clients"]] == [("NBD", f"127.0.0.1:{port}")]
            assert await client.read(0, len(data)) == data  # still there, still served

            forced = await asyncio.to_thread(daemon.cli, "vv", "delete", "vol0", "-y", "--force")
            assert forced.code == 0, forced.err
            # The client was disconnected: its next request fails, it never reads zeros.
            with pytest.raises((ConnectionLost, NBDError, ConnectionError)):
                await asyncio.wait_for(client.read(0, len(data)), 10)
        finally:
            client.abort()

    asyncio.run(scenario())
    assert "vol0" not in [v["name"] for v in daemon.cli_json("vv", "list")]
    assert daemon.events("vv-delete-disconnect")
    # With no client connected, a delete needs no force.
    daemon.cli_json("vv", "create", "idle", "--pool", "default", "--size", "64MiB")
    assert daemon.cli("vv", "delete", "idle", "-y").code == 0


def test_import_refuses_an_image_container_and_a_volume_holding_data(daemon: Daemon, tmp_path: Path) -> None:
    qcow2 = tmp_path / "disk.qcow2"
    run_tool("qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), "16M")
    run_tool("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", str(qcow2))
    daemon.cli_json("vv", "create", "img", "--pool", "default", "--size", "64MiB")

    refused = daemon.cli("vv", "import", "img", str(qcow2))
    assert refused.code == 1
    assert f"{qcow2} is a qcow2 image, not a raw disk" in refused.err
    assert "qemu-img convert -f qcow2 -O raw" in refused.err and "--format raw" in refused.err
    assert daemon.cli_json("vv", "show", "img")["allocated"] == 0  # nothing was written

    raw = tmp_path / "disk.raw"
    run_tool("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(qcow2), str(raw))
    assert daemon.cli_json("vv", "import", "img", str(raw))["allocated"] == MiB
    qemu_io(daemon.uri("img"), "read -P 0x5a 0 1M")

    # The volume holds data now: not overwritten without --force.
    again = daemon.cli("vv", "import", "img", str(qcow2), "--format", "raw")
    assert again.code == 1 and "volume 'img' holds data (1 MiB allocated): give --force" in again.err
    qemu_io(daemon.uri("img"), "read -P 0x5a 0 1M")
    # Insisting on both: the container's bytes as they are.
    daemon.cli_json("vv", "import", "img", str(qcow2), "--format", "raw", "--force")
    header = qemu_io(daemon.uri("img"), "read -v 0 4").stdout
    assert "51 46 49 fb" in header  # "QFI\xfb", qcow2's magic


def test_contradictions_are_refused_in_one_line_and_overcommit_is_shown(daemon: Daemon) -> None:
    bad = daemon.cli(
        "pool", "create", "p", "--raid", "0", "--growth-warning", "2GiB", "--growth-limit", "1GiB"
    )
    assert bad.code == 1
    assert bad.err == (
        "error: pool 'p': growth warning 2 GiB is above the growth limit 1 GiB; it would never be seen\n"
    )
    low = daemon.cli("pool", "set", "default", "--growth-limit", "1MiB")
    assert low.code == 1 and low.err.count("\n") == 1 and "below the growth increment" in low.err
    tiny = daemon.cli("vv", "create", "t", "--pool", "default", "--size", "1GiB", "--alloc-limit", "4K")
    assert tiny.code == 1 and "smaller than one region" in tiny.err

    # 1 GiB vol0 + 3 GiB in a pool limited to 64 MiB: overcommitted 64 times, and allowed.
    daemon.cli_json("pool", "set", "default", "--growth-limit", "64MiB")
    daemon.cli_json("vv", "create", "big", "--pool", "default", "--size", "3GiB")
    [pool] = daemon.cli_json("pool", "list")
    assert (pool["virtual"], pool["overcommit"]) == (4 * GiB, 64.0)
    assert daemon.cli_json("status")["overcommit"] == 64.0
    table = daemon.cli("pool", "list").out
    assert "OVERCOMMIT" in table and "64x" in table
    assert "(overcommit 64x)" in daemon.cli("status").out


def test_check_says_a_running_daemons_data_directory_is_in_use(daemon: Daemon) -> None:
    busy = daemon.cli("check", "--data", str(daemon.data_dir))
    assert busy.code == 1
    assert f"in use by another thinblock process (pid {daemon.pid})" in busy.out + busy.err
    assert "stop it before checking" in busy.out + busy.err
    # The rebuild metrics: one quantity each, named as GET /rebuild names them.
    with daemon.http() as http:
        metrics = http.get("/metrics").text
    assert (
        "\nthinblock_rebuild_bytes_total 0.0\n" in metrics
        and "\nthinblock_rebuild_done_bytes 0.0\n" in metrics
    )
    assert "thinblock_rebuild_bytes{" not in metrics
    assert daemon.stop() == 0
    assert daemon.cli("check", "--data", str(daemon.data_dir)).code == 0  # stopped: checked
    daemon.start()  # the fixture stops it
