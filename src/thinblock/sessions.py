"""Who is connected to which volume, whatever the front end (NBD today, iSCSI beside it).

A front end registers a session when a client starts I/O on a volume (NBD: the export was
chosen; iSCSI: a normal session logged in to the volume's target) and closes it when the
connection ends (iSCSI: the session's last connection).  The engine asks the registry before it
deletes a volume: a volume with connected clients is not deleted unless forced, and forcing
disconnects them (``Session.disconnect``) after the volume was marked deleted, so that any
request still arriving fails with an error instead of reading zeros where data was.

Event-loop thread only, like the engine.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(eq=False)
class Session:
    """One client connection doing I/O on one volume."""

    id: int
    protocol: str  # "NBD", "iSCSI"
    volume: str
    peer: str  # "127.0.0.1:40312", "unix"; iSCSI: the session's first connection
    opened: float = field(default_factory=time.time)
    # Ends the connection now (the front end's own way: abort the transport).
    disconnect: Callable[[], None] = field(default=lambda: None, repr=False)


class SessionRegistry:
    def __init__(self) -> None:
        self._sessions: dict[int, Session] = {}
        self._ids = itertools.count(1)

    def open(self, protocol: str, volume: str, peer: str, disconnect: Callable[[], None]) -> Session:
        session = Session(next(self._ids), protocol, volume, peer, disconnect=disconnect)
        self._sessions[session.id] = session
        return session

    def close(self, session: Session) -> None:
        self._sessions.pop(session.id, None)

    def of(self, volume: str) -> list[Session]:
        return [s for s in self._sessions.values() if s.volume == volume]

    def rename(self, volume: str, new_name: str) -> None:
        """The volume was renamed: its sessions go on, under its new name."""
        for session in self.of(volume):
            session.volume = new_name

    def all(self) -> list[Session]:
        return list(self._sessions.values())


# What one registered session is called in a refusal: an NBD connection is a client; an
# iSCSI session (of one or more connections) is a session.
_NOUNS = {"iSCSI": ("session", "sessions")}


def describe_clients(sessions: list[Session]) -> str:
    """``1 NBD client from 127.0.0.1:40312`` / ``2 NBD clients from a, b`` /
    ``1 iSCSI session from 127.0.0.1:40400`` (for refusals)."""
    by_protocol: dict[str, list[str]] = {}
    for s in sessions:
        by_protocol.setdefault(s.protocol, []).append(s.peer)
    parts = []
    for protocol, peers in by_protocol.items():
        one, many = _NOUNS.get(protocol, ("client", "clients"))
        noun = one if len(peers) == 1 else many
        parts.append(f"{len(peers)} {protocol} {noun} from {', '.join(peers)}")
    return " and ".join(parts)


__all__ = ["Session", "SessionRegistry", "describe_clients"]
