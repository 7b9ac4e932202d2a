"""PD administration through the CLI against the real daemon, with real data (issue 16):
``pd fail`` asks first on a terminal; ``pd restore`` returns a failed PD to service only after
resynchronising what it missed; ``pd replace OLD NEW`` rebuilds onto NEW.

Two PDs, RAID 1: every row mirrors the same two PDs, so after a restore or a replace, failing
the *other* PD makes every read come from the restored (or new) one: stale data would show."""

from __future__ import annotations

import os
import pty
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import THINBLOCK_SCRIPT, Daemon, start_daemon

from .client_tools import qemu_io

pytestmark = pytest.mark.e2e

CONFIG = """
[engine]
chunklet_size = "4MiB"

[first_start]
pds = 2
pd_size = "64MiB"
growth_increment = "8MiB"
volume_size = "48MiB"
"""


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = start_daemon(tmp_path, config=CONFIG)
    try:
        yield d
    finally:
        d.kill()


def _write_before_and_during(daemon: Daemon, failed: int) -> None:
    """Patterns before the failure, `pd fail` (with -y), patterns after it: overwrites of old data
    and new regions, none of which reaches the failed PD."""
    uri = daemon.uri("vol0")
    # The pool cannot grow with a PD of its RAID 1 sets failed: room for the writes made while
    # it is failed is made before (regions written, then given back by the discard).
    qemu_io(uri, "write -P 0x11 0 16M", "write -P 0x22 16M 8M", "write -P 0x55 36M 8M", "discard 36M 8M")
    pd = daemon.cli_json("pd", "fail", str(failed), "-y")
    assert pd["health"] == "failed"
    assert any(a["kind"] == "pd-failed" for a in daemon.cli_json("alerts"))
    qemu_io(uri, "write -P 0x33 4M 4M", "write -P 0x44 30M 6M", "write -z 12M 1M")


def _read_all_back(daemon: Daemon) -> None:
    qemu_io(
        daemon.uri("vol0"),
        "read -P 0x11 0 4M",
        "read -P 0x33 4M 4M",
        "read -P 0x11 8M 4M",
        "read -P 0 12M 1M",
        "read -P 0x11 13M 3M",
        "read -P 0x22 16M 8M",
        "read -P 0 24M 6M",
        "read -P 0x44 30M 6M",
        "read -P 0 36M 12M",
    )


def _check_clean(daemon: Daemon) -> None:
    assert daemon.stop() == 0
    check = daemon.cli("check", "--data", str(daemon.data_dir))
    assert check.code == 0, check.out + check.err
    daemon.start()


def test_restore_resynchronises_what_the_pd_missed_before_serving_it(daemon: Daemon) -> None:
    _write_before_and_during(daemon, failed=1)
    restored = daemon.cli("pd", "restore", "1")
    assert restored.code == 0, restored.err
    assert restored.out == "PD 1 restored: resynchronised and back in service (normal)\n"
    assert daemon.cli_json("pd", "show", "1")["health"] == "normal"
    assert not any(a["kind"] == "pd-failed" for a in daemon.cli_json("alerts"))
    assert all(ld["health"] == "normal" for ld in daemon.cli_json("ld", "list"))
    # Now PD 2 fails: every read comes from PD 1, which must hold the writes it missed.
    daemon.cli_json("pd", "fail", "2", "-y")
    _read_all_back(daemon)
    # Restored PD 2 the same way; the store passes the check, and a restart keeps it all.
    assert daemon.cli("pd", "restore", "2").code == 0
    _check_clean(daemon)
    assert [pd["health"] for pd in daemon.cli_json("pd", "list")] == ["normal", "normal"]
    _read_all_back(daemon)
    daemon.cli_json("pd", "fail", "1", "-y")  # after the restart, PD 2 alone serves it right too
    _read_all_back(daemon)


def test_restore_refusals(daemon: Daemon) -> None:
    assert (
        daemon.cli("pd", "restore", "1").err
        == "error: PD 1 is in service; only a failed PD can be restored\n"
    )
    assert daemon.cli("pd", "restore", "9").err == "error: PD 9 not found\n"
    qemu_io(daemon.uri("vol0"), "write -P 0x11 0 8M")
    daemon.cli_json("pd", "fail", "1", "-y")
    pd1 = Path(daemon.cli_json("pd", "show", "1")["path"])
    size = pd1.stat().st_size
    pd1.unlink()  # it did not turn out healthy: it is gone
    refused = daemon.cli("pd", "restore", "1")
    assert refused.code == 1 and refused.err.startswith("error: PD 1 cannot be restored: "), refused.err
    assert daemon.cli_json("pd", "show", "1")["health"] == "failed"
    pd1.write_bytes(b"")
    os.truncate(pd1, size)  # a blank file of the same size: not PD 1 (no header)
    refused = daemon.cli("pd", "restore", "1")
    assert refused.code == 1 and refused.err.startswith("error: PD 1 cannot be restored: "), refused.err
    assert daemon.cli_json("pd", "show", "1")["health"] == "failed"
    qemu_io(daemon.uri("vol0"), "read -P 0x11 0 8M")  # served from PD 2 all along


def test_replace_rebuilds_onto_the_new_pd_and_removes_the_old(daemon: Daemon) -> None:
    _write_before_and_during(daemon, failed=1)
    new = daemon.cli_json("pd", "add", str(daemon.data_dir / "pd-new.img"), "--size", "64MiB")
    replaced = daemon.cli("pd", "replace", "1", str(new["id"]))
    assert replaced.code == 0, replaced.err
    assert replaced.out == f"PD 1 replaced by PD {new['id']}: its LD members rebuilt there; PD 1 removed\n"
    pds = {pd["id"]: pd for pd in daemon.cli_json("pd", "list")}
    assert sorted(pds) == [2, new["id"]] and pds[new["id"]]["chunklets_used"] == pds[2]["chunklets_used"]
    assert all(ld["health"] == "normal" for ld in daemon.cli_json("ld", "list"))
    daemon.cli_json("pd", "fail", "2", "-y")  # every read from the new PD now
    _read_all_back(daemon)
    assert daemon.cli("pd", "restore", "2").code == 0
    _check_clean(daemon)
    _read_all_back(daemon)


def test_replace_refusals(daemon: Daemon) -> None:
    new = daemon.cli_json("pd", "add", str(daemon.data_dir / "pd-new.img"), "--size", "64MiB")
    qemu_io(daemon.uri("vol0"), "write -P 0x11 0 8M")
    in_service = daemon.cli("pd", "replace", "1", str(new["id"]))
    assert in_service.err == "error: PD 1 is in service: fail it first (pd fail 1), then replace it\n"
    daemon.cli_json("pd", "fail", "1", "-y")
    same_set = daemon.cli("pd", "replace", "1", "2")
    assert same_set.code == 1 and "already holds a member of the same RAID set" in same_set.err
    assert daemon.cli("pd", "replace", "1", "1").err == "error: PD 1 cannot replace itself\n"
    small = daemon.cli_json("pd", "add", str(daemon.data_dir / "pd-small.img"), "--size", "4MiB")
    too_small = daemon.cli("pd", "replace", "1", str(small["id"]))
    assert too_small.code == 1 and "free chunklet(s); PD 1 holds" in too_small.err
    assert daemon.cli_json("pd", "show", "1")["health"] == "failed"  # nothing changed
    qemu_io(daemon.uri("vol0"), "read -P 0x11 0 8M")


def _on_a_terminal(daemon: Daemon, answer: bytes, *args: str) -> tuple[int, str]:
    """``thinblock ARGS`` with its stdin on a pseudo-terminal, typing ``answer``."""
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen(
            [THINBLOCK_SCRIPT, "--api", daemon.api_url, *args],
            stdin=terminal,
            stdout=terminal,
            stderr=terminal,
            close_fds=True,
        )
    finally:
        os.close(terminal)  # the child's copy only: reading ends (EIO) when it exits
    try:
        os.write(controller, answer)
        output = b""
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
        return proc.wait(timeout=60), output.decode(errors="replace")
    finally:
        os.close(controller)
        proc.kill()


def test_pd_fail_asks_on_a_terminal(daemon: Daemon) -> None:
    code, output = _on_a_terminal(daemon, b"n\n", "pd", "fail", "1")
    assert code == 1 and "fail PD 1 (" in output and "[y/N]" in output and "not failed" in output, output
    assert daemon.cli_json("pd", "show", "1")["health"] == "normal"
    code, output = _on_a_terminal(daemon, b"y\n", "pd", "fail", "1")
    assert code == 0, output
    assert daemon.cli_json("pd", "show", "1")["health"] == "failed"
    # -y does not ask.
    code, output = _on_a_terminal(daemon, b"", "pd", "fail", "2", "-y")
    assert code == 0 and "[y/N]" not in output, output


def test_restore_puts_raid0_members_back_as_they_are(daemon: Daemon) -> None:
    """A RAID 0 LD has no other copy: while its PD is failed every request touching it fails, so
    nothing was acknowledged there since, and restore puts the members back unchanged (after
    the header proved the file is the PD).  The RAID 1 members of the same PD are resynchronised
    as before, in the same restore."""
    daemon.cli_json(
        "pool", "create", "fast", "--raid", "0", "--set-size", "2", "--growth-increment", "8MiB"
    )  # fmt: skip
    daemon.cli_json("vv", "create", "scratch", "--pool", "fast", "--size", "16MiB")
    fast = daemon.uri("scratch")
    qemu_io(fast, "write -P 0x66 0 16M")
    _write_before_and_during(daemon, failed=1)  # vol0 (RAID 1) goes on; PD 1 fails
    assert qemu_io(fast, "read 0 16M", check=False).returncode != 0  # RAID 0 data on PD 1: lost
    assert any(ld["health"] == "failed" for ld in daemon.cli_json("ld", "list"))
    restored = daemon.cli("pd", "restore", "1")
    assert restored.code == 0, restored.err
    assert all(ld["health"] == "normal" for ld in daemon.cli_json("ld", "list"))
    assert not any(a["kind"] in ("pd-failed", "ld-failed") for a in daemon.cli_json("alerts"))
    qemu_io(fast, "read -P 0x66 0 16M", "write -P 0x77 4M 4M")
    daemon.cli_json("pd", "fail", "2", "-y")  # vol0 now read from PD 1 alone: resynchronised
    _read_all_back(daemon)
    assert daemon.cli("pd", "restore", "2").code == 0
    _check_clean(daemon)
    qemu_io(daemon.uri("scratch"), "read -P 0x66 0 4M", "read -P 0x77 4M 4M", "read -P 0x66 8M 8M")
    _read_all_back(daemon)


def test_restore_refuses_a_row_that_lost_both_copies(daemon: Daemon) -> None:
    """Both mirrors of a RAID 1 row failed one after the other: which one is current cannot be
    told, so neither is restored; nothing changes."""
    qemu_io(daemon.uri("vol0"), "write -P 0x11 0 8M")
    daemon.cli_json("pd", "fail", "1", "-y")
    qemu_io(daemon.uri("vol0"), "write -P 0x22 0 4M")  # reaches PD 2 only
    daemon.cli_json("pd", "fail", "2", "-y")
    for pd in ("1", "2"):
        refused = daemon.cli("pd", "restore", pd)
        assert refused.code == 1 and "hold no other copy of its data" in refused.err, refused.err
        assert daemon.cli_json("pd", "show", pd)["health"] == "failed"
