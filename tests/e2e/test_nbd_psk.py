"""NBD over TLS-PSK (``nbd.tls_psk_file``, nbd/psk.py) with clients no one here wrote: libnbd's
nbdinfo (``nbds://USER@HOST/EXPORT?tls-psk-file=FILE``), qemu-io and qemu-img
(``--object tls-creds-psk,dir=DIR,username=USER``, which read DIR/keys.psk), and ``openssl
s_client`` forcing TLS 1.2 and TLS 1.3 on the TLS layer alone.  A wrong key, an unknown identity, a
plain client in required mode, garbage instead of a ClientHello: each refused, costing only its
connection.  Access rules by ``psk:NAME``.  The key file is made by the test.

What works, measured here: libnbd 1.14.2 and qemu 7.2 (both GnuTLS) negotiate TLS 1.3 with the
server's OpenSSL (the PSK server callback serves TLS 1.3 with SHA-256 suites); TLS 1.2 PSK
suites (ECDHE-PSK first) are offered too.  libnbd 1.14 takes the PSK username from the URI's user
part (``nbds://alice@HOST/...``): with only ``tls-username=alice`` in the query it fails with
"getlogin_r: No such device or address"."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import struct
import subprocess
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.daemon import SMALL_CONFIG, start_daemon
from thinblock.nbd.access import AccessList, AccessRule
from thinblock.nbd.protocol import TLSMode
from thinblock.nbd.psk import PSKError, PSKServerSession, TLSClosed, TLSFailed, load_keys
from thinblock.nbd.server import NBDServer

from .memvolume import MemProvider, MemVolume, MiB
from .nbd_helpers import run

pytestmark = pytest.mark.e2e

ALICE_KEY = "a1" * 32
BOB_KEY = "b0" * 16
OPT_STARTTLS = 5


def write_keys(directory: Path, lines: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "keys.psk"  # the name qemu's tls-creds-psk reads in its dir
    path.write_text(lines)
    path.chmod(0o600)
    return path


@pytest.fixture
def tools() -> None:
    for tool in ("nbdinfo", "qemu-io", "qemu-img", "openssl"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Makefile APT_PKGS: libnbd-bin, qemu-utils, openssl)")


@pytest.fixture
async def server(tmp_path: Path, tools: None) -> AsyncIterator[NBDServer]:
    keys = load_keys(write_keys(tmp_path / "server", f"alice:{ALICE_KEY}\nbob:{BOB_KEY}\n"))
    provider = MemProvider(MemVolume("v", 4 * MiB), MemVolume("alice-only", 4 * MiB))
    access = AccessList([AccessRule("alice-only", "psk:alice", "rw")])
    srv = NBDServer(provider, tls_mode=TLSMode.REQUIRED, psk_keys=keys, access=access, handshake_timeout=3)
    await srv.start("127.0.0.1", 0)
    try:
        yield srv
    finally:
        await srv.stop()


def nbdinfo_uri(srv: NBDServer, user: str, keys: Path, export: str = "v") -> str:
    return f"nbds://{user}@127.0.0.1:{srv.port}/{export}?tls-psk-file={keys}"


def qemu_psk(srv: NBDServer, directory: Path, user: str, export: str = "v") -> list[str]:
    return [
        "--object",
        f"tls-creds-psk,id=tls0,endpoint=client,dir={directory},username={user}",
        "--image-opts",
        f"driver=nbd,host=127.0.0.1,port={srv.port},export={export},tls-creds=tls0",
    ]


async def test_libnbd_and_qemu_over_psk(server: NBDServer, tmp_path: Path) -> None:
    client = tmp_path / "client"
    keys = write_keys(client, f"alice:{ALICE_KEY}\n")
    info = json.loads((await run("nbdinfo", "--json", nbdinfo_uri(server, "alice", keys))).check().out)
    assert info["exports"][0]["export-size"] == 4 * MiB
    qemu = qemu_psk(server, client, "alice")
    written = (await run("qemu-io", *qemu, "-c", "write -P 0x5a 1M 64k", "-c", "read -P 0x5a 1M 64k")).check()
    assert "wrote 65536/65536" in written.out and "read 65536/65536" in written.out, written.out
    image = json.loads((await run("qemu-img", "info", "--output=json", *qemu)).check().out)
    assert image["virtual-size"] == 4 * MiB


async def test_wrong_key_unknown_identity_and_plain_clients_are_refused(
    server: NBDServer, tmp_path: Path
) -> None:
    wrong = write_keys(tmp_path / "wrong", f"alice:{'c3' * 32}\n")
    refused = await run("nbdinfo", nbdinfo_uri(server, "alice", wrong))
    assert refused.code != 0
    stranger = write_keys(tmp_path / "stranger", f"mallory:{ALICE_KEY}\n")
    refused = await run("nbdinfo", nbdinfo_uri(server, "mallory", stranger))
    assert refused.code != 0
    plain = await run("nbdinfo", f"nbd://127.0.0.1:{server.port}/v")
    assert plain.code != 0  # required mode: NBD_REP_ERR_TLS_REQD for every option
    ok = write_keys(tmp_path / "ok", f"alice:{ALICE_KEY}\n")
    assert (await run("nbdinfo", "--size", nbdinfo_uri(server, "alice", ok))).check().out.strip() == str(
        4 * MiB
    )


async def test_access_rules_by_psk_identity(server: NBDServer, tmp_path: Path) -> None:
    alice = write_keys(tmp_path / "alice", f"alice:{ALICE_KEY}\n")
    bob = write_keys(tmp_path / "bob", f"bob:{BOB_KEY}\n")
    assert (await run("nbdinfo", "--size", nbdinfo_uri(server, "alice", alice, "alice-only"))).code == 0
    assert (await run("nbdinfo", "--size", nbdinfo_uri(server, "bob", bob, "alice-only"))).code != 0
    listed = json.loads(
        (await run("nbdinfo", "--list", "--json", nbdinfo_uri(server, "bob", bob, ""))).check().out
    )
    assert [e["export-name"] for e in listed["exports"]] == ["v"]


def _starttls(port: int) -> socket.socket:
    """A raw client up to NBD_OPT_STARTTLS's ACK."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    greeting = sock.recv(18, socket.MSG_WAITALL)
    assert len(greeting) == 18
    sock.sendall(struct.pack(">I", 3))
    sock.sendall(struct.pack(">QII", 0x49484156454F5054, OPT_STARTTLS, 0))
    reply = sock.recv(20, socket.MSG_WAITALL)
    _magic, option, kind, length = struct.unpack(">QIII", reply)
    assert (option, kind, length) == (OPT_STARTTLS, 1, 0), reply.hex()
    return sock


def _psk_echo_server(keys: dict[str, bytes]) -> tuple[socket.socket, threading.Thread, list[str]]:
    """A TCP server that runs one PSKServerSession (the sans-IO TLS of nbd/psk.py) and answers
    each line of plaintext with 'pong IDENTITY VERSION'."""
    listener = socket.create_server(("127.0.0.1", 0))
    seen: list[str] = []

    def serve() -> None:
        conn, _ = listener.accept()
        session = PSKServerSession(keys)
        conn.settimeout(20)
        try:
            while data := conn.recv(65536):
                plain = session.receive(data)
                if plain:
                    seen.append(f"{session.identity} {session.version} {session.cipher}")
                    session.send(f"pong {session.identity} {session.version}\n".encode())
                    session.close()  # one round: close_notify, so that s_client exits
                    conn.sendall(session.data_to_send())
                    break
                conn.sendall(session.data_to_send())
        except (TLSClosed, TLSFailed, OSError):
            pass
        finally:
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread, seen


@pytest.mark.parametrize(("flag", "version"), [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")])
def test_tls_12_and_13_with_openssl(tools: None, flag: str, version: str) -> None:
    """The TLS layer alone, with OpenSSL's client forced to each version."""
    listener, thread, seen = _psk_echo_server({"alice": bytes.fromhex(ALICE_KEY)})
    try:
        port = listener.getsockname()[1]
        proc = subprocess.run(
            ["openssl", "s_client", "-quiet", flag, "-psk_identity", "alice", "-psk", ALICE_KEY,
             "-connect", f"127.0.0.1:{port}"],
            input=b"ping\n", capture_output=True, timeout=30,
        )  # fmt: skip
        thread.join(20)
        assert f"pong alice {version}".encode() in proc.stdout, (proc.stdout, proc.stderr[-500:])
        assert seen and seen[0].startswith(f"alice {version}"), seen
        if version == "TLSv1.2":
            assert "ECDHE-PSK" in seen[0], seen  # forward secrecy first
    finally:
        listener.close()


def test_openssl_with_a_wrong_key_is_refused(tools: None) -> None:
    listener, thread, seen = _psk_echo_server({"alice": bytes.fromhex(ALICE_KEY)})
    try:
        port = listener.getsockname()[1]
        proc = subprocess.run(
            ["openssl", "s_client", "-quiet", "-psk_identity", "alice", "-psk", "c3" * 32,
             "-connect", f"127.0.0.1:{port}"],
            input=b"ping\n", capture_output=True, timeout=30,
        )  # fmt: skip
        thread.join(20)
        assert b"pong" not in proc.stdout and not seen
    finally:
        listener.close()


async def test_garbage_instead_of_a_client_hello_costs_only_its_connection(
    server: NBDServer, tmp_path: Path
) -> None:
    for junk in (b"\x00" * 5, b"\x16\x03\x01\x00\x05hello", bytes(range(256)) * 8):
        sock = await asyncio.to_thread(_starttls, server.port)
        try:
            sock.sendall(junk)
            sock.settimeout(10)
            received = await asyncio.to_thread(_read_until_closed, sock)
            assert len(received) < 64  # at most a TLS alert
        finally:
            sock.close()
    stalled = await asyncio.to_thread(_starttls, server.port)  # and never says anything
    try:
        assert len(await asyncio.to_thread(_read_until_closed, stalled)) == 0  # the handshake timeout
    finally:
        stalled.close()
    ok = write_keys(tmp_path / "ok", f"alice:{ALICE_KEY}\n")
    assert (await run("nbdinfo", "--size", nbdinfo_uri(server, "alice", ok))).code == 0
    assert server.connection_count == 0


def _read_until_closed(sock: socket.socket) -> bytes:
    sock.settimeout(20)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def test_key_files(tmp_path: Path) -> None:
    keys = load_keys(write_keys(tmp_path, f"# comment\n\nalice:{ALICE_KEY}\nuser:with:colons:{BOB_KEY}\n"))
    assert keys == {"alice": bytes.fromhex(ALICE_KEY), "user:with:colons": bytes.fromhex(BOB_KEY)}
    for text, message in (
        ("alice\n", "expected identity:hexkey"),
        (f":{ALICE_KEY}\n", "expected identity:hexkey"),
        ("alice:xyz0\n", "hexadecimal"),
        ("alice:abc\n", "hexadecimal"),
        ("alice:00112233\n", "too short"),
        (f"alice:{ALICE_KEY}\nalice:{BOB_KEY}\n", "given twice"),
        ("# nothing\n", "holds no key"),
    ):
        with pytest.raises(PSKError, match=message) as info:
            load_keys(write_keys(tmp_path, text))
        assert ALICE_KEY not in str(info.value) and BOB_KEY not in str(info.value)  # never a key
    with pytest.raises(PSKError, match="cannot read"):
        load_keys(tmp_path / "missing.psk")


def test_daemon_serves_psk_from_its_config(tmp_path: Path, tools: None) -> None:
    """``nbd.tls_psk_file`` in the configuration: the daemon serves nbds:// with it; a bad key
    file stops the start with one line."""
    keys = write_keys(tmp_path / "pki", f"alice:{ALICE_KEY}\n")
    config = f'[nbd]\ntls = "required"\ntls_psk_file = "{keys}"\n' + SMALL_CONFIG
    daemon = start_daemon(tmp_path / "d", config=config)
    try:
        assert daemon.nbd_url is not None and daemon.nbd_url.startswith("nbds://")
        uri = f"nbds://alice@127.0.0.1:{daemon.nbd_port}/vol0?tls-psk-file={keys}"
        assert (
            int(
                subprocess.run(
                    ["nbdinfo", "--size", uri], capture_output=True, text=True, timeout=60, check=True
                ).stdout
            )
            == 1024**3
        )
    finally:
        assert daemon.stop() == 0, daemon.log_tail()
    keys.write_text("alice:nothex\n")
    code, records = daemon.start_expecting_failure()
    assert code == 1
    assert any("cannot set up TLS-PSK for NBD" in str(r.get("msg", "")) for r in records), records
