"""Drill: ``thinblock vv move`` and ``vv create --node`` between two real daemons on loopback
(issue 12, step 6 and the placement of step 1; node/move.py).

Each node has its own data directory, PDs, pool and SQLite store; each reaches the other's REST
API (``node.partner_api``) and mirrors its write-back cache to it (``node.partner``).

* qemu-io writes patterns to a write-back volume on n1; ``vv move --to n2``; qemu-io reads every
  pattern back from n2; n1 answers the name as an unknown export; ``node list`` shows both nodes
  with their volumes; the mirror metrics (latency, bytes in flight) are exported;
* an NBD client connected to the volume during the move is disconnected (its next request is
  not answered: nothing it was not told of is lost), n1 then answers the name as an unknown
  export (NBD_REP_ERR_UNKNOWN), n2 serves the write it was acknowledged;
* ``vv create --node n2`` on n1 makes the volume on n2; without ``--node`` the node with fewer
  volumes gets it; refusals (an unknown node, a name used on the target) are one line; with n2
  stopped, ``node list`` shows it unreachable, ``--node n2`` and ``vv move`` say the partner is
  down, a balanced create makes the volume on n1; a token file that cannot be read stops the start;
* kill -9 of the source during the copy (the target stopped mid-copy so that the kill lands
  there), then both running again: the volume is whole on exactly one node (n1: the move rolled
  back) and the partial copy on n2 is deleted.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.drills.harness import Standard, add_pds, setup_pool, setup_volume, wait_until
from tests.drills.nbd_client import ConnectionLost, HandshakeError, NBDClient
from tests.support.daemon import Daemon
from tests.support.ports import free_port
from thinblock.units import MiB

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("node-pair")]

PARTNER_TIMEOUT = 0.5
# qemu-io's writes: (pattern byte, offset MiB, length MiB); a hole between them stays unwritten.
PATTERNS = [(0x11, 0, 1), (0x22, 1, 1), (0x5A, 20, 2), (0x77, 63, 1)]


def node_config(name: str, listen: int, partner: int, partner_api: int, extra: str = "") -> str:
    return (
        "[node]\n"
        f"{extra}"
        f'name = "{name}"\n'
        f'mirror_listen = "127.0.0.1:{listen}"\n'
        f'partner = "127.0.0.1:{partner}"\n'
        f"partner_timeout = {PARTNER_TIMEOUT}\n"
        f'partner_api = "http://127.0.0.1:{partner_api}"\n'
        "[engine]\n"
        "destage_delay = 0.2\n"
    )


def start_pair(make_daemon: Callable[..., Daemon], tag: str) -> tuple[Daemon, Daemon]:
    m1, m2, a1, a2 = free_port(), free_port(), free_port(), free_port()
    n1 = make_daemon(f"n1-{tag}", config=node_config("n1", m1, m2, a2), args=("--api", f"127.0.0.1:{a1}"))
    n2 = make_daemon(f"n2-{tag}", config=node_config("n2", m2, m1, a1), args=("--api", f"127.0.0.1:{a2}"))
    n1.start()
    n2.start()
    wait_until(lambda: n1.events("mirror-in-sync") and n2.events("mirror-in-sync"), "the pair in sync")
    for n in (n1, n2):
        add_pds(n, Standard(count=2, size=128 * MiB), n.workdir)
        setup_pool(n, "p", 1)
    return n1, n2


def qemu_io(daemon: Daemon, export: str, commands: list[str]) -> str:
    tool = shutil.which("qemu-io")
    if tool is None:
        pytest.skip("qemu-io is not installed (make deps installs qemu-utils)")
    argv = [tool, "-f", "raw", f"nbd://127.0.0.1:{daemon.nbd_port}/{export}"]
    for c in commands:
        argv += ["-c", c]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    return result.stdout + result.stderr


def write_patterns(daemon: Daemon, export: str) -> None:
    out = qemu_io(daemon, export, [f"write -P {p:#x} {o}M {n}M" for p, o, n in PATTERNS])
    assert out.count("wrote ") == len(PATTERNS), out


def assert_patterns(daemon: Daemon, export: str) -> None:
    reads = [f"read -P {p:#x} {o}M {n}M" for p, o, n in PATTERNS] + ["read -P 0 4M 16M"]  # the hole
    out = qemu_io(daemon, export, reads)
    assert "Pattern verification failed" not in out and out.count("read ") == len(reads), out


def volume_names(daemon: Daemon) -> set[str]:
    return {v["name"] for v in daemon.api_ok("GET", "/volumes")}


def metric_values(daemon: Daemon, name: str) -> list[float]:
    with urllib.request.urlopen(f"{daemon.api_url}/metrics", timeout=30) as response:
        text = response.read().decode()
    return [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")]


def test_a_volume_moves_to_the_partner_and_reads_back_there(make_daemon: Callable[..., Daemon]) -> None:
    n1, n2 = start_pair(make_daemon, "move")
    setup_volume(n1, "wb", "p", 64 * MiB, cache="writeback", alloc_warning="90%")
    write_patterns(n1, "wb")
    # the mirror's metrics, exported: writes were mirrored (a round trip measured), none in flight now
    assert metric_values(n1, "thinblock_mirror_latency_seconds")[0] > 0
    assert metric_values(n1, "thinblock_mirror_in_flight_bytes") == [0.0]
    assert metric_values(n1, "thinblock_mirror_degraded_volumes") == [0.0]
    allocated = n1.api_ok("GET", "/volumes/wb")["allocated"]

    moved = n1.cli_json("vv", "move", "wb", "--to", "n2")
    assert (moved["source"], moved["target"], moved["copied_bytes"]) == ("n1", "n2", allocated)

    assert_patterns(n2, "wb")
    on_n2 = n2.api_ok("GET", "/volumes/wb")
    assert (on_n2["cache_mode"], on_n2["alloc_warning_spec"], on_n2["allocated"]) == (
        "writeback",
        "90%",
        allocated,
    )
    assert "wb" not in volume_names(n1)
    out = qemu_io(n1, "wb", ["read 0 4k"])
    assert "read 4096/4096" not in out, out  # n1 no longer serves it
    # node list on either node: both nodes, their volumes, reachable
    rows = {r["node"]: r for r in n1.cli_json("node", "list")}
    assert set(rows) == {"n1", "n2"} and all(r["reachable"] for r in rows.values())
    assert (rows["n1"]["volumes"], rows["n2"]["volumes"]) == (0, 1)
    assert rows["n2"]["mirror"] == "in-sync" and rows["n2"]["partner_node"] == "n1"
    table = n1.cli("node", "list").out
    assert "n1" in table and "n2" in table
    # refusals, one line each
    refused = n2.cli("vv", "move", "wb", "--to", "n3")
    assert refused.code != 0 and "not this pair's" in refused.err
    setup_volume(n1, "wb", "p", 8 * MiB)
    refused = n2.cli("vv", "move", "wb", "--to", "n1")
    assert (
        refused.code != 0 and "already exists" in refused.err and len(refused.err.strip().splitlines()) == 1
    )
    assert n1.stop() == 0 and n2.stop() == 0


def test_vv_create_on_a_named_node_and_balanced(make_daemon: Callable[..., Daemon]) -> None:
    n1, n2 = start_pair(make_daemon, "create")
    made = n1.cli_json(
        "vv", "create", "there", "--pool", "p", "--size", "8MiB", "--node", "n2", "--alloc-limit", "50%"
    )
    assert (made["name"], made["alloc_limit_spec"]) == ("there", "50%")  # n2's answer, forwarded
    assert volume_names(n2) == {"there"} and volume_names(n1) == set()
    n1.cli_json("vv", "create", "here", "--pool", "p", "--size", "8MiB", "--node", "n1")
    assert volume_names(n1) == {"here"}
    # balanced: 1 and 1 -> this node (a tie); then 2 and 1 -> the partner
    n1.cli_json("vv", "create", "b1", "--pool", "p", "--size", "8MiB")
    n1.cli_json("vv", "create", "b2", "--pool", "p", "--size", "8MiB")
    assert volume_names(n1) == {"here", "b1"} and volume_names(n2) == {"there", "b2"}
    refused = n1.cli("vv", "create", "x", "--pool", "p", "--size", "8MiB", "--node", "n9")
    assert refused.code != 0 and "no node 'n9'" in refused.err
    # the partner down: its row says so, creating there is refused, balanced creates here
    assert n2.stop() == 0
    rows = n1.cli_json("node", "list")
    assert [(r["node"], r["reachable"]) for r in rows] == [("n1", True), ("n2", False)]
    assert "unreachable" in n1.cli("node", "list").out
    refused = n1.cli("vv", "create", "y", "--pool", "p", "--size", "8MiB", "--node", "n2")
    assert refused.code != 0 and "the partner is down" in refused.err
    refused = n1.cli("vv", "move", "here", "--to", "n2")
    assert refused.code != 0 and "the partner is down" in refused.err
    n1.cli_json("vv", "create", "b3", "--pool", "p", "--size", "8MiB")
    assert volume_names(n1) == {"here", "b1", "b3"}
    assert n1.stop() == 0


def test_the_source_killed_during_the_copy_restarts_with_the_volume_whole_on_one_node(
    make_daemon: Callable[..., Daemon],
) -> None:
    n1, n2 = start_pair(make_daemon, "kill")
    setup_volume(n1, "wb", "p", 64 * MiB, cache="writeback")
    write_patterns(n1, "wb")
    out = qemu_io(n1, "wb", ["write -P 0x33 30M 24M"])  # more to copy: the kill lands in the copy
    assert "wrote " in out, out
    mover = subprocess.Popen(
        [*n1_cli(n1), "vv", "move", "wb", "--to", "n2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        wait_until(lambda: bool(n1.events("vv-move-copying")), "the copy started")
        os.kill(n2.pid, signal.SIGSTOP)  # the target stops mid-copy: the source waits on it
        try:
            # n1 finds its partner silent, degrades (its mirror mark cleared: it may restart)
            wait_until(lambda: bool(n1.events("mirror-degraded") or _alert_open(n1)), "n1 degraded")
            assert not n1.events("vv-moved")
            n1.kill()
        finally:
            os.kill(n2.pid, signal.SIGCONT)
    finally:
        mover.wait(timeout=60)
    n1.start()
    wait_until(lambda: "move-" not in " ".join(volume_names(n2)), "the partial copy deleted on n2", 60)
    assert volume_names(n2) == set() and volume_names(n1) == {"wb"}
    assert_patterns(n1, "wb")
    out = qemu_io(n1, "wb", ["read -P 0x33 30M 24M"])
    assert "Pattern verification failed" not in out and "read " in out, out
    (rolled,) = [json.loads(line) for line in n1.events("vv-move-rolled-back")]
    assert rolled["vv"] == "wb"
    assert n1.stop() == 0 and n2.stop() == 0


def n1_cli(daemon: Daemon) -> list[str]:
    from tests.support.daemon import THINBLOCK_SCRIPT

    return [THINBLOCK_SCRIPT, "--api", daemon.api_url]


def _alert_open(daemon: Daemon) -> bool:
    return any(
        a["kind"] == "mirror-degraded" and a["state"] != "cleared" for a in daemon.api_ok("GET", "/alerts")
    )


def test_a_partner_token_file_that_cannot_be_read_stops_the_start(
    make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    config = node_config(
        "n1", free_port(), free_port(), free_port(), f'partner_api_token_file = "{tmp_path}/nope"\n'
    )
    rc, records = make_daemon("n1-token", config=config).start_expecting_failure()
    assert rc != 0
    (failed,) = [r for r in records if r.get("event") == "startup-failed"]
    assert "cannot read node.partner_api_token_file" in str(failed["msg"]), failed


async def test_a_connected_nbd_client_is_disconnected_and_finds_the_volume_on_the_partner(
    make_daemon: Callable[..., Daemon],
) -> None:
    n1, n2 = start_pair(make_daemon, "client")
    setup_volume(n1, "wb", "p", 64 * MiB, cache="writeback")
    client = await NBDClient.connect("127.0.0.1", n1.nbd_port, "wb")
    block = bytes(range(256)) * 16
    await client.write(0, block)  # acknowledged (n1's cache and n2's mirror copy)
    moved = await asyncio.to_thread(n1.cli_json, "vv", "move", "wb", "--to", "n2")
    assert moved["copied_bytes"] > 0
    # the move ended the connection: its next request is not answered
    with pytest.raises((ConnectionLost, ConnectionError)):
        await client.read(0, 4096)
    await client.close()
    # n1 answers the name as an unknown export (NBD_REP_ERR_UNKNOWN), n2 serves the write
    with pytest.raises(HandshakeError, match="0x80000006"):
        await NBDClient.connect("127.0.0.1", n1.nbd_port, "wb")
    async with await NBDClient.connect("127.0.0.1", n2.nbd_port, "wb") as again:
        assert await again.read(0, 4096) == block
    (disconnected,) = [json.loads(line) for line in n1.events("vv-move-disconnect")]
    assert disconnected["vv"] == "wb"
    assert n1.stop() == 0 and n2.stop() == 0
