"""The daemon's allocator settings (memory.py)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_warm_heap_takes_on_glibc() -> None:
    # In a child: the settings are process-wide and would leak into the test run.
    code = "from thinblock.memory import warm_heap; print(warm_heap())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
