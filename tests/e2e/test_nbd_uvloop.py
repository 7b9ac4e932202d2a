"""The same server on uvloop, as the daemon runs it: the event loop in a thread of its own,
real clients and a few hostile byte streams from this thread."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from thinblock.nbd.server import NBDServer

from .memvolume import MiB
from .nbd_helpers import STANDARD_VOLUMES, info_payload, mem_provider, option, read_volume, request

uvloop = pytest.importorskip("uvloop")

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("qemu-io", "nbdinfo", "nbdcopy", "fio")),
        reason="needs qemu-utils, libnbd-bin and fio",
    ),
]


class LoopThread:
    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="uvloop", daemon=True)
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def uv_server(tmp_path: Path) -> Iterator[tuple[LoopThread, NBDServer, Any]]:
    runner = LoopThread()
    sockdir = tempfile.mkdtemp(prefix="tbnbd")
    factory = mem_provider(STANDARD_VOLUMES, tmp_path)
    provider = runner.call(factory.__aenter__())
    server = NBDServer(provider, default_export="vol0")
    runner.call(server.start("127.0.0.1", 0, unix_path=f"{sockdir}/nbd.sock"))
    try:
        yield runner, server, provider
    finally:
        runner.call(server.stop())
        runner.call(factory.__aexit__(None, None, None))
        runner.close()
        shutil.rmtree(sockdir, ignore_errors=True)


def sh(*argv: str, cwd: Path | None = None) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, cwd=cwd)
    assert result.returncode == 0, f"{argv}: {result.stdout}\n{result.stderr}"
    return result.stdout


def raw_connect(server: NBDServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    assert len(recv_exact(sock, 18)) == 18
    return sock


def recv_exact(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, "connection closed"
        out += chunk
    return out


def closed_by_server(sock: socket.socket) -> bool:
    try:
        while sock.recv(65536):
            pass
    except (ConnectionError, TimeoutError):
        return False
    return True


def test_real_clients_and_hostile_streams_on_uvloop(uv_server, tmp_path: Path) -> None:
    runner, server, provider = uv_server
    base = f"nbd://127.0.0.1:{server.port}"
    out = sh(
        "qemu-io",
        "-f",
        "raw",
        "-c",
        "write -z -u 0 40M",
        "-c",
        "read -P 0 0 1M",
        "-c",
        "write -P 0x61 1023k 2k",
        "-c",
        "read -P 0x61 1023k 2k",
        "-c",
        f"write -P 0x62 {64 * MiB - 512} 512",
        "-c",
        f"read -P 0x62 {64 * MiB - 512} 512",
        f"{base}/vol0",
    )
    assert "failed" not in out
    sh(
        "fio",
        "--name=uv",
        "--ioengine=nbd",
        f"--uri={base}/vol1",
        "--thread",
        "--numjobs=2",
        "--iodepth=16",
        "--size=2M",
        "--offset_increment=2M",
        "--bs=16k",
        "--rw=randwrite",
        "--verify=crc32c",
        "--verify_state_save=0",
        "--do_verify=1",
        cwd=tmp_path,
    )
    image = tmp_path / "copy.img"
    sh("nbdcopy", f"nbd+unix:///vol1?socket={server.unix_path}", str(image))
    assert image.read_bytes() == runner.call(read_volume(provider.open_volume("vol1")))
    extents = json.loads(sh("nbdinfo", "--map", "--json", f"{base}/vol1"))
    assert any(not e["type"] & 1 for e in extents) and any(e["type"] & 1 for e in extents)

    # A refused write's payload is consumed and the stream stays in step.
    sock = raw_connect(server)
    sock.sendall(struct.pack(">I", 3) + option(7, info_payload("vol1")))
    while True:
        _magic, _opt, reply, length = struct.unpack(">QIII", recv_exact(sock, 20))
        recv_exact(sock, length)
        if reply == 1:
            break
    sock.sendall(request(1, 1, 16 * MiB, 4096) + b"\x25" * 4096 + request(0, 2, 0, 8))
    assert struct.unpack(">IIQ", recv_exact(sock, 16)) == (0x67446698, 28, 1)
    assert struct.unpack(">IIQ", recv_exact(sock, 16)) == (0x67446698, 0, 2)
    recv_exact(sock, 8)
    # then a bad magic: disconnected
    sock.sendall(b"\xde\xad\xbe\xef" + bytes(24))
    assert closed_by_server(sock)
    sock.close()

    # A 1 GiB option: refused with NBD_REP_ERR_TOO_BIG, then disconnected.
    sock = raw_connect(server)
    sock.sendall(struct.pack(">I", 1) + option(7, length=1 << 30))
    _magic, _opt, reply, length = struct.unpack(">QIII", recv_exact(sock, 20))
    assert reply == 0x80000009
    assert closed_by_server(sock)
    sock.close()

    # Many connections dropped at once do not disturb the loop.
    for _ in range(200):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    out = sh("qemu-io", "-f", "raw", "-c", "read -P 0x61 1023k 2k", f"{base}/vol0")
    assert "failed" not in out
