"""The daemon's log as an administrator reads it (issue 16): logfmt with fields as fields, an
NBD connection's close line with what it moved and for how long, hints that name only
volumes that exist."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support.daemon import SMALL_CONFIG, start_daemon

from .client_tools import qemu_io

pytestmark = pytest.mark.e2e


def test_close_line_fields_and_hints_after_the_default_export_is_deleted(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path, config=SMALL_CONFIG)
    try:
        daemon.cli_json("vv", "create", "db1", "--pool", "default", "--size", "64MiB")
        qemu_io(daemon.uri("db1"), "write -P 0x5a 0 3M", "read -P 0x5a 0 2M", "read -P 0x5a 1M 2M")
        # The connection's close: what it moved and for how long, as fields.  The daemon logs it
        # when it sees the connection go, which may be a moment after qemu-io exited.
        deadline = time.monotonic() + 30
        while True:
            records = daemon.log_records()
            closes = [r for r in records if r.get("event") == "nbd-closed" and r.get("vv") == "db1"]
            if closes or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        (closed,) = closes
        assert (int(closed["bytes_written"]), int(closed["bytes_read"])) == (3 << 20, 4 << 20)
        assert int(closed["requests"]) >= 3 and float(closed["seconds"]) >= 0
        assert closed["peer"].startswith("127.0.0.1:") and closed["msg"] == "client closed"
        # Fields are fields: the creation line carries them, its message does not.
        (created,) = [r for r in records if r.get("event") == "vv-created" and r.get("vv") == "db1"]
        assert (created["msg"], created["pool"], created["size"]) == ("vv created", "default", str(64 << 20))
        alerts = [r for r in records if r.get("event") == "alert"]
        assert alerts and all("kind=" not in r["msg"] for r in alerts)
        assert {r["kind"] for r in alerts} >= {"ld-created"}

        # The default export deleted: after a restart no hint names it.
        assert daemon.cli("vv", "delete", "vol0", "-y").code == 0
        assert daemon.stop() == 0
        daemon.start()
        deadline = time.monotonic() + 30  # the hints follow the ready line the start waited for
        while len(hints := daemon.events("hint")) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert hints and not any("vol0" in line for line in hints), hints
        assert any(f"nbdinfo {daemon.uri('db1')}" in line for line in hints), hints
        (serving,) = [r for r in daemon.log_records() if r.get("msg") == "thinblock is serving"]
        assert "default_export" not in serving
        assert daemon.events("default-export-missing")  # said once, as a warning of its own
    finally:
        daemon.kill()
