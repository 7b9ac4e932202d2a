"""Fixtures of the drills: daemons in temporary directories, killed whatever happens."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.drills.harness import Daemon


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """``make_daemon(name="d", config=None)``: a Daemon on ``tmp_path/name/data`` (not started)."""
    made: list[Daemon] = []

    def make(name: str = "d", *, config: str | None = None) -> Daemon:
        work = tmp_path / name
        work.mkdir(parents=True, exist_ok=True)
        daemon = Daemon(work / "data", work, config=config)
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        daemon.close()


@pytest.fixture
def fio() -> str:
    path = shutil.which("fio")
    if path is None:
        pytest.skip("fio is not installed (make deps installs it)")
    return path
