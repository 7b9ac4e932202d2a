"""Fixtures of the drills: daemons in temporary directories, killed whatever happens."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.daemon import Daemon

# The drills build their own PDs, pools and volumes (no first-start defaults, no default export),
# and read the daemon's log as JSON.
DRILL_SERVE_ARGS = ("--no-first-start", "--default-export", "")


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """``make_daemon(name="d", config=None, args=())``: a Daemon on ``tmp_path/name/data`` (not
    started); ``args`` are more ``serve`` flags (after the drills' own, so they win); killed after
    the test, whatever its outcome."""
    made: list[Daemon] = []

    def make(name: str = "d", *, config: str | None = None, args: tuple[str, ...] = ()) -> Daemon:
        daemon = Daemon(tmp_path / name, config=config, args=(*DRILL_SERVE_ARGS, *args), log_format="json")
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        daemon.kill()


@pytest.fixture
def fio() -> str:
    path = shutil.which("fio")
    if path is None:
        pytest.skip("fio is not installed (make deps installs it)")
    return path
