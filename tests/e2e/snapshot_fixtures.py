"""Sizes shared by the snapshot and backup e2e tests and their engine (the ``snapshots_served``
fixture in conftest.py)."""

from __future__ import annotations

MiB = 1 << 20
SIZE = 16 * MiB  # the volume "v"
REGION = 64 * 1024  # the pool's region size
