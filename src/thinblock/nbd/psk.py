"""TLS-PSK for NBD: the ``tls-psk`` key files of qemu-nbd and nbdkit, and a TLS server that runs
in memory (bytes in, bytes out: no socket), for the asyncio server to put over its transport.

Why not Python's ``ssl``: Python 3.11's ``ssl`` has no PSK callbacks
(``SSLContext.set_psk_server_callback`` arrived in 3.13), and the PyPI bindings for older
versions (sslpsk, sslpsk2, sslpsk3) set the callback on a blocking socket's ``SSL*``, which the
memory-BIO ``SSLObject`` asyncio's ``start_tls`` drives does not expose.  So PSK runs on OpenSSL
through pyOpenSSL (``OpenSSL.SSL.Connection(context, None)`` is a TLS session over memory BIOs:
``bio_write`` the peer's bytes, ``recv`` the plaintext, ``bio_read`` what to send back).
pyOpenSSL (26.x) has no PSK method of its own, so the server callback is installed with the
OpenSSL binding of ``cryptography`` (which pyOpenSSL is built on and ships the same libssl):
``SSL_CTX_set_psk_server_callback`` on the context pyOpenSSL made.  That reaches one private
attribute (``Context._context``, the ``SSL_CTX*``); ``psk_support()`` checks it is there, so a
pyOpenSSL that changed it is a clear start-up error, not a crash.

Versions.  TLS 1.3 and 1.2.  OpenSSL uses the PSK server callback for TLS 1.3 too (with the
SHA-256 suites, the hash GnuTLS uses for external PSKs), which is what qemu and libnbd (GnuTLS)
offer first; TLS 1.2 clients get the PSK suites with (EC)DHE first, for forward secrecy.

Key file (``--tls-psk``/``tls-creds-psk``'s ``keys.psk``, ``psktool``'s output): one
``identity:hexkey`` per line.  The identity a client proves is its name for access lists
(``psk:NAME`` in ``[[nbd.access]]``).
"""

from __future__ import annotations

import functools
import hmac
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

MAX_IDENTITY = 128  # bytes; RFC 4279 allows 2^16-1, gnutls' psktool writes short names
_HEX = re.compile(r"^[0-9a-fA-F]+$")
# TLS 1.2: PSK suites, those with an ephemeral key exchange first (forward secrecy).
_TLS12_PSK_CIPHERS = b"ECDHE-PSK:DHE-PSK:PSK:!aNULL:!eNULL:!3DES:!RC4:!MD5:!SHA1:@STRENGTH"


class PSKError(Exception):
    """A key file that cannot be used, or PSK not available here."""


def load_keys(path: Path) -> dict[str, bytes]:
    """``identity:hexkey`` lines; blank lines and ``#`` comments skipped.  PSKError says which
    line is wrong (never printing a key)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise PSKError(f"cannot read the PSK file {path}: {exc}") from None
    keys: dict[str, bytes] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        identity, sep, hexkey = line.rpartition(":")
        where = f"{path}, line {number}"
        if not sep or not identity:
            raise PSKError(f"{where}: expected identity:hexkey")
        if len(identity.encode()) > MAX_IDENTITY:
            raise PSKError(f"{where}: identity longer than {MAX_IDENTITY} bytes")
        if not _HEX.match(hexkey) or len(hexkey) % 2:
            raise PSKError(f"{where}: the key is not an even number of hexadecimal digits")
        if len(hexkey) < 32:
            raise PSKError(f"{where}: a key of {len(hexkey) // 2} bytes is too short (16 at least)")
        if identity in keys:
            raise PSKError(f"{where}: identity {identity!r} given twice")
        keys[identity] = bytes.fromhex(hexkey)
    if not keys:
        raise PSKError(f"the PSK file {path} holds no key")
    return keys


@functools.cache
def _binding() -> tuple[Any, Any, Any]:
    """(OpenSSL.SSL, ffi, lib), or PSKError when PSK cannot work here."""
    try:
        from cryptography.hazmat.bindings.openssl.binding import Binding
        from OpenSSL import SSL
    except ImportError as exc:
        raise PSKError(f"TLS-PSK needs pyOpenSSL: {exc}") from None
    binding = Binding()
    lib = binding.lib
    if not getattr(lib, "Cryptography_HAS_PSK", 0) or not hasattr(lib, "SSL_CTX_set_psk_server_callback"):
        raise PSKError("this OpenSSL build has no PSK")
    probe = SSL.Context(SSL.TLS_SERVER_METHOD)
    if not hasattr(probe, "_context"):
        raise PSKError("this pyOpenSSL does not expose its SSL_CTX; PSK cannot be installed")
    return SSL, binding.ffi, lib


def psk_support() -> str | None:
    """None when PSK works here, else why not."""
    try:
        _binding()
    except PSKError as exc:
        return str(exc)
    return None


class TLSClosed(Exception):
    """The peer ended the TLS session (close_notify)."""


class TLSFailed(Exception):
    """The handshake or a record failed: the connection must be dropped."""


class PSKServerSession:
    """One server-side TLS-PSK session over memory BIOs (sans-IO).

    ``receive(ciphertext)`` returns the plaintext it decrypted (empty during the handshake);
    ``data_to_send()`` returns the bytes to write to the peer (handshake messages, encrypted
    records, alerts); ``send(plaintext)`` encrypts.  ``identity`` is the PSK identity once the
    handshake is done.  Errors: TLSFailed (drop the connection), TLSClosed (the peer said goodbye).
    """

    def __init__(self, keys: dict[str, bytes], on_unknown: Callable[[str], None] | None = None) -> None:
        SSL, ffi, lib = _binding()
        self._SSL = SSL
        self._keys = keys
        self._on_unknown = on_unknown
        self.identity: str | None = None
        self._proposed: str | None = None
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.set_cipher_list(_TLS12_PSK_CIPHERS)
        context.set_options(SSL.OP_NO_TICKET)  # no resumption: every session proves the key
        # A context per session: the callback belongs to this session alone (no lookup from an
        # SSL* back to its session); creating one costs microseconds, a handshake milliseconds.
        self._callback = ffi.callback(
            "unsigned int(SSL *, const char *, unsigned char *, unsigned int)", self._psk
        )
        lib.SSL_CTX_set_psk_server_callback(context._context, self._callback)
        self._ffi = ffi
        self._context = context  # keeps the SSL_CTX (and so the callback's owner) alive
        self._tls = SSL.Connection(context, None)
        self._tls.set_accept_state()
        self.handshake_done = False

    def _psk(self, _ssl: Any, identity: Any, out: Any, max_len: int) -> int:
        """OpenSSL's question: the key of ``identity`` (0: unknown, the handshake fails)."""
        try:
            name = self._ffi.string(identity).decode("utf-8") if identity != self._ffi.NULL else ""
        except UnicodeDecodeError:
            return 0
        key = None
        for known, value in self._keys.items():  # compare every name: no timing oracle on names
            if hmac.compare_digest(known.encode(), name.encode()):
                key = value
        if key is None or len(key) > max_len:
            if self._on_unknown is not None:
                self._on_unknown(name)
            return 0
        self._proposed = name
        self._ffi.memmove(out, key, len(key))
        return len(key)

    def receive(self, data: bytes) -> bytes:
        SSL = self._SSL
        if data:
            self._tls.bio_write(data)
        try:
            if not self.handshake_done:
                try:
                    self._tls.do_handshake()
                except SSL.WantReadError:
                    return b""
                self.handshake_done = True
                self.identity = self._proposed
            out = bytearray()
            while True:
                try:
                    out += self._tls.recv(65536)
                except SSL.WantReadError:
                    return bytes(out)
        except SSL.ZeroReturnError:
            raise TLSClosed() from None
        except SSL.Error as exc:
            raise TLSFailed(_describe(exc)) from None

    def send(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt ``data`` (a memory BIO takes any amount: nothing is left unsent)."""
        view = memoryview(data)
        try:
            while view:
                n = self._tls.send(view[: 1 << 20])  # pyOpenSSL takes any bytes-like
                view = view[n:]
        except self._SSL.Error as exc:
            raise TLSFailed(_describe(exc)) from None

    def close(self) -> None:
        """Queue a close_notify (best effort)."""
        try:
            self._tls.shutdown()
        except self._SSL.Error:
            pass

    def data_to_send(self) -> bytes:
        out = bytearray()
        while True:
            try:
                chunk = self._tls.bio_read(65536)
            except self._SSL.WantReadError:
                return bytes(out)
            if not chunk:
                return bytes(out)
            out += chunk

    @property
    def version(self) -> str | None:
        return self._tls.get_protocol_version_name() if self.handshake_done else None

    @property
    def cipher(self) -> str | None:
        return self._tls.get_cipher_name() if self.handshake_done else None


def _describe(exc: Exception) -> str:
    args = exc.args[0] if exc.args else None
    if isinstance(args, list) and args:
        return "; ".join(str(part[-1]) for part in args if isinstance(part, tuple)) or repr(exc)
    return str(exc) or type(exc).__name__


__all__ = [
    "PSKError",
    "PSKServerSession",
    "TLSClosed",
    "TLSFailed",
    "load_keys",
    "psk_support",
]
