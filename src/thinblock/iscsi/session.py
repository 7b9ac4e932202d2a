"""What the connections of one iSCSI session share, sans-IO (RFC 7143 4.2, 4.2.2.1, 6.3).

A session is named by its initiator, ISID and TSIH; it may have up to MaxConnections TCP
connections (MC/S), each a ``TargetConnection`` with its own CID, StatSN, digests and
tasks.  What is session-wide lives here:

* the command window: "CmdSN ... is used to enforce in-order delivery of commands across
  all connections of a session" (4.2.2.1), so ExpCmdSN, MaxCmdSN and the commands that
  arrived ahead of a gap (on any connection) are kept here, and a command is handed to the
  connection it arrived on when its turn comes (ERL 0: tasks are connection allegiant,
  its Data-Out, R2T, Data-In and SCSI Response stay on that connection);
* the leading connection's operational values (the "LO" keys: MaxBurstLength,
  ImmediateData, ...), which later connections inherit and may not renegotiate;
* the members, by CID.

At error recovery level 0 "session recovery" is the only recovery (7.1.5, 7.2): a
connection that fails ends its whole session, every connection and task of it.
``Session.failed`` does that; a connection leaving cleanly (Logout, reason "close the
connection") ends only itself.

A ``SessionTable`` holds the sessions of one target server, so that a Login with a
non-zero TSIH can find the session it adds a connection to.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

from .negotiation import SessionParameters
from .pdu import Pdu

if TYPE_CHECKING:
    from .connection import TargetConnection


def sn_lt(a: int, b: int) -> bool:
    """RFC 1982 serial number arithmetic, 32 bits: a < b."""
    return a != b and ((b - a) & 0xFFFFFFFF) < 0x80000000


def sn_add(a: int, n: int) -> int:
    return (a + n) & 0xFFFFFFFF


class WindowOverflow(Exception):
    """More commands ahead of a CmdSN gap than the session holds."""


class Session:
    def __init__(
        self,
        *,
        initiator_name: str,
        isid: int,
        target_name: str | None,
        cmd_sn: int,
        queue_depth: int,
        params: SessionParameters,
    ) -> None:
        self.initiator_name = initiator_name
        self.isid = isid
        self.target_name = target_name
        self.tsih = 0
        self.queue_depth = queue_depth
        self.params = params  # the leading connection's: LO values for every connection
        self.exp_cmd_sn = cmd_sn
        self.max_cmd_sn = sn_add(cmd_sn, queue_depth - 1)
        self.connections: dict[int, TargetConnection] = {}  # CID -> member in full feature phase
        # CmdSN -> a command that arrived past a gap (None: dropped while waiting, its number spent)
        self._ahead: dict[int, tuple[TargetConnection, Pdu | None]] = {}
        self.touched: list[TargetConnection] = []  # members given events by another's input
        self.ended = False

    @property
    def max_connections(self) -> int:
        return self.params.max_connections

    # --- the command window ---------------------------------------------------------------------
    def advertised_max(self) -> int:
        """MaxCmdSN: the window shrinks by the tasks in flight on every connection, and never
        moves back ("MaxCmdSN ... MUST NOT be decreased", 4.2.2.1)."""
        running = sum(c.running_tasks() for c in self.connections.values())
        room = self.queue_depth - 1 - min(running, self.queue_depth - 1)
        candidate = sn_add(self.exp_cmd_sn, room)
        if sn_lt(self.max_cmd_sn, candidate):
            self.max_cmd_sn = candidate
        return self.max_cmd_sn

    def order(self, connection: TargetConnection, pdu: Pdu, cmdsn: int) -> None:
        """A non-immediate request arrived on ``connection``: deliver it, and every command it
        unblocks, in CmdSN order, each to the connection it came on.  Outside the window it
        "MUST be silently ignored" (4.2.2.1).  Raises WindowOverflow."""
        if cmdsn == self.exp_cmd_sn and not self._ahead and cmdsn != (self.max_cmd_sn + 1) & 0xFFFFFFFF:
            # The usual case: the next command, inside the window, nothing waiting.
            self.exp_cmd_sn = (cmdsn + 1) & 0xFFFFFFFF
            connection.dispatch(pdu)
            return
        if sn_lt(cmdsn, self.exp_cmd_sn) or sn_lt(self.max_cmd_sn, cmdsn):
            return
        if cmdsn != self.exp_cmd_sn:
            if len(self._ahead) >= self.queue_depth or cmdsn in self._ahead:
                raise WindowOverflow(f"CmdSN {cmdsn} while {self.exp_cmd_sn} is awaited")
            self._ahead[cmdsn] = (connection, pdu)
            return
        self.exp_cmd_sn = sn_add(self.exp_cmd_sn, 1)
        connection.dispatch(pdu)
        while self.exp_cmd_sn in self._ahead:
            owner, queued = self._ahead.pop(self.exp_cmd_sn)
            self.exp_cmd_sn = sn_add(self.exp_cmd_sn, 1)
            if queued is None or owner.closed:
                # Aborted, or its connection ended (ERL 0: its tasks went with it).
                continue
            owner.dispatch(queued)
            if owner is not connection and owner not in self.touched:
                self.touched.append(owner)

    def forget(self, connection: TargetConnection, itt: int | None = None) -> None:
        """Drop the commands waiting past a gap that came on ``connection`` (one ITT or all):
        their CmdSN stays reserved so the commands after them still run in order."""
        for sn, (owner, pdu) in list(self._ahead.items()):
            if owner is connection and pdu is not None and (itt is None or pdu.itt == itt):
                self._ahead[sn] = (owner, None)

    def take_touched(self) -> list[TargetConnection]:
        out, self.touched = self.touched, []
        return out

    # --- membership -------------------------------------------------------------------------------
    def join(self, connection: TargetConnection) -> TargetConnection | None:
        """A connection reached full feature phase; returns the member it replaces (same CID:
        connection reinstatement, RFC 7143 6.3.4), which is closed."""
        old = self.connections.get(connection.cid)
        self.connections[connection.cid] = connection
        if old is not None and old is not connection:
            old.end("connection reinstated by a new login with the same CID", clean=True)
            self.touch(old)
            return old
        return None

    def leave(self, connection: TargetConnection) -> None:
        if self.connections.get(connection.cid) is connection:
            del self.connections[connection.cid]
        self.forget(connection)
        if not self.connections:
            self.ended = True

    def failed(self, connection: TargetConnection, reason: str) -> None:
        """ERL 0: a connection failed, so the session ends; every other member is closed."""
        self.end(
            f"another connection of the session failed ({reason}); ERL 0 ends the session", but=connection
        )

    def end(self, reason: str, *, but: TargetConnection | None = None, clean: bool = False) -> None:
        """Close every member except ``but`` (logout of the session, a failure, a forced end)."""
        for member in list(self.connections.values()):
            if member is not but and not member.closed:
                member.end(reason, clean=clean)
                self.touch(member)

    def touch(self, member: TargetConnection) -> None:
        if member not in self.touched:
            self.touched.append(member)


class SessionTable:
    """The sessions of one target server, found by initiator name, ISID and TSIH."""

    def __init__(self) -> None:
        self._sessions: dict[tuple[str, int, int], Session] = {}
        self._tsih = itertools.count(1)

    def new_tsih(self) -> int:
        """A TSIH no live session has (16 bits, never 0: 0 asks for a new session)."""
        while True:
            tsih = next(self._tsih) & 0xFFFF
            if tsih and not any(key[2] == tsih for key in self._sessions):
                return tsih

    def add(self, session: Session) -> None:
        assert session.tsih, "a session is registered once it has its TSIH"
        self._sessions[(session.initiator_name, session.isid, session.tsih)] = session

    def find(self, initiator_name: str, isid: int, tsih: int) -> Session | None:
        session = self._sessions.get((initiator_name, isid, tsih))
        if session is None or session.ended:
            return None
        return session

    def remove(self, session: Session) -> None:
        key = (session.initiator_name, session.isid, session.tsih)
        if self._sessions.get(key) is session:
            del self._sessions[key]

    def __len__(self) -> int:
        return len(self._sessions)


__all__ = ["Session", "SessionTable", "WindowOverflow", "sn_add", "sn_lt"]
