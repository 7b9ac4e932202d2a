"""STARTTLS: a client whose first option after the upgrade travels in the same flight as the
end of its TLS handshake (TLS 1.3: the client's Finished and its first application data in one
TCP write, as libnbd's nbdcopy often sends them).  The server's TLS layer hands those bytes to
the connection before ``start_tls`` has returned; they are the client's next option, encrypted,
and must be answered -- they were once taken for "plaintext data during the TLS handshake" and
the connection was closed (seen as a flaky nbdcopy over nbds:// under load)."""

from __future__ import annotations

import asyncio
import ssl
import struct
from pathlib import Path

from tests.support.certs import make_pki
from tests.support.wire import IHAVEOPT, option
from thinblock.nbd.protocol import TLSMode
from thinblock.nbd.server import NBDServer
from thinblock.nbd.tls import TLSSettings, server_context

from .memvolume import MemProvider, MemVolume, MiB

OPT_STARTTLS = 5
OPT_LIST = 3
REP_ACK = 1
REP_SERVER = 2
REPLY_MAGIC = 0x0003E889045565A9


async def test_first_option_in_the_handshakes_last_flight_is_answered(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    context = server_context(TLSSettings(TLSMode.REQUIRED, pki.server_cert, pki.server_key))
    server = NBDServer(
        MemProvider(MemVolume("vol0", 1 * MiB)), tls_mode=TLSMode.REQUIRED, tls_context=context
    )
    await server.start("127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        greeting = await asyncio.wait_for(reader.readexactly(18), 10)
        assert struct.unpack(">QQH", greeting)[1] == IHAVEOPT
        writer.write(struct.pack(">I", 3) + option(OPT_STARTTLS))
        magic, opt, reply, length = struct.unpack(">QIII", await asyncio.wait_for(reader.readexactly(20), 10))
        assert (magic, opt, reply, length) == (REPLY_MAGIC, OPT_STARTTLS, REP_ACK, 0)

        client = ssl.create_default_context(cafile=str(pki.ca_cert))
        client.minimum_version = ssl.TLSVersion.TLSv1_3
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = client.wrap_bio(incoming, outgoing, server_hostname="localhost")
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if outgoing.pending:
                    writer.write(outgoing.read())
                incoming.write(await asyncio.wait_for(reader.read(65536), 10))
        # The handshake is complete on our side; its last flight (Finished) is still in
        # ``outgoing``.  The first option goes in the same write.
        tls.write(option(OPT_LIST))
        writer.write(outgoing.read())

        plain = bytearray()
        replies: list[tuple[int, bytes]] = []
        while not replies or replies[-1][0] != REP_ACK:
            data = await asyncio.wait_for(reader.read(65536), 10)
            assert data, f"the server closed the connection; replies so far: {replies}"
            incoming.write(data)
            while True:
                try:
                    plain += tls.read(65536)
                except ssl.SSLWantReadError:
                    break
            while len(plain) >= 20:
                magic, opt, reply, length = struct.unpack(">QIII", plain[:20])
                if len(plain) < 20 + length:
                    break
                assert (magic, opt) == (REPLY_MAGIC, OPT_LIST)
                replies.append((reply, bytes(plain[20 : 20 + length])))
                del plain[: 20 + length]
        assert [r for r, _ in replies] == [REP_SERVER, REP_ACK]
        assert replies[0][1][4:] == b"vol0"
    finally:
        writer.close()
        await server.stop()
