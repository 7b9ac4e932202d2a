"""The NBD servers the benchmark measures, each behind the same small interface:
``server.instance(workdir, connections)`` starts a *fresh* one (new image, file or data
directory) and yields its NBD URI; leaving the block stops it and deletes its files.

The peers are started as ../shared/bench/peers.sh starts them.  thinblock is started
either as the daemon (``thinblock serve`` + the CLI) or, while that does not exist yet, by
``bench.launch_thinblock`` (the engine API and the NBD server in one small process).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

HOST = "127.0.0.1"  # loopback only
EXPORT = "vol"
START_TIMEOUT = 30.0


class ServerError(RuntimeError):
    pass


def free_port() -> int:
    """A free loopback TCP port (bound then released; the server binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the harness dies, so no server outlives it."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


class Process:
    """A server process we started: its output goes to a log file, stop() ends it by pid."""

    def __init__(self, cmd: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.cmd = list(cmd)
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 -- closed in stop()
        self.popen = subprocess.Popen(
            self.cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=_die_with_parent,
        )

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 2) -> str:
        """The last lines of its output (for a Python traceback: the exception)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        tail = [line.strip() for line in text.strip().splitlines()[-lines:]]
        return " | ".join(tail)

    def stop(self, timeout: float = 15.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()


def run_quiet(cmd: Sequence[str], timeout: float = 60.0) -> str:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise ServerError(f"{' '.join(cmd)} exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


def wait_for_port(port: int, process: Process, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.alive():
            raise ServerError(f"{process.cmd[0]} exited {process.popen.returncode}: {process.log_tail()}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            return
        time.sleep(0.05)
    raise ServerError(f"{process.cmd[0]} did not listen on port {port} within {timeout:.0f} s")


def wait_for_export(uri: str, expected_size: int, process: Process, timeout: float = START_TIMEOUT) -> None:
    """Ready means an NBD client completes the handshake and sees the export's size."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not process.alive():
            raise ServerError(f"{process.cmd[0]} exited {process.popen.returncode}: {process.log_tail()}")
        proc = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            size = int(proc.stdout.strip())
            if size != expected_size:
                raise ServerError(f"{uri} has size {size}, expected {expected_size}")
            return
        last = proc.stderr.strip()
        time.sleep(0.1)
    raise ServerError(
        f"{uri} not ready within {timeout:.0f} s: {last}; server log: {process.log_tail(1)[-300:]}"
    )


@dataclass
class Running:
    """A started server: its URI; stop() ends the process and deletes its files."""

    uri: str
    process: Process
    directory: Path

    @property
    def pid(self) -> int:
        return self.process.popen.pid

    def stop(self) -> None:
        try:
            self.process.stop()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


def _start(
    cmd: Sequence[str],
    directory: Path,
    uri: str,
    port: int,
    size: int,
    env: dict[str, str] | None = None,
    timeout: float = START_TIMEOUT,
) -> Running:
    """Start ``cmd``, wait until ``uri`` serves an export of ``size``; stop it on failure."""
    process = Process(cmd, directory / "server.log", env)
    try:
        wait_for_port(port, process, timeout=timeout)
        wait_for_export(uri, size, process)
    except BaseException:
        process.stop()
        raise
    return Running(uri, process, directory)


class Server(Protocol):
    key: str  # short name used in --servers and in the table

    @property
    def description(self) -> str:
        """How it is run, for the report."""
        ...

    def start(self, workdir: Path, connections: int) -> Running:
        """A fresh instance (new image, file or data directory), serving when this returns."""
        ...


@contextlib.contextmanager
def serving(server: Server, workdir: Path, connections: int) -> Iterator[Running]:
    """Start a fresh instance of ``server``, yield it (URI, process), stop it and delete its files."""
    running = server.start(workdir, connections)
    try:
        yield running
    finally:
        running.stop()


@dataclass
class PeerServer:
    """qemu-nbd or nbdkit: prepare a file, start one command, serve until stopped."""

    key: str
    description: str
    export_size: int
    uri_export: str  # the export name in the URI ("" for nbdkit, which ignores it)

    def prepare(self, directory: Path) -> None:
        """Create the backing image or file (fresh for every instance)."""

    def command(self, directory: Path, port: int, connections: int) -> list[str]:
        raise NotImplementedError

    def start(self, workdir: Path, connections: int) -> Running:
        directory = _fresh_dir(workdir, self.key)
        try:
            self.prepare(directory)
            port = free_port()
            uri = f"nbd://{HOST}:{port}/{self.uri_export}"
            return _start(self.command(directory, port, connections), directory, uri, port, self.export_size)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise


@dataclass
class QemuNbd(PeerServer):
    key: str = "qemu-nbd"
    description: str = "qemu-nbd -f qcow2 --cache=writeback on a fresh qcow2 image"
    export_size: int = 16 * 2**30
    uri_export: str = EXPORT

    def prepare(self, directory: Path) -> None:
        run_quiet(["qemu-img", "create", "-f", "qcow2", str(directory / "a.qcow2"), str(self.export_size)])

    def command(self, directory: Path, port: int, connections: int) -> list[str]:
        # --shared: qemu-nbd serves one client at a time unless told more (peers.sh needs
        # no more than one); the 4-connection profiles need 4.
        return [
            "qemu-nbd", "-f", "qcow2", "-x", EXPORT, "-p", str(port), "-b", HOST, "--persistent",
            "--cache=writeback", f"--shared={max(connections, 1)}", str(directory / "a.qcow2"),
        ]  # fmt: skip


@dataclass
class NbdkitFile(PeerServer):
    key: str = "nbdkit-file"
    description: str = "nbdkit file plugin on a fresh sparse raw file"
    export_size: int = 16 * 2**30
    uri_export: str = ""

    def prepare(self, directory: Path) -> None:
        with open(directory / "b.raw", "wb") as raw:
            raw.truncate(self.export_size)

    def command(self, directory: Path, port: int, connections: int) -> list[str]:
        return [
            "nbdkit",
            "-f",
            "--exit-with-parent",
            "-p",
            str(port),
            "-i",
            HOST,
            "file",
            str(directory / "b.raw"),
        ]


@dataclass
class NbdkitNull(PeerServer):
    key: str = "nbdkit-null"
    description: str = "nbdkit null plugin (the protocol ceiling: no storage at all)"
    export_size: int = 16 * 2**30
    uri_export: str = ""

    def command(self, directory: Path, port: int, connections: int) -> list[str]:
        return [
            "nbdkit",
            "-f",
            "--exit-with-parent",
            "-p",
            str(port),
            "-i",
            HOST,
            "null",
            str(self.export_size),
        ]


# --- thinblock -------------------------------------------------------------------------------------


def thinblock_executable() -> str | None:
    """The ``thinblock`` console script of this interpreter's environment (the .venv)."""
    beside = Path(sys.executable).parent / "thinblock"
    if beside.exists():
        return str(beside)
    return shutil.which("thinblock")


def thinblock_env() -> dict[str, str]:
    """The environment of a thinblock child: ``bench`` and (when not installed) ``src`` importable."""
    env = dict(os.environ)
    root = Path(__file__).resolve().parent.parent
    paths = [str(root), str(root / "src"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


@dataclass
class ThinblockServer:
    """thinblock with a fresh data directory, two file PDs and one pool of the given RAID level.

    ``launch`` is "daemon" (``thinblock serve`` set up through the CLI and the REST API; the
    default: a daemon that cannot start is a failed server, never silently replaced),
    "engine" (``python -m bench.launch_thinblock``: the engine API and the NBD server
    directly) or "auto": the daemon, falling back to the engine launcher for the rest of the
    run when the daemon cannot be started.  ``launched_with`` and ``fallback_reason`` say
    what happened; a fallback is marked in the description (``FALLBACK``) and ``fell_back``
    is true, so the report flags the server (it measured something other than the daemon).
    """

    key: str
    raid: int
    launch: str = "daemon"
    event_loop: str | None = None  # "uvloop" or "asyncio"; None: the daemon's default (launcher: uvloop)
    cache_mode: str = "writethrough"  # the VV's cache mode: "writethrough" (the default) or "writeback"
    direct_io: bool = False  # the PDs opened for direct I/O (engine.pd_direct_io)
    export_size: int = 16 * 2**30
    pd_size: int = 16 * 2**30
    launched_with: str | None = None
    fallback_reason: str | None = None
    # The metadata store: None for the data directory's SQLite store, else a function giving the
    # URL of a fresh (empty) store for each instance (bench.metadata_backends: PostgreSQL).
    metadata: Callable[[], str] | None = None
    metadata_name: str = "SQLite"

    @property
    def description(self) -> str:
        how = self.launched_with or self.launch
        if self.event_loop:
            how += f", {self.event_loop} event loop"
        pds = "sparse file PDs opened for direct I/O" if self.direct_io else "sparse file PDs"
        cache = "write-back" if self.cache_mode == "writeback" else "write-through"
        text = (
            f"thinblock ({how}), fresh data dir, RAID {self.raid} pool (set size 2) over two "
            f"{self.pd_size // 2**30} GiB {pds}, one {self.export_size // 2**30} GiB {cache} VV"
        )
        if self.metadata is not None:
            text += f", metadata in {self.metadata_name}"
        if self.fallback_reason:
            text = f"**FALLBACK: the engine launcher, not the daemon** -- {text}; {self.fallback_reason}"
        return text

    @property
    def fell_back(self) -> bool:
        """True when the daemon could not start and the engine launcher ran instead."""
        return self.fallback_reason is not None

    def start(self, workdir: Path, connections: int) -> Running:
        use_daemon = self.launch == "daemon" or (self.launch == "auto" and self.launched_with != "engine")
        if use_daemon:
            try:
                running = self._start_daemon(workdir)
            except ServerError as exc:
                if self.launch == "daemon" or self.launched_with == "daemon":
                    raise
                self.fallback_reason = f"daemon not usable ({exc}), used the engine launcher"
            else:
                self.launched_with = "daemon"
                return running
        running = self._start_engine(workdir)
        self.launched_with = "engine"
        return running

    def _start_daemon(self, workdir: Path) -> Running:
        exe = thinblock_executable()
        if exe is None:
            raise ServerError("no thinblock executable")
        directory = _fresh_dir(workdir, self.key)
        try:
            nbd_port, api_port = free_port(), free_port()
            api = f"http://{HOST}:{api_port}"
            # --no-first-start: the bench creates its own PDs, pool and VV (not the first-start defaults).
            cmd = [
                exe, "serve", "--data", str(directory / "data"), "--nbd", f"{HOST}:{nbd_port}",
                "--api", f"{HOST}:{api_port}", "--no-first-start",
                # The PD files lie beside the data directory: pd add refuses them elsewhere.
                "--pd-allowed-root", str(directory),
            ]  # fmt: skip
            if self.metadata is not None:
                cmd += ["--metadata", self.metadata()]
            config_lines = []
            if self.event_loop:
                config_lines.append(f'event_loop = "{self.event_loop}"')
            if self.direct_io:
                config_lines += ["[engine]", "pd_direct_io = true"]
            if config_lines:
                config = directory / "thinblock.toml"
                config.write_text("\n".join(config_lines) + "\n")
                cmd += ["--config", str(config)]
            process = Process(cmd, directory / "server.log", thinblock_env())
            try:
                wait_for_port(api_port, process)
                cli = [exe, "--api", api]
                for index in range(2):
                    pd_path = directory / f"pd{index}.img"
                    run_quiet([*cli, "pd", "add", str(pd_path), "--size", str(self.pd_size)])
                run_quiet([*cli, "pool", "create", "bench", "--raid", str(self.raid), "--set-size", "2"])
                run_quiet(
                    [*cli, "vv", "create", EXPORT, "--pool", "bench", "--size", str(self.export_size),
                     "--cache", self.cache_mode]
                )  # fmt: skip
                uri = f"nbd://{HOST}:{nbd_port}/{EXPORT}"
                wait_for_export(uri, self.export_size, process)
            except subprocess.TimeoutExpired as exc:
                process.stop()
                raise ServerError(f"thinblock CLI timed out: {exc}") from exc
            except BaseException:
                process.stop()
                raise
            return Running(uri, process, directory)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise

    def _start_engine(self, workdir: Path) -> Running:
        directory = _fresh_dir(workdir, self.key)
        try:
            port = free_port()
            cmd = [
                sys.executable, "-m", "bench.launch_thinblock", "--data", str(directory / "data"),
                "--pd-dir", str(directory), "--port", str(port), "--raid", str(self.raid),
                "--pd-size", str(self.pd_size), "--vv-size", str(self.export_size), "--export", EXPORT,
                "--loop", self.event_loop or "uvloop", "--cache", self.cache_mode,
            ]  # fmt: skip
            if self.direct_io:
                cmd.append("--direct-io")
            uri = f"nbd://{HOST}:{port}/{EXPORT}"
            return _start(cmd, directory, uri, port, self.export_size, env=thinblock_env(), timeout=120)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise


# --- what a server costs -----------------------------------------------------------------------------

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def parse_proc_stat_cpu(text: str) -> float:
    """CPU seconds (user + system, every thread) from the text of /proc/PID/stat.  The command
    name (field 2) is in parentheses and may hold spaces, so fields are counted after its ')'."""
    fields = text[text.rindex(")") + 2 :].split()
    # After the name: state is field 3, so utime (14) and stime (15) are at 11 and 12 here.
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def parse_peak_rss(status_text: str) -> int:
    """Peak resident set size in bytes (VmHWM) from the text of /proc/PID/status."""
    for line in status_text.splitlines():
        if line.startswith("VmHWM:"):
            value, unit = line.split()[1:3]
            assert unit == "kB", unit
            return int(value) * 1024
    raise ValueError("no VmHWM line")


def process_cpu_seconds(pid: int) -> float | None:
    """CPU seconds process ``pid`` has used so far (None when it cannot be read)."""
    try:
        return parse_proc_stat_cpu(Path(f"/proc/{pid}/stat").read_text())
    except (OSError, ValueError, IndexError):
        return None


def process_peak_rss(pid: int) -> int | None:
    try:
        return parse_peak_rss(Path(f"/proc/{pid}/status").read_text())
    except (OSError, ValueError, IndexError):
        return None


def _fresh_dir(workdir: Path, key: str) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    for n in range(1_000_000):
        candidate = workdir / f"{key}-{n}"
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise ServerError("no fresh directory")


def thinblock_variants(launch: str = "daemon", event_loop: str | None = None) -> list[ThinblockServer]:
    """thinblock's variants: RAID 0 and RAID 1 (the default), write-through (the default) and
    write-back, PDs through the page cache (the default) and opened for direct I/O."""
    out = []
    for direct in (False, True):
        for cache in ("writethrough", "writeback"):
            for raid in (0, 1):
                key = (
                    f"thinblock-raid{raid}"
                    + ("-wb" if cache == "writeback" else "")
                    + ("-direct" if direct else "")
                )
                out.append(ThinblockServer(key, raid, launch, event_loop, cache_mode=cache, direct_io=direct))
    return out


def all_servers(thinblock_launch: str = "daemon", thinblock_loop: str | None = None) -> list[Server]:
    """Every server of a run, in the order they run."""
    return [*thinblock_variants(thinblock_launch, thinblock_loop), QemuNbd(), NbdkitFile(), NbdkitNull()]


SERVER_KEYS = tuple(server.key for server in all_servers())
# A run without --servers: everything but the direct-I/O variants (--direct-io adds them).
DEFAULT_SERVER_KEYS = tuple(key for key in SERVER_KEYS if not key.endswith("-direct"))
