"""The benchmark measures the real daemon: bench.servers.ThinblockServer (the launcher every
thinblock row of ``make bench`` uses) starts ``thinblock serve``, adds its two file PDs through
the CLI (``pd add`` admits them only inside the data directory or ``engine.pd_allowed_roots``),
creates the pool and the VV, and serves it over NBD.  In the 2026-12-03 run ``pd add`` refused
the PD files and every thinblock row silently measured the engine launcher instead."""

from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path

import pytest
from bench.servers import ServerError, ThinblockServer, serving

MiB = 1 << 20

pytestmark = pytest.mark.skipif(shutil.which("nbdinfo") is None, reason="needs nbdinfo (libnbd-bin)")


def test_the_bench_launcher_starts_the_daemon_and_adds_its_pds(tmp_path: Path) -> None:
    server = ThinblockServer("thinblock-raid1", 1, export_size=256 * MiB, pd_size=1024 * MiB)
    assert server.launch == "daemon", "the bench's default must be the daemon, never a silent fallback"
    with serving(server, tmp_path, connections=1) as running:
        assert server.launched_with == "daemon"
        assert not server.fell_back and "FALLBACK" not in server.description
        cmd = running.process.cmd
        api = cmd[cmd.index("--api") + 1]
        with urllib.request.urlopen(f"http://{api}/api/v1/pds", timeout=10) as response:
            pds = json.loads(response.read())
        paths = sorted(Path(pd["path"]).name for pd in pds)
        assert paths == ["pd0.img", "pd1.img"], pds


def test_a_daemon_that_cannot_start_fails_the_server_instead_of_falling_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("bench.servers.thinblock_executable", lambda: None)
    server = ThinblockServer("thinblock-raid0", 0, export_size=256 * MiB, pd_size=1024 * MiB)
    with pytest.raises(ServerError, match="no thinblock executable"):
        server.start(tmp_path, connections=1)
    assert server.launched_with is None


def test_an_explicit_auto_fallback_is_flagged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("bench.servers.thinblock_executable", lambda: None)
    server = ThinblockServer("thinblock-raid0", 0, launch="auto", export_size=256 * MiB, pd_size=1024 * MiB)
    with serving(server, tmp_path, connections=1):
        assert server.launched_with == "engine"
        assert server.fell_back
        assert server.description.startswith("**FALLBACK")
