"""Start the real ``thinblock serve`` as a subprocess for the end-to-end tests, and drive it
only as an administrator and a host would: the CLI, the REST API, qemu-io, nbdinfo, nbdcopy.

Ports: the daemon is told to listen on port 0 (NBD and API) and the test reads the ports it
got from its ``event=ready`` log line, so parallel tests never race for a port.

The CLI runs in process (``thinblock.cli.main`` with real HTTP to the daemon): the same code
as the ``thinblock`` command without a Python start-up per call; a few tests run the real
console script as well.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from thinblock.cli import main as cli_main

THINBLOCK = [sys.executable, "-m", "thinblock"]
START_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0

# Small first-start defaults, so that a test's pool fills and grows within a few MiB.
SMALL_CONFIG = """
[engine]
chunklet_size = "4MiB"

[first_start]
pd_size = "64MiB"
growth_increment = "8MiB"
volume_size = "1GiB"
"""


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        assert self.code == 0, f"exit {self.code}: {self.err}"
        return json.loads(self.out)


@dataclass
class RunningDaemon:
    proc: subprocess.Popen[bytes]
    workdir: Path
    data_dir: Path
    log_path: Path
    api: str = ""  # http://127.0.0.1:PORT
    nbd: str | None = None  # nbd://127.0.0.1:PORT
    token: str | None = None
    _log_file: Any = field(default=None, repr=False)

    # --- driving it -------------------------------------------------------------------------------
    def export(self, volume: str) -> str:
        assert self.nbd, "the daemon reported no NBD TCP address"
        return f"{self.nbd}/{volume}"

    def cli(self, *args: str, token: str | None = None) -> CliResult:
        """The CLI, in process, against this daemon."""
        out, err = io.StringIO(), io.StringIO()
        argv = [*args, "--api", self.api]
        token = token if token is not None else self.token
        if token:
            argv += ["--token", token]
        code = cli_main(argv, stdout=out, stderr=err)
        return CliResult(code, out.getvalue(), err.getvalue())

    def cli_json(self, *args: str) -> Any:
        return self.cli(*args, "--json").json()

    def http(self, token: str | None = None) -> httpx.Client:
        headers = {}
        token = token if token is not None else self.token
        if token:
            headers["authorization"] = f"Bearer {token}"
        return httpx.Client(base_url=self.api, headers=headers, timeout=30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self, event: str) -> list[str]:
        return [line for line in self.log().splitlines() if f" event={event} " in line]

    # --- stopping it ------------------------------------------------------------------------------
    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(
                    f"the daemon did not stop within {timeout}s after {sig}:\n{self.log()}"
                ) from None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


_READY_RE = re.compile(r" event=ready .*?api=(\S+)")
_NBD_RE = re.compile(r" nbd=(nbd://\S+)")


def write_config(workdir: Path, text: str) -> Path:
    path = workdir / "thinblock.toml"
    path.write_text(text)
    return path


def start_daemon(
    workdir: Path,
    *,
    config: str = SMALL_CONFIG,
    args: tuple[str, ...] = (),
    token: str | None = None,
    data_dir: Path | None = None,
    log_name: str = "daemon.log",
    wait: bool = True,
) -> RunningDaemon:
    """Start ``thinblock serve`` in ``workdir`` (data in ``workdir/data`` unless given)."""
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = data_dir or workdir / "data"
    loop = os.environ.get("THINBLOCK_TEST_EVENT_LOOP")  # debugging: "asyncio" instead of uvloop
    config_path = write_config(workdir, (f'event_loop = "{loop}"\n' if loop else "") + config)
    log_path = workdir / log_name
    log_file = log_path.open("wb")
    argv = [
        *THINBLOCK,
        "serve",
        "--config",
        str(config_path),
        "--data",
        str(data_dir),
        "--nbd",
        "127.0.0.1:0",
        "--api",
        "127.0.0.1:0",
        *args,
    ]
    env = dict(os.environ)
    env.pop("THINBLOCK_API_TOKEN", None)
    proc = subprocess.Popen(
        argv, cwd=workdir, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, env=env
    )
    daemon = RunningDaemon(proc, workdir, data_dir, log_path, token=token, _log_file=log_file)
    if wait:
        wait_ready(daemon)
    return daemon


def wait_ready(daemon: RunningDaemon, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = daemon.log()
        match = _READY_RE.search(text)
        if match:
            daemon.api = match.group(1).removesuffix("/api/v1")
            line = text[match.start() :].splitlines()[0]
            nbd = _NBD_RE.search(line)
            daemon.nbd = nbd.group(1) if nbd else None
            return
        if daemon.proc.poll() is not None:
            raise AssertionError(
                f"the daemon exited with {daemon.proc.returncode} before it was ready:\n{text}"
            )
        time.sleep(0.02)
    daemon.kill()
    raise AssertionError(f"the daemon was not ready within {timeout}s:\n{daemon.log()}")


# --- the NBD clients no one here wrote -------------------------------------------------------------


def run_tool(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    return result


def qemu_io(uri: str, *commands: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """qemu-io on a raw NBD export; with check, every command must have succeeded."""
    argv = ["qemu-io", "-f", "raw"]
    for command in commands:
        argv += ["-c", command]
    result = run_tool(*argv, uri, check=False)
    failed = (
        result.returncode != 0
        or "Pattern verification failed" in result.stdout
        or "error" in (result.stdout + result.stderr).lower()
    )
    if check and failed:
        raise AssertionError(f"qemu-io {commands} on {uri} failed:\n{result.stdout}\n{result.stderr}")
    return result


def nbd_map(uri: str) -> list[tuple[int, int, str]]:
    """``nbdinfo --map``: (offset, length, description) extents."""
    result = run_tool("nbdinfo", "--map", "--json", uri)
    return [(e["offset"], e["length"], e["description"]) for e in json.loads(result.stdout)]


def nbd_size(uri: str) -> int:
    return int(run_tool("nbdinfo", "--size", uri).stdout.strip())


def data_extents(uri: str) -> list[tuple[int, int]]:
    """The allocated (non-hole) extents, adjacent ones merged."""
    merged: list[tuple[int, int]] = []
    for offset, length, description in nbd_map(uri):
        if "hole" in description:
            continue
        if merged and merged[-1][0] + merged[-1][1] == offset:
            merged[-1] = (merged[-1][0], merged[-1][1] + length)
        else:
            merged.append((offset, length))
    return merged
