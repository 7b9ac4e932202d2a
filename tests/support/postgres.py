"""A throwaway PostgreSQL cluster for tests: ``initdb`` + ``pg_ctl`` in a temporary directory,
listening only on a Unix socket in that directory, removed afterwards.  It needs no system
service and never touches a database it did not create.

PostgreSQL refuses to run as root: as root, the cluster runs as the ``postgres`` user
(``runuser -u postgres --``), and the temporary directory is handed to that user.  The binaries
are found under /usr/lib/postgresql/*/bin (the newest version there), never a fixed version.

``postgres_cluster`` (tests/conftest.py) is the session-scoped fixture every suite shares;
``fresh_database(cluster)`` gives a test an empty database of its own.

A cluster dies with the process that started it: a reaper (a small process of its own session,
so that a signal to pytest's process group does not reach it) waits for its owner to exit --
``remove()``d or not: pytest killed with SIGKILL, a crashed worker, Ctrl-C twice -- then stops
the postmaster (SIGQUIT: immediate shutdown) and deletes the directory.  ``remove()`` ends the
reaper itself, by its pid."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PG_USER = "thinblock"  # the cluster's superuser (trust authentication on its private socket)
PORT = 5432  # only names the socket file, inside the cluster's own directory
# Server options for the tests that show an immediate stop loses asynchronous commits: no
# background process writes the WAL behind their back (autovacuum's commits are synchronous: each
# flushes the WAL before it; the background writer, writing out a page, flushes the WAL up to
# it).  The WAL writer is frozen by the test itself (``freeze_wal_writer``).
LOSES_ASYNC_COMMITS = "-c autovacuum=off -c bgwriter_lru_maxpages=0"


def find_bin_dir() -> Path | None:
    """The newest /usr/lib/postgresql/VERSION/bin holding initdb and pg_ctl."""
    candidates = []
    for d in glob.glob("/usr/lib/postgresql/*/bin"):
        version = Path(d).parent.name
        if os.access(Path(d) / "initdb", os.X_OK) and os.access(Path(d) / "pg_ctl", os.X_OK):
            with contextlib.suppress(ValueError):
                candidates.append((float(version), Path(d)))
    return max(candidates)[1] if candidates else None


@dataclass
class PostgresCluster:
    bin_dir: Path
    root: Path  # the temporary directory: data/ and the socket
    run_as: str | None  # "postgres" when we are root
    durable: bool = False  # fsync and full page writes as the server's defaults have them
    reaper: subprocess.Popen[bytes] | None = None  # removes the cluster when its owner dies
    options: str = ""  # more server options (-c name=value ...), kept across restarts

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{PG_USER}@/{database}?host={self.socket_dir}&port={PORT}"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin_dir / args[0]), *args[1:]]
        if self.run_as is not None:
            cmd = ["runuser", "-u", self.run_as, "--", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=120)

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", PG_USER, "--auth=trust", "-E", "UTF8", "--no-sync")

    def start(self) -> None:
        # fsync off: a test cluster needs no power-cut safety (a restart or kill -9 of the
        # server still loses nothing: the OS keeps what was written); commits stay synchronous.
        # A durable cluster (the benchmark's) keeps the server's defaults: fsync at every commit.
        options = f"-k {self.socket_dir} -c listen_addresses='' -p {PORT} -c max_connections=200"
        if not self.durable:
            options += " -c fsync=off -c full_page_writes=off -c shared_buffers=16MB"
        if self.options:
            options += " " + self.options
        result = self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.root / "log"),
            "-o",
            options,
            "-w",
            "start",
            check=False,
        )
        if result.returncode != 0:
            log = (self.root / "log").read_text(errors="replace") if (self.root / "log").exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {result.stderr}{result.stdout}\n{log[-2000:]}")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def kill(self) -> None:
        """kill -9 of the postmaster (its children follow when they notice)."""
        pid_file = self.data / "postmaster.pid"
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, 9)

    def _children(self, title: str) -> list[int]:
        """The postmaster's children whose process title names ``title`` ("walwriter")."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        found = []
        for stat in glob.glob("/proc/[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = Path(stat).read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == postmaster:
                    cmdline = Path(stat).with_name("cmdline").read_bytes()
                    if title.encode() in cmdline:
                        found.append(int(Path(stat).parent.name))
        return found

    def freeze_wal_writer(self) -> None:
        """SIGSTOP the WAL writer: from now on an asynchronous commit reaches the WAL files only
        when a synchronous one (or a full WAL buffer) writes it, so an immediate stop loses it
        for certain, not only when the WAL writer had not woken yet (``crash``)."""
        (pid,) = self._children("walwriter")
        os.kill(pid, signal.SIGSTOP)

    def crash(self, *, start: bool = True) -> None:
        """``pg_ctl -m immediate`` (the server ends without writing its WAL buffers: what a
        crash of it loses), then start again unless told not to.  A frozen WAL writer is killed
        first (stopped, it would not end at the immediate stop's signal)."""
        for pid in self._children("walwriter"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.stop("immediate")
        if start:
            self.start()

    def sql(self, statement: str, database: str = "postgres") -> None:
        import psycopg

        with psycopg.connect(self.url(database), autocommit=True) as conn:
            conn.execute(statement)  # type: ignore[arg-type]

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
        if self.reaper is not None:
            self.reaper.terminate()
            self.reaper.wait(30)
            self.reaper = None


# The reaper: waits for the owner (argv[1]) to exit, then stops the postmaster named by
# ROOT/data/postmaster.pid with SIGQUIT (PostgreSQL's immediate shutdown) and deletes ROOT
# (argv[2]).  pidfd_open waits without polling; polling is the fallback on old kernels.
_REAPER = """
import os, select, shutil, signal, sys, time
owner, root = int(sys.argv[1]), sys.argv[2]
signal.signal(signal.SIGINT, signal.SIG_IGN)
try:
    fd = os.pidfd_open(owner)
    select.select([fd], [], [])
except (AttributeError, OSError):
    while True:
        try:
            os.kill(owner, 0)
        except ProcessLookupError:
            break
        time.sleep(0.5)
try:
    with open(os.path.join(root, "data", "postmaster.pid")) as f:
        pid = int(f.read().split()[0])
    os.kill(pid, signal.SIGQUIT)
    for _ in range(300):
        os.kill(pid, 0)
        time.sleep(0.1)
except (OSError, ValueError, IndexError):
    pass
shutil.rmtree(root, ignore_errors=True)
"""


def _start_reaper(root: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", _REAPER, str(os.getpid()), str(root)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # not in pytest's process group: a signal to the group spares it
    )


def unavailable_reason() -> str | None:
    """Why a cluster cannot be started here (None: it can)."""
    if find_bin_dir() is None:
        return "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb; `make setup` installs it)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run PostgreSQL as"
    return None


def start_cluster(*, durable: bool = False, options: str = "") -> PostgresCluster:
    bin_dir = find_bin_dir()
    assert bin_dir is not None
    root = Path(tempfile.mkdtemp(prefix="thinblock-pg-"))
    run_as = None
    if os.geteuid() == 0:
        run_as = "postgres"
        user = pwd.getpwnam(run_as)
        os.chown(root, user.pw_uid, user.pw_gid)
    os.chmod(root, 0o755)
    cluster = PostgresCluster(bin_dir, root, run_as, durable, reaper=_start_reaper(root), options=options)
    try:
        cluster.init()
        cluster.start()
    except BaseException:
        cluster.remove()
        raise
    return cluster


@contextlib.contextmanager
def throwaway_cluster(options: str = "") -> Iterator[PostgresCluster]:
    """A cluster of its own for a fixture, removed afterwards; the test is skipped, with the
    reason, where none can be started.  ``options``: more server options."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    cluster = start_cluster(options=options)
    try:
        yield cluster
    finally:
        cluster.remove()


@contextlib.contextmanager
def fresh_database(cluster: PostgresCluster) -> Iterator[str]:
    """An empty database of the cluster (dropped afterwards); yields its URL."""
    name = "t_" + uuid.uuid4().hex[:16]
    cluster.sql(f"CREATE DATABASE {name}")
    try:
        yield cluster.url(name)
    finally:
        with contextlib.suppress(Exception):
            cluster.sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
