"""The real ``thinblock serve`` as a subprocess, for every suite that needs a live daemon: the
end-to-end tests (tests/e2e) and the drills (tests/drills).

One launcher, so that all of them start, watch and stop the daemon the same way:

* Ports.  NBD and the API listen on port 0 of loopback (flags ``--nbd``/``--api``; iSCSI too when
  a test passes ``args=("--iscsi", "127.0.0.1:0")``), so parallel
  tests never race for a port; the ports the kernel picked are read from the daemon's ``ready``
  log line, in either log format (logfmt, the default, or JSON).
* Configuration.  Optional TOML text written to ``WORKDIR/thinblock.toml``; the data directory,
  the listen addresses and the log format are flags, which win over the file.  Extra ``serve``
  flags go after ours, so a test can override any of them (``args=("--api", "127.0.0.1:9")``).
* Logs.  Every start writes its own ``daemon-N.log`` in the work directory (stdout and stderr
  together), so a restart never overwrites what the previous run said.
* Life cycle.  One data directory, one process at a time: ``start()`` waits until it serves,
  ``spawn()`` does not (for a daemon that should refuse to start), ``stop()`` is SIGTERM (or the
  signal given) and the exit status, ``kill()`` is SIGKILL (the crash the drills are about), and
  ``start()`` again restarts on the same data.  Each daemon is SIGKILLed by the kernel if the
  thread that started it dies, so a crashed test run leaves no daemon behind; start daemons from
  the thread that outlives them (the test's own).
* Environment.  ``THINBLOCK_API_TOKEN`` is removed, so a developer's token never changes what a
  test's daemon demands; ``THINBLOCK_TEST_EVENT_LOOP=asyncio`` runs it on the standard event loop
  instead of uvloop (debugging only).

Clients: the CLI in process (``cli``: the same code as the command, without a Python start-up
per call) or as the real console script (``cli_subprocess``: as an administrator types it), the
REST API (``http`` for an httpx client, ``api_request``/``api_ok``/``api_get`` for one call each,
a connection of its own that is closed at once, so the daemon's open-file count is not inflated
by a test's idle keep-alive connection), and the NBD URIs for real NBD clients.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx

from thinblock.cli import main as cli_main

LOOPBACK = "127.0.0.1"
# ``python -m thinblock``: what the tests run when they want the code, not the installed command.
THINBLOCK_MODULE = [sys.executable, "-m", "thinblock"]
# The console script of this virtual environment: what an administrator types.
THINBLOCK_SCRIPT = str(Path(sys.executable).parent / "thinblock")
START_TIMEOUT = 60.0  # seconds for the daemon to say it is serving (a loaded 2-core CI machine)
STOP_TIMEOUT = 60.0  # seconds for a clean shutdown (it flushes the write-back cache first)
LOG_TAIL_LINES = 40  # of the daemon's log in a failure message

# Small first-start defaults, so that a test's pool fills and grows within a few MiB.
SMALL_CONFIG = """
[engine]
chunklet_size = "4MiB"

[first_start]
pd_size = "64MiB"
growth_increment = "8MiB"
volume_size = "1GiB"
"""

# SMALL_CONFIG with a history sampled every half second and forecasts after one second, toward
# a horizon of a year: a test sees allocation rates, forecasts and pool-limit-forecast at once.
FAST_FORECAST_CONFIG = (
    SMALL_CONFIG
    + """
[history]
interval = 0.5
forecast_horizon = 31536000.0
forecast_min_window = 1.0
"""
)


class DaemonFailed(AssertionError):
    """The daemon did not start, died, or did not stop; the message carries the end of its log.
    An AssertionError, so that pytest reports it as the test's failure, not as an error in it."""


# --- configuration -------------------------------------------------------------------------------


def write_config(workdir: Path, text: str) -> Path:
    """``WORKDIR/thinblock.toml`` with ``text``; its path."""
    path = workdir / "thinblock.toml"
    path.write_text(text)
    return path


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(str(value))


def toml_text(tables: Mapping[str, Mapping[str, Any]]) -> str:
    """TOML for a configuration given as tables of scalars, e.g. ``{"engine": {"chunklet_size":
    "1MiB"}}``: for tests that build their configuration from constants."""
    lines: list[str] = []
    for name, table in tables.items():
        lines.append(f"\n[{name}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in table.items()]
    return "\n".join(lines) + "\n"


# --- the log -------------------------------------------------------------------------------------

# A logfmt pair: key=bare-value or key="JSON string" (thinblock.daemon.LogfmtFormatter).
_LOGFMT_PAIR = re.compile(r'([^\s=]+)=("(?:[^"\\]|\\.)*"|\S*)')


def parse_log_line(line: str) -> dict[str, Any] | None:
    """One line of the daemon's log as a record (``{"event": "ready", "api": ..., ...}``), in
    either format; None for anything else in the log (a traceback, a configuration error)."""
    if line.startswith("{"):
        try:
            doc = json.loads(line)
        except ValueError:
            return None
        return doc if isinstance(doc, dict) else None
    if line.startswith("ts="):
        record: dict[str, Any] = {}
        for key, raw in _LOGFMT_PAIR.findall(line):
            value: Any = raw
            if raw.startswith('"'):
                with contextlib.suppress(ValueError):
                    value = json.loads(raw)
            record[key] = value
        return record
    return None


def file_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file, for a failure message."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


# --- results -------------------------------------------------------------------------------------


@dataclass
class CliResult:
    """What the in-process CLI did: exit status, stdout, stderr."""

    code: int
    out: str
    err: str

    def json(self) -> Any:
        assert self.code == 0, f"exit {self.code}: {self.err}"
        return json.loads(self.out)


# --- the daemon ----------------------------------------------------------------------------------


def _die_with_parent_hook() -> Callable[[], None] | None:
    """A ``preexec_fn`` that asks the kernel to SIGKILL the child when its parent thread dies
    (PR_SET_PDEATHSIG), or None where prctl is not available.  libc is looked up here, in the
    parent, so that the child only makes one call between fork and exec."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def hook() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGKILL))

    return hook


_DIE_WITH_PARENT = _die_with_parent_hook()
_POLL_INTERVAL = 0.02  # seconds between looks at the log while waiting for ``ready``


class Daemon:
    """One data directory and the ``thinblock serve`` processes run on it, one at a time.

    ``workdir`` holds the configuration file and the logs; the data directory is
    ``workdir/data`` unless given.  ``config`` is the text of the configuration file (None: no
    file); ``args`` are more ``serve`` flags; ``log_format`` is ``--log-format`` (None: the
    daemon's default, logfmt); ``token`` is the bearer token the clients here present (the daemon
    itself learns its token from the configuration)."""

    def __init__(
        self,
        workdir: Path,
        *,
        config: str | None = None,
        args: Sequence[str] = (),
        data_dir: Path | None = None,
        token: str | None = None,
        log_format: Literal["logfmt", "json"] | None = None,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.data_dir = data_dir if data_dir is not None else workdir / "data"
        self.args = tuple(args)
        self.token = token
        self.log_format = log_format
        loop = os.environ.get("THINBLOCK_TEST_EVENT_LOOP")
        if loop:
            config = f'event_loop = "{loop}"\n' + (config or "")
        self.config_path = write_config(workdir, config) if config is not None else None
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None
        self.starts = 0
        self.kills = 0
        # Where the running daemon listens, from its ``ready`` line ("" / None / 0 until then).
        self.api_url = ""  # http://127.0.0.1:PORT
        self.nbd_url: str | None = None  # nbd://127.0.0.1:PORT; None when it has no NBD TCP address
        self.nbd_port = 0
        self.iscsi_portal: str | None = None  # 127.0.0.1:PORT when started with --iscsi

    # --- life cycle ---
    def _argv(self) -> list[str]:
        argv = [*THINBLOCK_MODULE, "serve"]
        if self.config_path is not None:
            argv += ["--config", str(self.config_path)]
        argv += ["--data", str(self.data_dir), "--nbd", f"{LOOPBACK}:0", "--api", f"{LOOPBACK}:0"]
        # Tests keep PD files in their work directory, beside the data directory.
        argv += ["--pd-allowed-root", str(self.workdir)]
        if self.log_format is not None:
            argv += ["--log-format", self.log_format]
        return [*argv, *self.args]

    def _next_log_path(self) -> Path:
        """``daemon-N.log`` with the first N not used yet in the work directory (by this daemon
        or by another started there before, e.g. a restart in a new Daemon)."""
        n = 1
        while (self.workdir / f"daemon-{n}.log").exists():
            n += 1
        return self.workdir / f"daemon-{n}.log"

    def spawn(self) -> None:
        """Start the process and return at once (for a daemon that should refuse to start;
        ``start()`` waits until it serves)."""
        assert not self.running, "a daemon is already running on this data directory"
        self.starts += 1
        self.api_url, self.nbd_url, self.nbd_port = "", None, 0
        self.iscsi_portal = None
        self.log_path = self._next_log_path()
        env = dict(os.environ)
        env.pop("THINBLOCK_API_TOKEN", None)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self._argv(),
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=_DIE_WITH_PARENT,
            )

    def start(self, timeout: float = START_TIMEOUT) -> Daemon:
        """Start and wait for the ``ready`` line; DaemonFailed if it exits or never gets there."""
        self.spawn()
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        proc = self._process()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._take_ready():
                return
            if proc.poll() is not None:
                raise DaemonFailed(
                    f"thinblock serve exited with {proc.returncode} before it was ready:\n{self.log_tail()}"
                )
            time.sleep(_POLL_INTERVAL)
        raise DaemonFailed(f"thinblock serve was not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def wait_ready(self, timeout: float = START_TIMEOUT) -> Daemon:
        """After ``spawn``: wait for the ``ready`` line (a daemon that starts serving late)."""
        self._wait_ready(timeout)
        return self

    def start_expecting_failure(self, timeout: float = START_TIMEOUT) -> tuple[int, list[dict[str, Any]]]:
        """Start a daemon that should refuse to start: its exit status and its log records.
        If it starts serving instead, ``(0, records)`` is returned with the daemon running."""
        self.spawn()
        proc = self._process()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return proc.returncode, self.log_records()
            if self._take_ready():
                return 0, self.log_records()
            time.sleep(_POLL_INTERVAL)
        self.kill()
        raise DaemonFailed(f"thinblock serve neither failed nor started in {timeout:.0f} s")

    def _take_ready(self) -> bool:
        """Read the addresses from the ``ready`` log line, if it is there yet."""
        for record in self.log_records():
            if record.get("event") == "ready":
                self.api_url = str(record["api"]).removesuffix("/api/v1")
                nbd = record.get("nbd")
                self.nbd_url = str(nbd) if nbd else None
                self.nbd_port = int(self.nbd_url.rsplit(":", 1)[1]) if self.nbd_url else 0
                iscsi = record.get("iscsi")
                self.iscsi_portal = str(iscsi) if iscsi else None
                return True
        return False

    def _process(self) -> subprocess.Popen[bytes]:
        assert self.proc is not None, "the daemon was never started"
        return self.proc

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        return self._process().pid

    def wait_exit(self, timeout: float = STOP_TIMEOUT) -> int:
        """The exit status of a daemon expected to exit by itself (a refusal to start)."""
        return self._process().wait(timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """The clean shutdown: ``sig`` (SIGTERM unless told) and wait; the exit status.  A daemon
        that has not exited after ``timeout`` seconds is SIGKILLed and DaemonFailed raised."""
        proc = self._process()
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise DaemonFailed(
                    f"thinblock serve did not stop within {timeout:.0f} s after signal {sig}:\n"
                    f"{self.log_tail()}"
                ) from None
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL: no flush, no clean shutdown (the crash the drills are about); also the
        clean-up whatever state the daemon is in (nothing happens when it is not running)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
            self.kills += 1

    # --- addresses ---
    def uri(self, export: str) -> str:
        """The NBD URI of ``export`` on this daemon's TCP address."""
        assert self.nbd_url, "the daemon reported no NBD TCP address"
        return f"{self.nbd_url}/{export}"

    def iscsi_uri(self, target: str, lun: int = 0) -> str:
        """The libiscsi/qemu URI of an iSCSI target's LUN (a daemon started with ``--iscsi``)."""
        assert self.iscsi_portal, "the daemon reported no iSCSI address (start it with --iscsi)"
        return f"iscsi://{self.iscsi_portal}/{target}/{lun}"

    # --- its log ---
    def log_text(self) -> str:
        """Everything the current (or last) run wrote to stdout and stderr."""
        if self.log_path is None:
            return ""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def log_records(self) -> list[dict[str, Any]]:
        """The log lines of the current (or last) run, parsed (see ``parse_log_line``)."""
        return [r for r in map(parse_log_line, self.log_text().splitlines()) if r is not None]

    def events(self, event: str) -> list[str]:
        """The log lines (as written) of one event, e.g. ``hint`` or ``engine-closed``."""
        return [
            line
            for line in self.log_text().splitlines()
            if (record := parse_log_line(line)) is not None and record.get("event") == event
        ]

    def bad_log_records(self) -> list[dict[str, Any]]:
        """Records that mean a bug rather than a misbehaving client: errors and internal errors."""
        return [
            r
            for r in self.log_records()
            if r.get("level") in ("error", "critical")
            or "exc" in r
            or "internal error" in str(r.get("msg", ""))
        ]

    # --- its process, from /proc (leak checks) ---
    def rss(self) -> int:
        """Resident set size in bytes."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS in /proc status")

    def fds(self) -> int:
        """Open file descriptors."""
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def settled_fds(self, at_most: int, timeout: float = 30.0) -> int:
        """Open fds once they have come down to ``at_most`` (closing sockets takes the server a
        moment), or the last count after ``timeout`` seconds -- the caller asserts on it."""
        deadline = time.monotonic() + timeout
        while True:
            count = self.fds()
            if count <= at_most or time.monotonic() > deadline:
                return count
            time.sleep(0.1)

    # --- the CLI ---
    def cli(self, *args: str, token: str | None = None) -> CliResult:
        """``thinblock ARGS... --api URL [--token T]`` in process (``token=""``: none at all)."""
        out, err = io.StringIO(), io.StringIO()
        argv = [*args, "--api", self.api_url]
        token = token if token is not None else self.token
        if token:
            argv += ["--token", token]
        code = cli_main(argv, stdout=out, stderr=err)
        return CliResult(code, out.getvalue(), err.getvalue())

    def cli_json(self, *args: str) -> Any:
        """The in-process CLI with ``--json``: the parsed output; AssertionError on failure."""
        return self.cli(*args, "--json").json()

    def cli_subprocess(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """``thinblock --api URL ARGS...`` with the real console script, as an administrator types it."""
        argv = [THINBLOCK_SCRIPT, "--api", self.api_url]
        if self.token:
            argv += ["--token", self.token]
        return subprocess.run(
            [*argv, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )

    def cli_subprocess_json(self, *args: str, timeout: float = 120.0) -> Any:
        """``thinblock --api URL --json ARGS...`` (console script); the parsed JSON, None for no
        output.  AssertionError on failure."""
        result = self.cli_subprocess("--json", *args, timeout=timeout)
        assert result.returncode == 0, (
            f"thinblock {' '.join(args)} failed ({result.returncode}): {result.stderr}"
        )
        return json.loads(result.stdout) if result.stdout.strip() else None

    def alerts(self) -> list[dict[str, Any]]:
        """Every alert, cleared ones too (console script)."""
        return list(self.cli_subprocess_json("alerts", "--all"))

    # --- the REST API ---
    def _auth_headers(self, token: str | None = None) -> dict[str, str]:
        token = token if token is not None else self.token
        return {"authorization": f"Bearer {token}"} if token else {}

    def http(self, token: str | None = None) -> httpx.Client:
        """A new httpx client on the API's root URL (``token=""``: without a token); close it."""
        return httpx.Client(base_url=self.api_url, headers=self._auth_headers(token), timeout=30)

    def api_request(
        self, method: str, path: str, body: Any = None, timeout: float = 120.0
    ) -> tuple[int, Any]:
        """``method /api/v1{path}`` with a JSON body: (HTTP status, parsed JSON or None).  For
        set-up steps and polling; what an administrator does in a drill goes through the CLI."""
        if body is None and method not in ("GET", "HEAD"):
            body = {}  # the API takes state-changing calls only as JSON (its cross-site guard)
        data = None if body is None else json.dumps(body).encode()
        headers = self._auth_headers()
        if data is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(
            f"{self.api_url}/api/v1{path}", data=data, method=method, headers=headers
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw = response.read()
                return int(response.status), (json.loads(raw) if raw.strip() else None)
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                return int(exc.code), json.loads(raw)
            except ValueError:
                return int(exc.code), raw.decode(errors="replace")

    def api_ok(self, method: str, path: str, body: Any = None, timeout: float = 120.0) -> Any:
        """``api_request`` that must succeed (2xx); the parsed JSON."""
        status, doc = self.api_request(method, path, body, timeout)
        assert 200 <= status < 300, f"{method} {path} {body}: HTTP {status} {doc}"
        return doc

    def api_get(self, path: str, timeout: float = 10.0) -> Any:
        """GET ``/api/v1{path}``, the parsed JSON; quicker than the CLI inside a timed window.
        An HTTP error status raises urllib's HTTPError."""
        request = urllib.request.Request(f"{self.api_url}/api/v1{path}", headers=self._auth_headers())
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())


def start_daemon(
    workdir: Path,
    *,
    config: str | None = None,
    args: Sequence[str] = (),
    data_dir: Path | None = None,
    token: str | None = None,
    log_format: Literal["logfmt", "json"] | None = None,
    timeout: float = START_TIMEOUT,
) -> Daemon:
    """A started Daemon (the options are Daemon's); DaemonFailed if it does not serve."""
    daemon = Daemon(workdir, config=config, args=args, data_dir=data_dir, token=token, log_format=log_format)
    return daemon.start(timeout)


@contextlib.contextmanager
def running_daemon(
    workdir: Path,
    *,
    config: str | None = None,
    args: Sequence[str] = (),
    token: str | None = None,
    log_format: Literal["logfmt", "json"] | None = None,
    clean_stop: bool = False,
) -> Iterator[Daemon]:
    """``start_daemon`` for a ``with`` block, stopped with SIGTERM after it.  With ``clean_stop``
    the stop must exit 0 (its log is the failure's message): a fixture whose every test must
    leave the daemon able to stop cleanly.  Otherwise the exit status is not checked; a test
    that cares calls ``stop()`` in the block and asserts on it."""
    daemon = start_daemon(workdir, config=config, args=args, token=token, log_format=log_format)
    try:
        yield daemon
    finally:
        status = daemon.stop()
    if clean_stop:
        assert status == 0, daemon.log_text()
