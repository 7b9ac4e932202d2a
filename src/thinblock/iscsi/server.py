"""The iSCSI target server: a thin asyncio layer around the sans-IO core (``connection.py``)
and the SCSI layer (``scsi.py``), on the same ``VolumeProvider`` as the NBD server.

Naming: one target per exported VV, ``iqn.2026-12.org.thinblock:NODE:VV``, its VV as
LUN 0.  That is what hosts expect of a volume: a host logs in to the volumes it was
given (the ACL is per target, i.e. per VV), a new volume appears as a new target found
by SendTargets rather than as a LUN appearing in every host's existing session, and
deleting one never renumbers another; qemu and libiscsi name it
``iscsi://HOST:PORT/iqn.2026-12.org.thinblock:NODE:VV/0``.  VV names are lower-cased
and characters iSCSI names may not hold (``_`` and ``+``) become ``-`` (RFC 3722); two
VVs whose names differ only there share a target name and only the first (sorted) is
exported under it.

A session may have up to MaxConnections connections (``negotiation.TARGET_MAX_CONNECTIONS``;
the sans-IO ``Session`` orders commands across them); a task is answered on the connection
it came on (ERL 0: connection allegiance), and a connection that fails ends its session.
SCSI commands run with
``thinblock.aio.start_eager`` like NBD requests: a read or write that completes without
suspending is answered at once, without a Task.  Bad input costs only its connection:
a login that does not finish within ``login_timeout`` is closed, as is any PDU the core
refuses; a connection stops reading while too many bytes are in flight.

Zero-copy reads, as on the NBD server: on a connection without DataDigest, a READ of at least
``sendqueue.SENDFILE_MIN`` bytes whose data lies in PD files as it is (``read_spans``: one
region, no write-back data over it, RAID 0 or 1) is answered with FileSpans; the core makes
the Data-In headers and the connection's socket queue (``thinblock.sendqueue``, NBD's) sends
each header and then its spans with ``sendfile(2)``.  While the queue holds anything every PDU
of the connection goes through it, in order; it starts only when the transport has nothing
buffered (otherwise the spans are read and written to the transport); its bytes stop the
connection reading past ``_SEND_HIGH_WATER``; a span that cannot be sent or read once its
header went out closes the connection (ERL 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

from thinblock.aio import start_eager
from thinblock.blockdev import Buffer, FileSpan, VolumeProvider
from thinblock.errors import MediumError, NotFound
from thinblock.netlimits import DEFAULT_LOG_INTERVAL, STOPPING, ConnectionLimits, RefusalLog
from thinblock.sendqueue import SENDFILE_MIN, SendQueue, dup_socket
from thinblock.sessions import Session as Registered
from thinblock.sessions import SessionRegistry

from .connection import (
    NEED_DATA,
    ConnectionClosed,
    LoginComplete,
    LoginPolicy,
    LogoutRequested,
    ScsiCommand,
    ScsiResult,
    SessionType,
    TargetConnection,
    TaskManagement,
)
from .constants import Asc, LoginStatus, LogoutResponse, SenseKey, Status, TaskFunction, TaskResponse
from .negotiation import ChapCredentials
from .scsi import LogicalUnit, Nexus
from .sense import fixed_sense
from .session import Session, SessionTable

log = logging.getLogger("thinblock.iscsi")

DEFAULT_PORT = 3260
IQN_PREFIX = "iqn.2026-12.org.thinblock"
DEFAULT_LOGIN_TIMEOUT = 30.0
DEFAULT_NOP_INTERVAL = 15.0  # an idle connection is pinged after this long (0: never)
DEFAULT_NOP_TIMEOUT = 30.0  # and closed when the ping is not answered within this
DEFAULT_MAX_CONNECTIONS = 256
DEFAULT_MAX_PER_CLIENT = 128  # connections one initiator address may hold (0: no such limit)
DEFAULT_MAX_BYTES = 128 * 1024 * 1024  # read bytes in flight per connection before it stops reading
_CLOSE_GRACE = 5.0
_LARGE_ANSWER = 16 * 1024  # a command moving more than this is answered at once (_pump_own)
_FLUSH_EVERY = 4  # commands executed between two writes to the socket (see _pump_own)
_SEND_HIGH_WATER = 8 * 1024 * 1024  # socket queue bytes past which a connection stops reading
_NAME_BAD = re.compile(r"[^a-z0-9.:-]")


def iqn_component(name: str) -> str:
    """A VV or node name as it may appear in an iSCSI name (RFC 3722: lower case, no _ +)."""
    return _NAME_BAD.sub("-", name.lower())


def default_node_name() -> str:
    return iqn_component(socket.gethostname().split(".")[0] or "node") or "node"


@dataclass(frozen=True, slots=True)
class AccessRule:
    """Initiators allowed to log in to a target (by VV name; "*" for every VV)."""

    vv: str
    initiators: tuple[str, ...]


class ISCSIServer:
    """Serves the volumes of ``provider`` as iSCSI targets."""

    def __init__(
        self,
        provider: VolumeProvider,
        *,
        node_name: str | None = None,
        chap: ChapCredentials | None = None,
        acl: list[AccessRule] | None = None,
        login_timeout: float = DEFAULT_LOGIN_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_connections_per_client: int = DEFAULT_MAX_PER_CLIENT,
        refusal_log_interval: float = DEFAULT_LOG_INTERVAL,
        max_bytes_per_connection: int = DEFAULT_MAX_BYTES,
        nop_interval: float = DEFAULT_NOP_INTERVAL,
        nop_timeout: float = DEFAULT_NOP_TIMEOUT,
        sessions: SessionRegistry | None = None,
    ) -> None:
        self.provider = provider
        self.node_name = iqn_component(node_name) if node_name else default_node_name()
        self.chap = chap
        self.acl = acl or []
        self.login_timeout = login_timeout
        self.max_connections = max_connections
        # Admission as the NBD listener does it (netlimits.py): a cap on the listener and one per
        # initiator address, so one host's idle connections cannot lock every other host out;
        # refusals counted for the metrics and logged at most twice per interval.
        self.limits = ConnectionLimits(max_connections, max_connections_per_client)
        self.refusals = RefusalLog(log, "iscsi-refused", interval=refusal_log_interval)
        self.refused: dict[str, int] = {}
        self._refusal_flush: asyncio.TimerHandle | None = None
        self.max_bytes_per_connection = max_bytes_per_connection
        self.nop_interval = nop_interval
        self.nop_timeout = nop_timeout
        # The engine's registry (who uses which volume, every protocol): a volume with an
        # iSCSI session is not deleted unless forced, and forcing ends the session.
        self.registry = sessions if sessions is not None else SessionRegistry()
        self._registered: dict[Session, Registered] = {}
        self._servers: list[asyncio.Server] = []
        self._connections: set[_Connection] = set()
        self._lus: dict[str, LogicalUnit] = {}
        self._session_table = SessionTable()
        self._of_core: dict[TargetConnection, _Connection] = {}
        self._ids = itertools.count(1)
        self._unsubscribe: Callable[[], None] | None = None
        self._stopping = False
        self.connections_total = 0
        self.logins_failed = 0
        self.sendfile_bytes = 0  # Data-In bytes sent with sendfile(2) (the zero-copy read path)

    # --- naming and policy ------------------------------------------------------------------
    def target_name(self, vv: str) -> str:
        return f"{IQN_PREFIX}:{self.node_name}:{iqn_component(vv)}"

    def _refuse(self, connection: _Connection, reason: str) -> None:
        """Count and (rate-limited) log a refused connection."""
        self.refused[reason] = self.refused.get(reason, 0) + 1
        host = connection.peer_host
        if reason == STOPPING:
            detail = "the target is stopping"
        elif (
            host is not None
            and self.limits.max_per_client
            and self.limits.of_client(host) >= self.limits.max_per_client
        ):
            detail = f"{self.limits.max_per_client} connections from {host} already"
        else:
            detail = f"{self.limits.max_connections} connections on this listener already"
        self.refusals.refused(connection.peer, host, reason, detail)
        due = self.refusals.needs_flush_at
        if due is not None and self._refusal_flush is None:
            delay = max(0.0, due - self.refusals.clock())
            self._refusal_flush = asyncio.get_running_loop().call_later(delay, self._flush_refusals)

    def _flush_refusals(self) -> None:
        self._refusal_flush = None
        self.refusals.flush()

    def counters(self) -> dict[str, int]:
        """The listener's counters for the metrics (api/metrics.ISCSICollector)."""
        return {
            "connections_total": self.connections_total,
            "logins_failed": self.logins_failed,
            **{f"refused_{reason}": n for reason, n in self.refused.items()},
        }

    def _targets(self) -> dict[str, str]:
        """Target name -> VV name (the first VV in sorted order wins a shared name)."""
        out: dict[str, str] = {}
        for vv in sorted(self.provider.export_names()):
            out.setdefault(self.target_name(vv), vv)
        return out

    def _allowed(self, vv: str, initiator: str) -> bool:
        rules = [r for r in self.acl if r.vv in (vv, "*")]
        if not rules:
            return True
        return any(initiator in r.initiators or "*" in r.initiators for r in rules)

    def _policy(self, portal: str) -> LoginPolicy:
        def target_names(initiator: str) -> list[str]:
            return [t for t, vv in self._targets().items() if self._allowed(vv, initiator)]

        def authorize(target: str, initiator: str) -> LoginStatus:
            vv = self._targets().get(target)
            if vv is None or self._being_deleted(vv):
                return LoginStatus.NOT_FOUND
            if not self._allowed(vv, initiator):
                return LoginStatus.AUTHORIZATION_FAILED
            return LoginStatus.SUCCESS

        def target_alias(target: str) -> str:
            return self._targets().get(target, "")

        return LoginPolicy(
            target_names=target_names,
            authorize=authorize,
            credentials=lambda target: self.chap,
            portal=portal,
            target_alias=target_alias,
            sessions=self._session_table,
        )

    def _being_deleted(self, vv: str) -> bool:
        """A forced `vv delete` marks the VV deleted, ends its sessions, then gives its regions
        back: an initiator that logs in again at once (libiscsi does, on the Asynchronous
        Message) must find no target, not a session on a volume that is going away."""
        try:
            volume = self.provider.open_volume(vv)
        except NotFound:
            return True
        return bool(getattr(getattr(volume, "_inner", volume), "deleted", False))

    def logical_unit(self, target: str) -> LogicalUnit | None:
        vv = self._targets().get(target)
        if vv is None:
            return None
        try:
            volume = self.provider.open_volume(vv)
        except NotFound:
            return None
        lu = self._lus.get(vv)
        if lu is None or (
            lu.volume is not volume
            and getattr(lu.volume, "_inner", lu.volume) is not getattr(volume, "_inner", volume)
        ):
            lu = LogicalUnit(volume, target_name=target)
            self._lus[vv] = lu
        return lu

    def _alert(self, alert: Any) -> None:
        """Thin provisioning soft threshold: the VV's allocation warning started."""
        kind = str(getattr(alert, "kind", ""))
        state = str(getattr(alert, "state", ""))
        obj = str(getattr(alert, "object", ""))
        if kind != "vv-allocation-warning" or state != "new" or not obj.startswith("vv:"):
            return
        vv = obj[3:]
        # By the volume's name *now*, not the key its unit was made under: a session logged in
        # before `vv rename` keeps its unit (and its volume), and must hear of the crossing too.
        for lu in [lu for lu in self._lus.values() if getattr(lu.volume, "name", None) == vv]:
            lu.soft_threshold_reached()
            log.info(
                "VV %s crossed its allocation warning: UNIT ATTENTION 38h/07h queued for %d nexus(es)",
                vv,
                len(lu.nexuses),
                extra={"event": "iscsi-soft-threshold", "vv": vv},
            )

    # --- listening ------------------------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> None:
        loop = asyncio.get_running_loop()
        self._servers.append(await loop.create_server(self._protocol_factory, host, port, reuse_address=True))
        subscribe = getattr(self.provider, "subscribe", None)
        if subscribe is not None:
            self._unsubscribe = subscribe(self._alert)
        log.info(
            "iSCSI target listening on %s:%s (targets %s:<vv>)",
            host,
            self.port,
            f"{IQN_PREFIX}:{self.node_name}",
            extra={"event": "iscsi-listening"},
        )

    @property
    def port(self) -> int | None:
        for server in self._servers:
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        return None

    def _protocol_factory(self) -> _Connection:
        return _Connection(self, next(self._ids))

    async def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        if self._unsubscribe is not None:
            self._unsubscribe()
        for server in self._servers:
            server.close()
        waits = [c.idle() for c in list(self._connections)]
        if waits:
            await asyncio.wait(waits, timeout=30.0)
        for connection in list(self._connections):
            connection.close(abort=False)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), timeout=_CLOSE_GRACE)
        for connection in list(self._connections):
            connection.close(abort=True)
        self._servers.clear()
        if self._refusal_flush is not None:
            self._refusal_flush.cancel()
            self._refusal_flush = None
        self.refusals.flush()
        log.info("iSCSI target stopped", extra={"event": "iscsi-stopped"})

    # --- admin ------------------------------------------------------------------------------------
    def _members(self, session: Session) -> list[_Connection]:
        return [c for core in session.connections.values() if (c := self._of_core.get(core)) is not None]

    def sessions(self) -> list[dict[str, Any]]:
        """Logged-in sessions: initiator, addresses, target, VV and LUNs (one row per
        session; its connections are counted and listed by address)."""
        out = []
        seen: set[int] = set()
        for c in sorted(self._connections, key=lambda c: c.number):
            session = c.core.session
            if not c.core.in_full_feature or id(session) in seen:
                continue
            seen.add(id(session))
            members = sorted(self._members(session), key=lambda m: m.number) or [c]
            vv = c.lu.volume.name if c.lu is not None else None
            out.append(
                {
                    "initiator": c.core.initiator_name,
                    "initiator_alias": c.core.initiator_alias,
                    "address": members[0].peer,
                    "addresses": [m.peer for m in members],
                    "connections": len(members),
                    "session_type": c.core.session_type.value.lower(),
                    "target": c.core.target_name,
                    "vv": vv,
                    "luns": [0] if vv is not None else [],
                    "tsih": c.core.tsih,
                    "isid": f"{c.core.isid:012x}",
                    "header_digest": c.core.params.header_digest,
                    "data_digest": c.core.params.data_digest,
                    "since": min(m.since for m in members),
                    "commands": sum(m.commands for m in members),
                }
            )
        return out

    def _register(self, session: Session, vv: str, peer: str) -> None:
        if session not in self._registered:
            self._registered[session] = self.registry.open(
                "iSCSI", vv, peer, partial(self._volume_gone, session, vv)
            )

    def _unregister(self, session: Session) -> None:
        registered = self._registered.pop(session, None)
        if registered is not None:
            self.registry.close(registered)

    def _volume_gone(self, session: Session, vv: str) -> None:
        """The session's volume was deleted under it (``vv delete --force``; the VV is already
        marked deleted).  What a host expects of a logical unit that went away: every command
        from now on is answered ILLEGAL REQUEST, LOGICAL UNIT NOT SUPPORTED (05h/25h/00h, as
        SPC-4 has a target answer a LUN it does not have), it is told at once with an
        Asynchronous Message carrying REPORTED LUNS DATA HAS CHANGED (3Fh/0Eh; Linux rescans
        and removes the disk), and a new login to the target finds nothing.  The session
        itself stays until the initiator logs out (or stops answering NOP-In): dropping it
        makes libiscsi (qemu) log in again and again, its I/O waiting instead of failing."""
        log.warning(
            "volume %s deleted under the iSCSI session of %s: its commands now get LOGICAL UNIT NOT SUPPORTED",
            vv,
            session.initiator_name,
            extra={"event": "iscsi-volume-gone", "vv": vv},
        )
        sense = fixed_sense(SenseKey.UNIT_ATTENTION, Asc.REPORTED_LUNS_DATA_CHANGED)
        for member in self._members(session):
            if member.lu is not None:
                member.lu.gone = True
            member.core.scsi_event(sense)
            member._flush()
        self._unregister(session)

    def reset_lu(self, lu: LogicalUnit, origin: _Connection) -> list[asyncio.Future[Any]]:
        """LUN RESET: every task on the LU, from every session, is aborted."""
        waits: list[asyncio.Future[Any]] = []
        for connection in list(self._connections):
            if connection.lu is lu:
                waits += connection.abort_all()
        return waits


class _Connection(asyncio.BufferedProtocol):
    """One TCP connection.  A BufferedProtocol: the loop receives into the core's buffer --
    for a Data-Out answering an R2T, straight into the write's own buffer (``PduReader``)."""

    def __init__(self, server: ISCSIServer, number: int) -> None:
        self.server = server
        self.number = number
        self.peer = f"#{number}"
        self.peer_host: str | None = None  # the initiator's address, for the per-address limit
        self._admitted = False  # holds a slot of the server's ConnectionLimits
        self.transport: asyncio.Transport | None = None
        self.core: TargetConnection
        self.lu: LogicalUnit | None = None
        self.nexus: Nexus = ""
        self.since = time.time()
        self.commands = 0
        self._running: dict[int, asyncio.Future[Any]] = {}  # ITT -> Task of a suspended command
        self._bytes_in_flight = 0
        self._reading_paused = False
        self._write_paused = False
        self._lost = False
        self._login_timer: asyncio.TimerHandle | None = None
        self._ping_timer: asyncio.TimerHandle | None = None
        self._pdus_seen = -1
        self._idle: asyncio.Future[None] | None = None
        # The socket queue (thinblock.sendqueue, NBD's too) on a duplicate of the plain socket:
        # READs of SENDFILE_MIN bytes or more whose data lies in PD files as it is go out as
        # Data-In headers and sendfile(2) of the spans.  While it holds anything, every PDU of
        # the connection goes through it, in order.  None without a socket (tests' transports).
        self._sendq: SendQueue | None = None
        self._close_when_drained = False

    # --- asyncio callbacks --------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer = f"{peer[0]}:{peer[1]}"
            self.peer_host = str(peer[0])
        sockname = transport.get_extra_info("sockname")
        host, port = (sockname[0], sockname[1]) if isinstance(sockname, tuple) else ("127.0.0.1", 3260)
        portal = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.core = TargetConnection(self.server._policy(portal))
        server = self.server
        server._connections.add(self)
        server._of_core[self.core] = self
        refused = STOPPING if server._stopping else server.limits.admit(self.peer_host)
        if refused is not None:
            server._refuse(self, refused)  # counted there, not as accepted (as on NBD)
            self.close(abort=True)
            return
        self._admitted = True
        server.connections_total += 1
        dup = dup_socket(transport)
        if dup is not None:
            self._sendq = SendQueue(
                dup, on_drained=self._sent, on_error=self._send_failed, on_sendfile=self._count_sendfile
            )
        self._login_timer = asyncio.get_running_loop().call_later(server.login_timeout, self._login_timeout)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.core.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.core.buffer_updated(nbytes)
        self._pump()

    def eof_received(self) -> bool | None:
        self.core.receive_data(b"")
        self._pump()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._drop_sendq()
        if self._login_timer is not None:
            self._login_timer.cancel()
        if self._ping_timer is not None:
            self._ping_timer.cancel()
            self._ping_timer = None
        self.core.receive_data(b"")
        for itt in list(self.core.tasks):
            self.core.abort(itt)
        self.server._connections.discard(self)
        self.server._of_core.pop(self.core, None)
        if self._admitted:
            self._admitted = False
            self.server.limits.release(self.peer_host)
        if not self.core.session.connections:
            # The I_T nexus is the session's (initiator name and ISID): it ends with the last
            # connection.
            if self.lu is not None:
                self.lu.detach(self.nexus)
            self.server._unregister(self.core.session)
        self._notify_idle()
        self._pump_others()

    def pause_writing(self) -> None:
        self._write_paused = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._maybe_resume()

    # --- core events ------------------------------------------------------------------------------------
    def _pump(self) -> None:
        self._pump_own()
        self._pump_others()

    def _pump_others(self) -> None:
        """Input on one connection may have given another of the session work: a command
        whose CmdSN turn came, a close (ERL 0 session end, logout, reinstatement)."""
        for core in self.core.session.take_touched():
            other = self.server._of_core.get(core)
            if other is not None and other is not self:
                other._pump()

    def _pump_own(self) -> None:
        core = self.core
        answered = 0
        while True:
            event = core.next_event()
            if event is NEED_DATA:
                break
            if isinstance(event, ScsiCommand):
                self._command(event)
                # Answers go out a few at a time, not after the whole batch the initiator
                # sent: with qemu-img bench at queue depth 16 (libiscsi), answering a batch of
                # 16 at once left the initiator idle until the last one and then sent it 16
                # new commands at once, lock-step (strace: pauses of 15-25 ms between batches
                # on a loaded machine).  Nor one send per answer: that was a quarter of the
                # daemon's CPU at 4 KiB (py-spy: transport.write, a syscall per 48-byte
                # response).  Every _FLUSH_EVERY answers keeps the initiator's queue fed at a
                # fraction of the syscalls (bench/README.md, "iSCSI").  A large transfer's
                # answer goes at once: it is a syscall of its own anyway, and a 1 MiB read
                # held back for three more lost a third of the 1 MiB read rate.
                answered += 1
                if answered >= _FLUSH_EVERY or event.expected_length > _LARGE_ANSWER:
                    answered = 0
                    self._flush()
            elif isinstance(event, LoginComplete):
                self._logged_in(event)
            elif isinstance(event, TaskManagement):
                self._task_management(event)
            elif isinstance(event, LogoutRequested):
                self._logout_requested(event)
            elif isinstance(event, ConnectionClosed):
                if not event.clean:
                    log.warning(
                        "iSCSI connection %s (%s) closed: %s",
                        self.peer,
                        core.initiator_name or "?",
                        event.reason,
                        extra={"event": "iscsi-close"},
                    )
                    if not core.tsih:
                        self.server.logins_failed += 1
                self._flush()
                self.close(abort=False)
                return
        self._flush()

    def _flush(self) -> None:
        out = self.core.data_to_send()
        transport = self.transport
        if not out or transport is None or self._lost or transport.is_closing():
            return
        queue = self._sendq
        if queue is not None:
            if queue:  # the socket queue owns the socket until it drains: keep the order
                queue.push(out)
                if queue.bytes >= _SEND_HIGH_WATER:
                    self._pause_reading()
                return
            if any(isinstance(item, FileSpan) for item in out):
                if not transport.get_write_buffer_size():
                    queue.push(out)  # Data-In headers with send, their spans with sendfile
                    if queue.bytes >= _SEND_HIGH_WATER:
                        self._pause_reading()
                    return
                # The transport still holds bytes: the spans would overtake them.  Read them.
                try:
                    out = [item.read_part() if isinstance(item, FileSpan) else item for item in out]
                except MediumError as exc:
                    self._send_failed(exc)
                    return
        # One writev for the batch (uvloop's writelines): the BHSs and the data as they are,
        # never joined (joining the small ones and writing the large ones apart cost 38 us
        # of daemon CPU per 4 KiB read, this 31, in the same interleaved run).
        transport.writelines(cast(list[Buffer], out))

    def _count_sendfile(self, n: int) -> None:
        self.server.sendfile_bytes += n

    def _sent(self) -> None:
        """The socket queue drained: the transport sends again."""
        if self._close_when_drained:
            self.close(abort=False)
        else:
            self._maybe_resume()

    def _send_failed(self, exc: BaseException) -> None:
        # Data-In headers went out promising data (ERL 0: no recovery): close the connection.
        log.warning(
            "iSCSI connection %s (%s): sending read data failed (%s); closing",
            self.peer,
            self.core.initiator_name or "?",
            exc,
            extra={"event": "iscsi-send-failed"},
        )
        self.close(abort=True)

    def _drop_sendq(self) -> None:
        queue, self._sendq = self._sendq, None
        if queue is not None:
            queue.close()

    def _login_timeout(self) -> None:
        self._login_timer = None
        if not self.core.in_full_feature and not self._lost:
            log.warning(
                "iSCSI login from %s did not finish within %.0f s; closing",
                self.peer,
                self.server.login_timeout,
                extra={"event": "iscsi-login-timeout"},
            )
            self.close(abort=True)

    def _logged_in(self, event: LoginComplete) -> None:
        if self._login_timer is not None:
            self._login_timer.cancel()
            self._login_timer = None
        self._pdus_seen = self.core.pdus_in
        self._schedule_ping(self.server.nop_interval)
        self.nexus = f"{event.initiator_name},i,0x{event.isid:012x}"
        if event.session_type is SessionType.NORMAL:
            assert event.target_name is not None
            if not event.leading:
                # A connection added to a session: the session's LU and nexus.
                leading = next((c for c in self.server._members(self.core.session) if c is not self), None)
                self.lu = leading.lu if leading is not None else self.server.logical_unit(event.target_name)
                if self.lu is not None:
                    self.lu.attach(self.nexus)
                log.info(
                    "iSCSI connection %d from %s (%s) added to the session of %s (%d connections)",
                    event.cid,
                    event.initiator_name,
                    self.peer,
                    event.target_name,
                    len(self.core.session.connections),
                    extra={"event": "iscsi-login", "initiator": event.initiator_name},
                )
                return
            lu = self.server.logical_unit(event.target_name)
            # Session reinstatement (RFC 7143 6.3.5): the same initiator and ISID logging in
            # again with TSIH 0 ends the old session, every connection of it.
            for other in list(self.server._connections):
                if (
                    other is not self
                    and other.core.session is not self.core.session
                    and other.nexus == self.nexus
                    and other.core.target_name == event.target_name
                ):
                    log.info("iSCSI session of %s reinstated; closing the old one", self.nexus)
                    other.abort_all()
                    other.close(abort=True)
            self.lu = lu
            if lu is not None:
                lu.attach(self.nexus)
                self.server._register(self.core.session, lu.volume.name, self.peer)
        log.info(
            "iSCSI %s login from %s (%s) to %s",
            event.session_type.value.lower(),
            event.initiator_name,
            self.peer,
            event.target_name or "discovery",
            extra={"event": "iscsi-login", "initiator": event.initiator_name},
        )

    # --- NOP-In: is an idle initiator still there? ---------------------------------------------------
    def _schedule_ping(self, delay: float) -> None:
        if delay > 0 and not self._lost:
            self._ping_timer = asyncio.get_running_loop().call_later(delay, self._ping_tick)

    def _ping_tick(self) -> None:
        """Every ``nop_interval``: a connection that sent nothing since the last tick is
        pinged; a ping still unanswered ``nop_timeout`` later closes it (and, at ERL 0, its
        session: the initiator is gone or wedged, its tasks can never be answered)."""
        self._ping_timer = None
        core = self.core
        if self._lost or core.closed:
            return
        if core.ping_ttt is not None:
            log.warning(
                "iSCSI connection %s (%s) did not answer a NOP-In within %.0f s; closing",
                self.peer,
                core.initiator_name,
                self.server.nop_timeout,
                extra={"event": "iscsi-nop-timeout", "initiator": core.initiator_name},
            )
            core.end("no answer to NOP-In", clean=False)
            self._pump()
            return
        if core.pdus_in != self._pdus_seen:
            self._pdus_seen = core.pdus_in
            self._schedule_ping(self.server.nop_interval)
            return
        core.ping()
        self._flush()
        self._schedule_ping(self.server.nop_timeout)

    def _command(self, task: ScsiCommand) -> None:
        self.commands += 1
        lu = self.lu
        if lu is None or task.lun != 0:
            # A LUN this target does not have (SPC-4: INQUIRY still answers, qualifier 3).
            if task.cdb[0] == 0x12 and lu is not None:
                data = bytearray(36)
                data[0] = 0x7F
                data[4] = 31
                self.core.complete(task, ScsiResult(data=bytes(data[: int.from_bytes(task.cdb[3:5], "big")])))
            else:
                sense = fixed_sense(SenseKey.ILLEGAL_REQUEST, Asc.LOGICAL_UNIT_NOT_SUPPORTED)
                self.core.complete(task, ScsiResult(Status.CHECK_CONDITION, sense=sense, wanted=0))
            return
        # Zero-copy Data-In for large reads on a plain socket, unless DataDigest needs the bytes.
        spans = (
            task.read
            and task.expected_length >= SENDFILE_MIN
            and self._sendq is not None
            and not self.core.reader.data_digest
        )
        try:
            finished, result = start_eager(lu.execute(self.nexus, task.cdb, task.data, spans=spans))
        except Exception as exc:  # never reached: execute answers every error with sense
            log.exception("iSCSI command failed: %r", exc)
            sense = fixed_sense(SenseKey.HARDWARE_ERROR, Asc.INTERNAL_TARGET_FAILURE)
            self.core.complete(task, ScsiResult(Status.CHECK_CONDITION, sense=sense, wanted=0))
            return
        if finished:
            self.core.complete(task, result)
            return
        self._running[task.itt] = result
        size = task.expected_length
        self._bytes_in_flight += size
        if self._bytes_in_flight > self.server.max_bytes_per_connection:
            self._pause_reading()
        result.add_done_callback(partial(self._done, task, size))

    def _done(self, task: ScsiCommand, size: int, future: asyncio.Future[Any]) -> None:
        if self._running.get(task.itt) is future:
            del self._running[task.itt]
        self._bytes_in_flight -= size
        if not future.cancelled() and future.exception() is None:
            self.core.complete(task, future.result())
        else:
            sense = fixed_sense(SenseKey.ABORTED_COMMAND, 0)
            self.core.complete(task, ScsiResult(Status.CHECK_CONDITION, sense=sense, wanted=0))
        self._pump()
        self._notify_idle()
        self._maybe_resume()

    def abort_all(self) -> list[asyncio.Future[Any]]:
        """Abort every task of this session: none gets a response; the returned futures
        finish when those already running in the volume have ended."""
        for itt in list(self.core.tasks):
            self.core.abort(itt)
        return list(self._running.values())

    def _task_management(self, request: TaskManagement) -> None:
        core = self.core
        function = request.function
        waits: list[asyncio.Future[Any]] = []
        response = TaskResponse.COMPLETE
        if function == TaskFunction.ABORT_TASK:
            task = core.abort(request.referenced_itt)
            running = self._running.get(request.referenced_itt)
            if running is not None:
                waits.append(running)
            if task is None and running is None:
                response = TaskResponse.NO_SUCH_TASK
        elif function in (TaskFunction.ABORT_TASK_SET, TaskFunction.CLEAR_TASK_SET):
            waits = self.abort_all()
        elif function in (TaskFunction.LOGICAL_UNIT_RESET, TaskFunction.TARGET_WARM_RESET):
            if (request.lun != 0 and function == TaskFunction.LOGICAL_UNIT_RESET) or self.lu is None:
                response = TaskResponse.NO_SUCH_LUN
            else:
                waits = self.server.reset_lu(self.lu, self)
        else:
            response = TaskResponse.NOT_SUPPORTED

        def answer(_: Any = None) -> None:
            core.task_management_done(request, response)
            self._flush()

        if not waits:
            answer()
            return
        # "the task management response ... is sent after the affected tasks are finished"
        gathered = asyncio.gather(*waits, return_exceptions=True)
        gathered.add_done_callback(answer)

    def _logout_requested(self, request: LogoutRequested) -> None:
        """Answer once the commands already running on the connections it closes have
        finished and been answered; what is still collecting data is dropped."""
        response, ending = self.core.logout_target(request)
        if response is not LogoutResponse.OK:
            self.core.logout_done(request, response)
            self._flush()
            return
        closing = [c for core in ending if (c := self.server._of_core.get(core)) is not None]
        waits = [future for c in closing for future in c._running.values()]

        def answer(_: Any = None) -> None:
            for c in closing:
                for itt in list(c.core.tasks):
                    c.core.abort(itt)
            self.core.logout_done(request, response)
            self._pump()

        if not waits:
            answer()
            return
        asyncio.gather(*waits, return_exceptions=True).add_done_callback(answer)

    # --- flow control ---------------------------------------------------------------------------------
    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self._lost:
            self._reading_paused = True
            self.transport.pause_reading()

    def _maybe_resume(self) -> None:
        if (
            self._reading_paused
            and not self._write_paused
            and (self._sendq is None or self._sendq.bytes < _SEND_HIGH_WATER)
            and self._bytes_in_flight <= self.server.max_bytes_per_connection
            and self.transport is not None
            and not self._lost
            and not self.core.closed
        ):
            self._reading_paused = False
            self.transport.resume_reading()

    def close(self, *, abort: bool) -> None:
        transport = self.transport
        if transport is None or self._lost:
            return
        if not abort and self._sendq:
            # PDUs still in the socket queue: close once it has drained (or at the deadline).
            if not self._close_when_drained:
                self._close_when_drained = True
                asyncio.get_running_loop().call_later(_CLOSE_GRACE, partial(self.close, abort=True))
            return
        if abort:
            self._drop_sendq()
            transport.abort()
        elif not transport.is_closing():
            transport.close()
            asyncio.get_running_loop().call_later(_CLOSE_GRACE, partial(self.close, abort=True))

    def idle(self) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        if self._idle is None or self._idle.done():
            self._idle = loop.create_future()
        self._notify_idle()
        return self._idle

    def _notify_idle(self) -> None:
        if self._idle is not None and not self._idle.done() and (not self._running or self._lost):
            self._idle.set_result(None)


__all__ = ["DEFAULT_PORT", "IQN_PREFIX", "AccessRule", "ISCSIServer", "iqn_component"]
