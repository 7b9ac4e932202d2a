"""An administrator's commands through the CLI against the real daemon, with real clients
(issue 16): ``vv rename``, one sentence for a bad name."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.drills.nbd_client import NBDClient
from tests.support.daemon import SMALL_CONFIG, Daemon, start_daemon

from .client_tools import qemu_io, run_tool

pytestmark = pytest.mark.e2e

# 'guarded' has NBD access rules: renaming it (or a volume onto its name) would take it out of them.
CONFIG = (
    SMALL_CONFIG
    + """
[[nbd.access]]
volume = "guarded"
clients = ["127.0.0.1"]
mode = "ro"
"""
)
VOLUME_RULE = (
    "volume names are 1-63 characters of letters, digits and . _ : + -, starting with a letter or digit"
)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = start_daemon(tmp_path, config=CONFIG)
    try:
        yield d
    finally:
        d.kill()


def test_rename_keeps_the_data_and_the_connected_client_and_frees_the_old_name(daemon: Daemon) -> None:
    daemon.cli_json("vv", "create", "db1", "--pool", "default", "--size", "64MiB", "--alloc-limit", "16MiB")
    qemu_io(daemon.uri("db1"), "write -P 0xa5 0 2M")
    pattern = bytes([0x5A]) * (1024 * 1024)

    async def scenario() -> None:
        client = await NBDClient.connect("127.0.0.1", daemon.nbd_port, "db1")
        try:
            renamed = await asyncio.to_thread(daemon.cli, "vv", "rename", "db1", "db2")
            assert renamed.code == 0, renamed.err
            assert renamed.out == "volume 'db1' renamed to 'db2'; its NBD export is now db2\n"
            # The connected client goes on with the same volume, reading and writing.
            assert await client.read(0, 4096) == bytes([0xA5]) * 4096
            await client.write(4 * 1024 * 1024, pattern)
            await client.flush()
            shown = await asyncio.to_thread(daemon.cli_json, "vv", "show", "db2")
            assert [c["protocol"] for c in shown["clients"]] == ["NBD"]  # listed under the new name
            # It is in use under its new name: a delete is refused as for any volume in use.
            refused = await asyncio.to_thread(daemon.cli, "vv", "delete", "db2", "-y")
            assert refused.code == 1 and "in use by 1 NBD client" in refused.err
        finally:
            client.abort()

    asyncio.run(scenario())
    shown = daemon.cli_json("vv", "show", "db2")
    assert (shown["size"], shown["alloc_limit"], shown["allocated"]) == (64 << 20, 16 << 20, 3 << 20)
    # New connections use the new name; the old name is no export any more.
    qemu_io(daemon.uri("db2"), "read -P 0xa5 0 2M", "read -P 0x5a 4M 1M")
    gone = run_tool("qemu-io", "-f", "raw", "-c", "read 0 4k", daemon.uri("db1"), check=False)
    assert gone.returncode != 0
    assert [v["name"] for v in daemon.cli_json("vv", "list")] == ["vol0", "db2"]
    # The old name is free for a new volume, which holds none of the old data.
    daemon.cli_json("vv", "create", "db1", "--pool", "default", "--size", "64MiB")
    qemu_io(daemon.uri("db1"), "read -P 0 0 4M")
    (renamed_line,) = daemon.events("vv-renamed")
    assert "vv=db2" in renamed_line and "old_name=db1" in renamed_line
    # The name survives a restart.
    assert daemon.stop() == 0
    daemon.start()
    assert {v["name"] for v in daemon.cli_json("vv", "list")} == {"vol0", "db1", "db2"}
    qemu_io(daemon.uri("db2"), "read -P 0xa5 0 2M")


def test_rename_refusals_are_one_line(daemon: Daemon) -> None:
    daemon.cli_json("vv", "create", "db1", "--pool", "default", "--size", "64MiB")
    daemon.cli_json("vv", "create", "guarded", "--pool", "default", "--size", "64MiB")
    cases = {
        ("db1", "vol0"): "error: volume 'vol0' already exists\n",
        ("db1", "a b"): f"error: invalid volume name 'a b': {VOLUME_RULE}\n",
        ("db1", "x" * 64): f"error: invalid volume name '{'x' * 64}': {VOLUME_RULE}\n",
        ("nope", "db9"): "error: volume 'nope' not found\n",
        (
            "guarded",
            "open",
        ): "error: volume 'guarded' cannot be renamed to 'open' while [[nbd.access]] rules in"
        " the configuration name it: change them first (a rename would take the volume out of its rules)\n",
        ("db1", "guarded2"): None,  # a name no rule names: fine
    }
    for (old, new), message in cases.items():
        result = daemon.cli("vv", "rename", old, new)
        if message is None:
            assert result.code == 0, result.err
        else:
            assert (result.code, result.err) == (1, message)
    daemon.cli_json("vv", "create", "x1", "--pool", "default", "--size", "64MiB")
    assert daemon.cli("vv", "delete", "guarded", "-y").code == 0
    refused = daemon.cli("vv", "rename", "x1", "guarded")  # the rules meant for 'guarded' would apply
    assert refused.code == 1 and "[[nbd.access]] rules" in refused.err
    assert sorted(v["name"] for v in daemon.cli_json("vv", "list")) == ["guarded2", "vol0", "x1"]


def test_every_name_taking_command_says_the_rule(daemon: Daemon) -> None:
    pool_rule = VOLUME_RULE.replace("volume", "pool")
    for argv, message in [
        (("vv", "create", "a/b", "--pool", "default", "--size", "1G"), f"invalid volume name 'a/b': {VOLUME_RULE}"),
        (("vv", "show", "a b"), f"invalid volume name 'a b': {VOLUME_RULE}"),
        (("vv", "grow", "a b", "2G"), f"invalid volume name 'a b': {VOLUME_RULE}"),
        (("vv", "set", "a b", "--cache", "writeback"), f"invalid volume name 'a b': {VOLUME_RULE}"),
        (("vv", "delete", "a b", "-y"), f"invalid volume name 'a b': {VOLUME_RULE}"),
        (("pool", "create", "g o", "--raid", "1"), f"invalid pool name 'g o': {pool_rule}"),
        (("pool", "show", "g.o!"), f"invalid pool name 'g.o!': {pool_rule}"),
        (("ld", "list", "--pool", "g o"), f"invalid pool name 'g o': {pool_rule}"),
        (("token", "create", "ci bot", "--role", "operator"),
         "invalid token name 'ci bot': token names are 1-64 characters of letters, digits and . _ @ -,"
         " starting with a letter or digit"),
    ]:  # fmt: skip
        result = daemon.cli(*argv)
        assert (result.code, result.err) == (1, f"error: {message}\n"), argv
