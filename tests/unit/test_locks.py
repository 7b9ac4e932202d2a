"""One engine per data directory and per PD: the second one is refused with a clear error,
and the lock goes away with the first (a clean close, or the process dying)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.engine_helpers import make_engine
from thinblock.datalock import LOCK_FILE, lock_data_dir, share_data_dir
from thinblock.engine import Engine, EngineOptions
from thinblock.errors import Conflict, InvalidArgument
from thinblock.physical.pd import PhysicalDisk
from thinblock.units import MiB

OPTIONS = EngineOptions(allow_tiny_chunklets=True)


async def test_a_second_engine_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    first = await Engine.open(tmp_path, OPTIONS)
    with pytest.raises(Conflict, match=f"in use by another thinblock process \\(pid {os.getpid()}\\)"):
        await Engine.open(tmp_path, OPTIONS)
    await first.close()
    again = await Engine.open(tmp_path, OPTIONS)  # released by the close
    await again.close()


async def test_the_lock_dies_with_the_process(tmp_path: Path) -> None:
    code = (
        "import asyncio, sys, time\n"
        "from thinblock.engine import Engine\n"
        "async def main():\n"
        "    await Engine.open(sys.argv[1])\n"
        "    print('open', flush=True)\n"
        "    time.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "open"
        with pytest.raises(Conflict, match=f"pid {child.pid}"):
            await Engine.open(tmp_path, OPTIONS)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    deadline = time.monotonic() + 10
    while True:
        try:
            engine = await Engine.open(tmp_path, OPTIONS)
            break
        except Conflict:
            assert time.monotonic() < deadline, "the lock outlived the process"
            time.sleep(0.05)
    await engine.close()


async def test_a_pd_of_another_engine_is_refused(tmp_path: Path) -> None:
    """Its header names the other data directory (physical/admission.py): refused while that
    engine runs and after it closed.  The PD file lock still guards a PD against a second
    opener (a copy of the store, the same data directory id)."""
    a = await make_engine(tmp_path / "a", pds=1, pd_size=MiB)
    b = await Engine.open(tmp_path / "b", OPTIONS)
    taken = a.list_pds()[0].path
    with pytest.raises(InvalidArgument, match="of another data directory"):
        await b.add_pd(taken, chunklet_size=64 * 1024)
    assert b.list_pds() == []
    with pytest.raises(InvalidArgument, match="is in use"):
        PhysicalDisk.open(0, taken, size=None, chunklet_size=64 * 1024, create=False, allow_tiny=True)
    await a.close()
    with pytest.raises(InvalidArgument, match="of another data directory"):
        await b.add_pd(taken, chunklet_size=64 * 1024)
    assert b.list_pds() == []
    await b.close()


# --- the check's shared lock (datalock.share_data_dir) ---


def test_a_held_directory_refuses_a_second_holder_and_a_check(tmp_path: Path) -> None:
    fd = lock_data_dir(tmp_path)
    try:
        assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()}\n"
        with pytest.raises(Conflict, match=rf"in use by another thinblock process \(pid {os.getpid()}\)"):
            lock_data_dir(tmp_path)
        with pytest.raises(Conflict, match="in use"):
            share_data_dir(tmp_path)
    finally:
        os.close(fd)
    # Released: the check may take it now, and a daemon may once the check is over.
    shared = share_data_dir(tmp_path)
    assert shared is not None
    try:
        with pytest.raises(Conflict):
            lock_data_dir(tmp_path)  # a daemon cannot start in the middle of a check
    finally:
        os.close(shared)
    os.close(lock_data_dir(tmp_path))


def test_the_check_writes_nothing(tmp_path: Path) -> None:
    assert share_data_dir(tmp_path) is None  # no lock file: nothing created
    assert not (tmp_path / LOCK_FILE).exists()
    assert share_data_dir(tmp_path / "missing") is None
    (tmp_path / LOCK_FILE).write_text("4242\n")
    before = (tmp_path / LOCK_FILE).stat()
    shared = share_data_dir(tmp_path)
    assert shared is not None
    os.close(shared)
    after = (tmp_path / LOCK_FILE).stat()
    assert (tmp_path / LOCK_FILE).read_text() == "4242\n"  # the daemon's pid stays for its message
    assert after.st_mtime_ns == before.st_mtime_ns
