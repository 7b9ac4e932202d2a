"""TLS-PSK over an asyncio transport: the asyncio half of ``psk.py``.

``start_psk(transport, protocol, keys, timeout)`` does for PSK what ``loop.start_tls`` does for
X.509: it puts a TLS layer between the connection's TCP transport and its protocol and returns
the transport the protocol writes to from then on.  The TLS itself is ``PSKServerSession``
(memory BIOs, no socket); here are only the two adapters:

* ``_PSKShim``, the TCP transport's protocol from now on: ciphertext in, plaintext out to the
  connection's ``BufferedProtocol`` (through its ``get_buffer``/``buffer_updated``);
* ``PSKTransport``, what the connection holds as its transport: plaintext in, ciphertext out to
  the TCP transport; reading, writing limits and closing go to the TCP transport.

Back-pressure is kept: when the connection pauses reading, decrypted bytes it has not taken
yet wait here (at most what one TCP read decrypts to) and the TCP transport stops reading;
the TCP transport's pause_writing/resume_writing go to the connection unchanged.
"""

from __future__ import annotations

import asyncio
from typing import Any

from .psk import PSKServerSession, TLSClosed, TLSFailed


class PSKHandshakeFailed(Exception):
    """The TLS-PSK handshake failed (unknown identity, wrong key, garbage, or the peer left)."""


class PSKTransport(asyncio.Transport):
    """The connection's transport once TLS-PSK is up."""

    def __init__(self, raw: asyncio.Transport, shim: _PSKShim) -> None:
        super().__init__()
        self._raw = raw
        self._shim = shim

    # --- writing: encrypt, then hand to TCP ---
    def write(self, data: Any) -> None:
        if self._raw.is_closing():
            return
        session = self._shim.session
        try:
            session.send(data)
        except TLSFailed:
            self._raw.abort()
            return
        out = session.data_to_send()
        if out:
            self._raw.write(out)

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("TLS has no half-close")

    def get_write_buffer_size(self) -> int:
        return self._raw.get_write_buffer_size()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._raw.set_write_buffer_limits(high, low)

    # --- reading ---
    def pause_reading(self) -> None:
        self._shim.paused = True
        self._raw.pause_reading()

    def resume_reading(self) -> None:
        self._shim.paused = False
        self._shim.deliver()
        if not self._shim.paused and not self._raw.is_closing():
            self._raw.resume_reading()

    def is_reading(self) -> bool:
        return not self._shim.paused

    # --- closing ---
    def close(self) -> None:
        if self._raw.is_closing():
            return
        session = self._shim.session
        session.close()  # close_notify
        out = session.data_to_send()
        if out:
            self._raw.write(out)
        self._raw.close()

    def abort(self) -> None:
        self._raw.abort()

    def is_closing(self) -> bool:
        return self._raw.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "psk_identity":
            return self._shim.session.identity
        if name == "tls_version":
            return self._shim.session.version
        if name == "tls_cipher":
            return self._shim.session.cipher
        if name == "ssl_object":
            return None  # no certificate to ask about
        return self._raw.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._shim.app = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._shim.app


class _PSKShim(asyncio.Protocol):
    def __init__(
        self, raw: asyncio.Transport, app: asyncio.BufferedProtocol, session: PSKServerSession
    ) -> None:
        self.raw = raw
        self.app = app
        self.session = session
        self.transport = PSKTransport(raw, self)
        self.handshake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.paused = False
        self._pending = b""  # decrypted, not yet taken by the connection
        self._eof = False
        self._lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # pragma: no cover
        pass  # set_protocol does not call it

    def data_received(self, data: bytes) -> None:
        session = self.session
        try:
            plain = session.receive(data)
        except TLSClosed:
            self._send_pending_output()
            self._eof = True
            if not self.handshake.done():
                self.handshake.set_exception(PSKHandshakeFailed("the client closed the TLS session"))
                return
            self.deliver()
            return
        except TLSFailed as exc:
            self._send_pending_output()  # the alert, so that the client can say why
            self.raw.abort()
            if not self.handshake.done():
                self.handshake.set_exception(PSKHandshakeFailed(str(exc)))
            return
        self._send_pending_output()
        if session.handshake_done and not self.handshake.done():
            # Bytes after the handshake (a TLS 1.3 client sends its first option with its
            # Finished) wait until the connection knows TLS is up: ``resume_reading``.
            self.paused = True
            self.raw.pause_reading()
            self.handshake.set_result(None)
        if plain:
            self._pending += plain
            self.deliver()

    def _send_pending_output(self) -> None:
        out = self.session.data_to_send()
        if out and not self.raw.is_closing():
            self.raw.write(out)

    def deliver(self) -> None:
        """Hand decrypted bytes to the connection while it reads; then an EOF that came after."""
        if not self.handshake.done() or self.handshake.exception() is not None:
            return
        app = self.app
        while self._pending and not self.paused and not self._lost:
            buffer = memoryview(app.get_buffer(len(self._pending)))
            n = min(len(buffer), len(self._pending))
            buffer[:n] = self._pending[:n]
            self._pending = self._pending[n:]
            app.buffer_updated(n)
        if self._eof and not self._pending and not self._lost:
            self._eof = False
            if not app.eof_received():
                self.transport.close()

    def eof_received(self) -> bool:
        if not self.handshake.done():
            self.handshake.set_exception(PSKHandshakeFailed("the client left during the TLS handshake"))
            return False
        self._eof = True
        self.deliver()
        return True  # the connection decides when to close

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if not self.handshake.done():
            self.handshake.set_exception(
                PSKHandshakeFailed("the connection was lost during the TLS handshake")
            )
            return
        self.app.connection_lost(exc)

    def pause_writing(self) -> None:
        self.app.pause_writing()

    def resume_writing(self) -> None:
        self.app.resume_writing()


async def start_psk(
    raw: asyncio.Transport, app: asyncio.BufferedProtocol, session: PSKServerSession, timeout: float
) -> PSKTransport:
    """Run the TLS-PSK handshake over ``raw`` (reading resumed here), then route its bytes to and
    from ``app``: the returned transport is paused; ``resume_reading()`` it once the connection is
    ready for plaintext.  PSKHandshakeFailed or TimeoutError when it fails (``raw`` is then
    aborted; the caller reports the connection lost)."""
    shim = _PSKShim(raw, app, session)
    raw.set_protocol(shim)
    raw.resume_reading()
    try:
        await asyncio.wait_for(asyncio.shield(shim.handshake), timeout)
    except BaseException:
        # Whenever it ends now, its outcome is read: no "exception was never retrieved".
        shim.handshake.add_done_callback(lambda f: f.cancelled() or f.exception())
        raw.abort()
        raise
    return shim.transport


__all__ = ["PSKHandshakeFailed", "PSKTransport", "start_psk"]
