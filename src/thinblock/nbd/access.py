"""Per-volume access lists for NBD: which clients may open which volume, read-only or read-write.

A rule names a volume (or ``*`` for every volume), a client and a mode::

    [[nbd.access]]
    volume = "db1"
    clients = ["CN=app-1,O=example", "10.1.0.0/16", "unix"]
    mode = "rw"              # or "ro"

Clients are matched by what the connection proved or came from:

* a certificate subject (``CN=app-1,O=example``, most specific part first, as ``openssl x509
  -subject -nameopt RFC2253`` prints it): only over TLS with a client certificate verified
  against ``nbd.tls_ca``;
* an address or network (``192.0.2.7``, ``10.1.0.0/16``, ``::1``), or ``unix`` for the Unix
  socket;
* ``*``: anyone.

A volume no rule names (directly or through ``*``) is open to every client, read-write (the
behaviour before access lists).  A volume some rule names is open only to the clients of its
rules; the most permissive matching mode wins.  A client that may not open a volume does not
see it in ``NBD_OPT_LIST``, and ``NBD_OPT_INFO``/``GO`` answer as for a volume that does not
exist (no probing).  Read-only opens advertise ``NBD_FLAG_READ_ONLY`` and writes, trims and
write-zeroes get ``NBD_EPERM`` ("it SHOULD return NBD_EPERM if it receives a write or trim
request on a read-only export").
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Mode = Literal["ro", "rw"]
ANY = "*"
UNIX = "unix"


@dataclass(frozen=True, slots=True)
class ClientIdentity:
    """Who a connection is: its address (None on the Unix socket) and, over TLS with a verified
    client certificate, the certificate's subject."""

    address: str | None = None
    tls_subject: str | None = None

    def describe(self) -> str:
        where = self.address or UNIX
        return f"{self.tls_subject} at {where}" if self.tls_subject else where


@dataclass(frozen=True, slots=True)
class AccessRule:
    volume: str
    client: str
    mode: Mode

    def __post_init__(self) -> None:
        if self.mode not in ("ro", "rw"):
            raise ValueError(f"access mode must be ro or rw, not {self.mode!r}")
        if not self.volume:
            raise ValueError("an access rule needs a volume name (or *)")
        if not self.client:
            raise ValueError("an access rule needs a client")

    def matches(self, who: ClientIdentity) -> bool:
        client = self.client
        if client == ANY:
            return True
        if client == UNIX:
            return who.address is None
        if "=" in client:
            return who.tls_subject is not None and _normal_subject(who.tls_subject) == _normal_subject(client)
        if who.address is None:
            return False
        try:
            network = ipaddress.ip_network(client, strict=False)
            return ipaddress.ip_address(who.address) in network
        except ValueError:
            return False


def _normal_subject(subject: str) -> str:
    return ",".join(part.strip() for part in subject.split(","))


def parse_client(text: str) -> str:
    """Check a client as written in a rule; ValueError when it is none of the forms above."""
    text = text.strip()
    if text in (ANY, UNIX) or "=" in text:
        return text
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(
            f"not a client: {text!r} (a certificate subject like CN=name, an address or network, unix, or *)"
        ) from None
    return text


class AccessList:
    def __init__(self, rules: Iterable[AccessRule] = ()) -> None:
        self.rules = tuple(rules)

    def mode_for(self, volume: str, who: ClientIdentity) -> Mode | None:
        """How ``who`` may open ``volume``: "rw", "ro", or None (not at all)."""
        rules = [r for r in self.rules if r.volume in (volume, ANY)]
        if not rules:
            return "rw"
        modes = {r.mode for r in rules if r.matches(who)}
        if "rw" in modes:
            return "rw"
        return "ro" if "ro" in modes else None


__all__ = ["AccessList", "AccessRule", "ClientIdentity", "Mode", "parse_client"]
