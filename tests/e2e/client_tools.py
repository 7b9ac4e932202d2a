"""The NBD clients no one here wrote -- qemu-io, nbdinfo, qemu-img, nbdcopy -- run as
subprocesses against a daemon's exports by the end-to-end tests (the daemon itself is started by
tests/support/daemon.py)."""

from __future__ import annotations

import json
import subprocess


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
