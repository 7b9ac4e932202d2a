"""The throwaway PostgreSQL cluster of the tests (tests/support/postgres.py) dies with the process
that started it, even when that process is killed with SIGKILL and never runs its clean-up: the
postmaster stops and the cluster's directory is deleted."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.postgres import unavailable_reason

ROOT = Path(__file__).resolve().parents[2]

_OWNER = """
import time
from tests.support.postgres import start_cluster
cluster = start_cluster()
print(cluster.root, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_cluster_whose_owner_is_killed_is_stopped_and_removed() -> None:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    owner = subprocess.Popen([sys.executable, "-c", _OWNER], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    root: Path | None = None
    postmaster = 0
    try:
        assert owner.stdout is not None
        root = Path(owner.stdout.readline().strip())
        postmaster = int((root / "data" / "postmaster.pid").read_text().split()[0])
        assert _alive(postmaster)
        owner.kill()  # SIGKILL: no finally, no fixture teardown, no atexit
        owner.wait()
        deadline = time.monotonic() + 60
        while (_alive(postmaster) or root.exists()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(postmaster), "the cluster's postmaster outlived its owner"
        assert not root.exists(), f"{root} outlived its owner"
    finally:
        owner.kill()
        owner.wait()
        if postmaster and _alive(postmaster):  # the reaper failed: clean up after it
            os.kill(postmaster, signal.SIGQUIT)
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)
