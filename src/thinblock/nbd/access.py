"""Per-volume access lists for NBD: which clients may open which volume, read-only or read-write.

A rule names a volume (or ``*`` for every volume), a client and a mode::

    [[nbd.access]]
    volume = "db1"
    clients = ["CN=app-1,O=example", "10.1.0.0/16", "unix", "psk:backup"]
    mode = "rw"              # or "ro", or "deny"

Clients are matched by what the connection proved or came from:

* a certificate subject (``CN=app-1,O=example``, most specific part first, as ``openssl x509
  -subject -nameopt RFC2253`` prints it): only over TLS with a client certificate verified
  against ``nbd.tls_ca``;
* ``psk:NAME``: a client that proved over TLS-PSK that it holds the key of identity ``NAME``
  (``nbd.tls_psk_file``);
* an address or network (``192.0.2.7``, ``10.1.0.0/16``, ``::1``), or ``unix`` for the Unix
  socket;
* ``*``: anyone.

A volume no allowing rule (``ro``/``rw``) names, directly or through ``*``, is open to every
client, read-write (the behaviour before access lists).  A volume some allowing rule names is
open only to the clients of its rules; the most permissive matching mode wins.  A matching
``deny`` rule beats every allowing rule (``deny`` for one address of an allowed network).

Rules come from two places: the configuration file (fixed while the daemon runs) and the API or
CLI (``thinblock vv access VV allow|deny|remove CLIENT``), kept by ``AccessStore`` in
``DATA_DIR/nbd-access.json`` (written atomically).  Both apply together; a change applies to every
option a client sends from then on, so to every new connection (a connection already in
transmission keeps the mode it opened with).  A client that may not open a volume does not
see it in ``NBD_OPT_LIST``, and ``NBD_OPT_INFO``/``GO`` answer as for a volume that does not
exist (no probing).  Read-only opens advertise ``NBD_FLAG_READ_ONLY`` and writes, trims and
write-zeroes get ``NBD_EPERM`` ("it SHOULD return NBD_EPERM if it receives a write or trim
request on a read-only export").
"""

from __future__ import annotations

import ipaddress
import json
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Protocol

from ..privatefile import replace_json

Mode = Literal["ro", "rw"]  # how a client may open a volume
RuleMode = Literal["ro", "rw", "deny"]  # what a rule says
RULE_MODES: tuple[RuleMode, ...] = ("ro", "rw", "deny")
ANY = "*"
UNIX = "unix"
PSK_PREFIX = "psk:"
ACCESS_FILE = "nbd-access.json"


@dataclass(frozen=True, slots=True)
class ClientIdentity:
    """Who a connection is: its address (None on the Unix socket) and, over TLS with a verified
    client certificate, the certificate's subject."""

    address: str | None = None
    tls_subject: str | None = None
    psk_identity: str | None = None  # the TLS-PSK identity the client proved it holds the key of

    def describe(self) -> str:
        where = self.address or UNIX
        if self.psk_identity is not None:
            return f"{PSK_PREFIX}{self.psk_identity} at {where}"
        return f"{self.tls_subject} at {where}" if self.tls_subject else where


@dataclass(frozen=True, slots=True)
class AccessRule:
    volume: str
    client: str
    mode: RuleMode

    def __post_init__(self) -> None:
        if self.mode not in RULE_MODES:
            raise ValueError(f"access mode must be ro, rw or deny, not {self.mode!r}")
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
        if client.startswith(PSK_PREFIX):
            return who.psk_identity is not None and who.psk_identity == client[len(PSK_PREFIX) :]
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
    if text.startswith(PSK_PREFIX):
        if len(text) == len(PSK_PREFIX):
            raise ValueError("psk: needs an identity (psk:NAME)")
        return text
    if text in (ANY, UNIX) or "=" in text:
        return text
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(
            f"not a client: {text!r} (a certificate subject like CN=name, psk:NAME, an address or network, "
            "unix, or *)"
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
        if "deny" in modes:
            return None
        if "rw" in modes:
            return "rw"
        if "ro" in modes:
            return "ro"
        restricted = any(r.mode != "deny" for r in rules)
        return None if restricted else "rw"


class AccessPolicy(Protocol):
    """What the NBD server asks at every NBD_OPT_LIST, INFO and GO."""

    def mode_for(self, volume: str, who: ClientIdentity) -> Mode | None: ...


@dataclass(frozen=True, slots=True)
class StoredRule:
    """A rule made through the API or CLI."""

    id: int
    volume: str
    client: str
    mode: RuleMode
    created: float

    def rule(self) -> AccessRule:
        return AccessRule(self.volume, self.client, self.mode)


class AccessStore:
    """The rules in force: the configuration's (``fixed``) and those made through the API, kept in
    ``path`` (a JSON file, written to a temporary file, fsynced and renamed over it; in memory when
    ``path`` is None).  ``mode_for`` answers from both, so it is the NBD server's policy."""

    def __init__(self, path: Path | None, fixed: Iterable[AccessRule] = ()) -> None:
        self.path = path
        self.fixed = tuple(fixed)
        self._lock = threading.Lock()
        self._stored: list[StoredRule] = []
        self._next_id = 1
        if path is not None and path.exists():
            self._stored, self._next_id = self._load(path)
        self._list = self._combined()

    @staticmethod
    def _load(path: Path) -> tuple[list[StoredRule], int]:
        try:
            doc = json.loads(path.read_text())
            rules = [
                StoredRule(
                    int(r["id"]),
                    str(r["volume"]),
                    parse_client(str(r["client"])),
                    r["mode"],
                    float(r["created"]),
                )
                for r in doc["rules"]
            ]
            for r in rules:
                r.rule()  # checks the mode
            return rules, max([int(doc.get("next_id", 1)), *(r.id + 1 for r in rules)])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Starting without them would open volumes they close: refuse to start instead.
            raise RuntimeError(f"cannot read the NBD access rules {path}: {exc}") from None

    def _save(self) -> None:
        if self.path is None:
            return
        doc = {"version": 1, "next_id": self._next_id, "rules": [asdict(r) for r in self._stored]}
        replace_json(self.path, doc)

    def _combined(self) -> AccessList:
        return AccessList([*self.fixed, *(r.rule() for r in self._stored)])

    def mode_for(self, volume: str, who: ClientIdentity) -> Mode | None:
        return self._list.mode_for(volume, who)

    def stored(self, volume: str | None = None) -> list[StoredRule]:
        return [r for r in self._stored if volume is None or r.volume == volume]

    def applying_to(self, volume: str) -> list[tuple[AccessRule, StoredRule | None]]:
        """Every rule that applies to ``volume`` (its own and ``*`` ones): the configuration's
        first (no stored record), then those made through the API."""
        out: list[tuple[AccessRule, StoredRule | None]] = [
            (r, None) for r in self.fixed if r.volume in (volume, ANY)
        ]
        out += [(r.rule(), r) for r in self._stored if r.volume in (volume, ANY)]
        return out

    def put(self, volume: str, client: str, mode: RuleMode) -> StoredRule:
        """Add a rule for ``client`` on ``volume`` (replacing the stored one for the same client);
        ValueError for a client or mode that is none of the forms above."""
        client = parse_client(client)
        AccessRule(volume, client, mode)  # validates
        with self._lock:
            kept = [r for r in self._stored if not (r.volume == volume and r.client == client)]
            record = StoredRule(self._next_id, volume, client, mode, time.time())
            self._commit([*kept, record], self._next_id + 1)
        return record

    def remove(self, volume: str, rule_id: int) -> StoredRule | None:
        """Remove the stored rule ``rule_id`` of ``volume``; None when there is none."""
        with self._lock:
            found = next((r for r in self._stored if r.id == rule_id and r.volume == volume), None)
            if found is not None:
                self._commit([r for r in self._stored if r is not found], self._next_id)
        return found

    def forget_volume(self, volume: str) -> int:
        """Drop the stored rules of a deleted volume (a new volume of the same name starts with
        none: it must not inherit grants, nor denials); how many there were."""
        with self._lock:
            kept = [r for r in self._stored if r.volume != volume]
            dropped = len(self._stored) - len(kept)
            if dropped:
                self._commit(kept, self._next_id)
        return dropped

    def copy_rules(self, volume: str, to: str) -> int:
        """Give ``to`` the stored rules of ``volume`` (a rename: the rules follow the volume),
        replacing any ``to`` had; how many were copied."""
        with self._lock:
            kept = [r for r in self._stored if r.volume != to]
            now = time.time()
            copies = []
            next_id = self._next_id
            for r in self._stored:
                if r.volume == volume:
                    copies.append(StoredRule(next_id, to, r.client, r.mode, now))
                    next_id += 1
            if copies or len(kept) != len(self._stored):
                self._commit([*kept, *copies], next_id)
        return len(copies)

    def _commit(self, rules: list[StoredRule], next_id: int) -> None:
        previous = (self._stored, self._next_id)
        self._stored, self._next_id = rules, next_id
        try:
            self._save()
        except BaseException:
            self._stored, self._next_id = previous  # not on disk: not in force either
            raise
        self._list = self._combined()


__all__ = [
    "ACCESS_FILE",
    "AccessList",
    "AccessPolicy",
    "AccessRule",
    "AccessStore",
    "ClientIdentity",
    "Mode",
    "RuleMode",
    "StoredRule",
    "parse_client",
]
