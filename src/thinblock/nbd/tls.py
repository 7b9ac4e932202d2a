"""TLS for NBD (``NBD_OPT_STARTTLS``): the server's settings, its ``ssl`` context, and who a
client proved to be.

X.509 here, with Python's ``ssl`` through asyncio's ``start_tls``; PSK in ``psk.py`` (pyOpenSSL
over memory BIOs) and ``psk_transport.py``.  The server presents ``cert``/``key``; with ``ca`` every client must present a
certificate signed by that CA (qemu-nbd's and nbdkit's ``verify-peer``/``--tls-verify-peer``),
and its subject is the client's identity for access lists.  TLS 1.2 at least ("NBD
implementations supporting TLS MUST support TLS version 1.2 ... MAY support older versions but
SHOULD NOT do so by default").

PSK (the ``tls-psk`` key files of qemu-nbd and nbdkit): Python 3.11's ``ssl`` has no PSK
callbacks (``SSLContext.set_psk_server_callback`` arrived in 3.13), and the PyPI bindings for
older versions (sslpsk, sslpsk2, sslpsk3) set the callback on a blocking socket's ``SSL*``, not on
the memory-BIO ``SSLObject`` asyncio's ``start_tls`` drives; so PSK does not go through ``ssl``
at all (``psk.py`` says how).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .protocol import TLSMode


@dataclass(frozen=True, slots=True)
class TLSSettings:
    mode: TLSMode
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None  # verify client certificates against this CA (required then)
    psk_file: Path | None = None  # TLS-PSK with these identity:hexkey lines instead of X.509


def server_context(settings: TLSSettings) -> ssl.SSLContext:
    """The server's context; OSError/ssl.SSLError when a file cannot be used."""
    if settings.cert is None or settings.key is None:
        raise ValueError("TLS needs a certificate and a key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(settings.cert), str(settings.key))
    if settings.ca is not None:
        context.load_verify_locations(cafile=str(settings.ca))
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def subject_of(certificate: dict[str, Any] | None) -> str | None:
    """A verified peer certificate's subject as ``CN=client-a,O=thinblock tests`` (most specific
    first, as RFC 4514 writes it), or None without one."""
    if not certificate:
        return None
    mapping = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
               "countryName": "C", "localityName": "L", "stateOrProvinceName": "ST"}  # fmt: skip
    parts = []
    for rdn in reversed(certificate.get("subject", ())):
        for key, value in rdn:
            parts.append(f"{mapping.get(key, key)}={value}")
    return ",".join(parts) or None


def peer_subject(ssl_object: Any) -> str | None:
    """The verified client certificate's subject of a TLS connection (None without one)."""
    if ssl_object is None:
        return None
    try:
        return subject_of(ssl_object.getpeercert())
    except (ValueError, AttributeError):
        return None


__all__ = ["TLSMode", "TLSSettings", "peer_subject", "server_context", "subject_of"]
